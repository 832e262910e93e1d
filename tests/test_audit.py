"""The audit log's file (issue 24 item 3): whole JSON lines, syncs in batches with a bound
(counted through the injectable sync), a torn tail removed, mode 0640, rotation."""

import json
import os
import stat
import threading
import time

from mlbench_daemon.audit import ROTATE_AGE_S, AuditLog
from tests.helpers import wait_for


def lines(path):
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


def test_lines_are_whole_json_with_the_time_first(tmp_path):
    path = str(tmp_path / "audit.log")
    log = AuditLog(path)
    log.record(token="alice", method="POST", path="/api/mpi_jobs", status=202, outcome="ok")
    log.record(token=None, method="DELETE", path="/api/mpi_jobs/<job_id>", status=401)
    log.close()
    first, second = lines(path)
    assert next(iter(first)) == "time" and first["time"].endswith("Z")
    assert (first["token"], first["status"], second["token"]) == ("alice", 202, None)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_mode_is_0640_whatever_the_umask_or_an_older_file(tmp_path):
    path = tmp_path / "audit.log"
    path.write_text("")
    path.chmod(0o666)
    old = os.umask(0)
    try:
        AuditLog(str(path)).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_syncs_come_in_batches_within_the_bound(tmp_path):
    """Many writes cost a few syncs (one per interval with something written), and a
    write is synced within the interval (plus a scheduling margin)."""
    syncs = []
    every = 0.1
    log = AuditLog(str(tmp_path / "audit.log"), sync=lambda fd: syncs.append(time.monotonic()),
                   every_s=every)  # fmt: skip
    start = time.monotonic()
    for n in range(200):
        log.record(n=n)
        if n % 20 == 0:
            time.sleep(every / 4)
    written = time.monotonic()
    wait_for(lambda: syncs and syncs[-1] >= written, timeout=5, what="a sync after the writes",
             interval=0.01)  # fmt: skip
    elapsed = time.monotonic() - start
    assert 1 <= len(syncs) <= elapsed / every + 2  # batches, not one per line
    quiet = len(syncs)
    time.sleep(3 * every)
    assert len(syncs) == quiet  # nothing written: no sync
    log.close()


def test_a_line_cut_by_a_crash_is_removed_at_open(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"time": "2026-12-05T06:00:00.000Z", "n": 1}\n{"time": "2026-12-0')
    log = AuditLog(str(path))
    log.record(n=2)
    log.close()
    assert [x["n"] for x in lines(path)] == [1, 2]


def test_concurrent_writers_never_interleave_a_line(tmp_path):
    path = str(tmp_path / "audit.log")
    log = AuditLog(path)
    pad = "x" * 5000  # over a pipe's atomic size, to make a torn line likely if it could be

    def write(w):
        for n in range(100):
            log.record(writer=w, n=n, pad=pad)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    log.close()
    got = lines(path)
    assert len(got) == 400 and all(x["pad"] == pad for x in got)


def test_rotation_after_a_day_and_removal_after_keep_days(tmp_path):
    now = [time.time()]
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), now=lambda: now[0])
    log.record(n=1)
    log.rotate(keep_days=2)
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]  # not a day old yet
    now[0] += ROTATE_AGE_S
    log.rotate(keep_days=2)
    rotated = [p for p in tmp_path.iterdir() if p.name != "audit.log"]
    assert len(rotated) == 1 and [x["n"] for x in lines(rotated[0])] == [1]
    assert path.stat().st_size == 0 and stat.S_IMODE(path.stat().st_mode) == 0o640
    log.record(n=2)
    os.utime(rotated[0], (now[0] - 3 * 86400, now[0] - 3 * 86400))
    log.rotate(keep_days=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log"]
    log.close()
    assert [x["n"] for x in lines(path)] == [2]


def test_a_slow_sync_never_holds_up_a_write(tmp_path):
    """The sync runs outside the lock: a request's line is written while a sync hangs."""
    release = threading.Event()
    entered = threading.Event()

    def slow_sync(fd):
        entered.set()
        release.wait(30)

    log = AuditLog(str(tmp_path / "audit.log"), sync=slow_sync, every_s=0.01)
    log.record(n=1)
    assert entered.wait(10), "the syncer never synced"
    t = time.monotonic()
    log.record(n=2)  # while the sync hangs
    took = time.monotonic() - t
    release.set()
    log.close()
    assert took < 5.0  # a generous bound: held by the sync, it would wait the whole 30 s
    assert [x["n"] for x in lines(tmp_path / "audit.log")] == [1, 2]
