import errno
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from mlbench_daemon.shapes import NodeRow
from mlbench_daemon.store import Store, StoreError, store_reason
from tests.helpers import append_log


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path))
    yield s
    s.close()


def test_create_get_update_roundtrip(store):
    nodes = [["10.0.0.1", "default", "w-0", "{'app': 'mlbench'}"]]
    rec = store.create(nodes=nodes, command=["mpirun", "a b"], env_names=["X"], np=2)
    assert rec.state == "pending" and len(rec.id) == 20
    assert rec.nodes == [NodeRow(*n) for n in nodes] and rec.nodes[0].name == "w-0"
    assert rec.command == ["mpirun", "a b"] and rec.env_names == ["X"]
    rec = store.update(rec.id, state="running", pid=1234, started=5.0)
    assert (rec.state, rec.pid, rec.started) == ("running", 1234, 5.0)
    assert store.get(rec.id) == rec
    assert store.get("nope") is None


def test_rejects_unknown_columns_and_states(store):
    rec = store.create()
    with pytest.raises(ValueError):
        store.update(rec.id, bogus=1)
    with pytest.raises(ValueError):
        store.update(rec.id, seq=7)
    with pytest.raises(ValueError):
        store.update(rec.id, state="exploded")


def test_list_newest_first_with_paging(store):
    ids = [store.create().id for _ in range(5)]
    assert [r.id for r in store.list(limit=10)] == ids[::-1]
    assert [r.id for r in store.list(limit=2, offset=1)] == [ids[3], ids[2]]
    assert sorted(ids) == ids  # ids sort by creation too


def test_running_lists_unfinished_oldest_first(store):
    a, b, c = (store.create().id for _ in range(3))
    store.update(a, state="running")
    store.update(b, state="succeeded")
    assert [r.id for r in store.running()] == [a, c]


def test_log_append_and_bounded_reads(store):
    rec = store.create()
    assert store.read_log(rec.id, 0, 10) == (b"", 0)
    assert store.log_size(rec.id) == 0
    append_log(store, rec.id, b"hello ")
    assert append_log(store, rec.id, b"\x00\xffworld") == 13
    assert store.read_log(rec.id, 0, 4) == (b"hell", 4)
    assert store.read_log(rec.id, 4, 100) == (b"o \x00\xffworld", 13)
    assert store.read_log(rec.id, 13, 100) == (b"", 13)
    assert store.read_log(rec.id, 99, 100) == (b"", 99)
    store.sync_log(rec.id)
    with pytest.raises(ValueError):
        store.log_path("../etc")


def test_concurrent_writers(store):
    ids = []

    def work():
        for _ in range(20):
            rec = store.create()
            store.update(rec.id, state="running")
            ids.append(rec.id)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(store.running()) == 80 == len(set(ids))


def test_survives_a_killed_process(tmp_path):
    """A record committed and log bytes written before SIGKILL are there afterwards."""
    code = (
        "import os, signal, sys\n"
        "from mlbench_daemon.store import Store\n"
        "s = Store(sys.argv[1])\n"
        "r = s.create(command=['x'])\n"
        "s.update(r.id, state='running', pid=42)\n"
        "with s.log_writer(r.id) as f: f.write(b'partial output')\n"
        "print(r.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, env=env, timeout=60
    )
    job_id = out.stdout.decode().strip()
    assert job_id, out.stderr
    s = Store(str(tmp_path))
    rec = s.get(job_id)
    assert (rec.state, rec.pid, rec.command) == ("running", 42, ["x"])
    assert [r.id for r in s.running()] == [job_id]
    assert s.read_log(job_id, 0, 100) == (b"partial output", 14)
    s.close()


def test_a_database_from_before_the_request_column_is_upgraded(tmp_path):
    import sqlite3

    from mlbench_daemon import store as store_module

    old_schema = store_module.SCHEMA.replace(",\n    request TEXT NOT NULL DEFAULT '{}'", "")
    assert "request" not in old_schema
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute(old_schema)
    db.execute(
        "INSERT INTO jobs (id, state, created) VALUES ('00000000000000000001', 'pending', 1.0)"
    )
    db.commit()
    db.close()
    s = Store(str(tmp_path))
    try:
        assert s.get("00000000000000000001").request == {}
        rec = s.create(request={"program": ["p"], "np": None, "master": None, "nodes": ["w-0"]})
        assert s.get(rec.id).request["nodes"] == ["w-0"]
    finally:
        s.close()
    Store(str(tmp_path)).close()  # and opening it again changes nothing


def test_a_database_written_by_an_earlier_version_opens_unchanged_and_reads_back(tmp_path):
    """tests/data/store_main_1b62355.sql: a job, its outbox row and a run, as the store of
    main at 1b62355 wrote them (sqlite3's dump): the records read back field by field, and
    opening it neither changes a table nor refuses a write."""
    from pathlib import Path

    dump = (Path(__file__).parent / "data" / "store_main_1b62355.sql").read_text()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(dump)
    db.close()

    def tables():
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
            return db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()

    from mlbench_daemon import store as store_module

    for sql in (store_module.SCHEMA, store_module.RUN_SCHEMA, *store_module.OUTBOX_SCHEMA):
        assert sql.replace("IF NOT EXISTS ", "").strip() + ";" in dump  # new databases too
    before = tables()
    s = Store(str(tmp_path))
    try:
        job = s.get("0190000000000a1b2c3d")
        assert (job.seq, job.state, job.created, job.started) == (
            1,
            "running",
            1.8e9 + 0.5,
            1.8e9 + 1,
        )
        assert job.nodes == [NodeRow("w-0", "10.0.0.1", 22, 1)]
        assert job.command == ["mpirun", "-np", "2", "a.out"] and job.tags == ["team:a"]
        assert job.request == {"program": ["a.out"], "np": 2} and job.failure is None
        assert job.stalls == [{"since": 1.0, "detected": 9.0}] and job.name == "main-job"
        run = s.run(1)
        assert (run.name, run.state, run.job_id, run.num_workers) == (
            "run-1", "started", job.id, 2,
        )  # fmt: skip
        assert (run.spec, run.nodes, run.notes, run.submitted_by) == (
            {"image": "x"}, ["w-0"], ["a note"], "alice",
        )  # fmt: skip
        (row,) = s.outbox_due(2e9, 10)
        assert (row.seq, row.event_id, row.hook, row.body, row.attempts, row.last_error) == (
            1, f"{job.id}.job.started", "h", b'{"id": 1}', 0, None,
        )  # fmt: skip
        assert s.update(job.id, state="succeeded", tags=["x"]).tags == ["x"]
        assert s.update_run(1, notes=["b"]).notes == ["b"]
        s.outbox_retry(1, 1, 2e9, "HTTP 503")
        assert s.outbox_due(2e9, 10)[0].attempts == 1
    finally:
        s.close()
    assert tables() == before


def _finished(store, state, finished, log=b""):
    rec = store.create(state=state, finished=finished)
    if log:
        append_log(store, rec.id, log)
    return rec.id


def test_prune_by_age_removes_old_finished_jobs_and_their_logs(store):
    now = 1_000_000_000.0
    day = 86400
    old = [_finished(store, s, now - 40 * day, b"old") for s in ("succeeded", "failed", "lost")]
    recent = _finished(store, "cancelled", now - 2 * day, b"recent")
    running = store.create(state="running", started=now - 90 * day).id
    append_log(store, running, b"still going")
    pending = store.create(state="pending", created=now - 90 * day).id

    assert sorted(store.prune(keep_days=30, max_bytes=0, now=now)) == sorted(old)
    for job_id in old:
        assert store.get(job_id) is None
        assert not os.path.exists(store.log_path(job_id))
    assert {r.id for r in store.list(limit=10)} == {recent, running, pending}
    assert store.read_log(running, 0, 100) == (b"still going", 11)
    assert store.prune(keep_days=30, max_bytes=0, now=now) == []  # nothing left to do
    assert store.prune(keep_days=0, max_bytes=0, now=now + 1000 * day) == []  # both rules off


def test_prune_by_size_goes_oldest_first_and_never_touches_running_jobs(store):
    now = 1_000_000_000.0
    a = _finished(store, "succeeded", now - 5000, b"a" * 400)
    b = _finished(store, "failed", now - 4000, b"b" * 300)
    c = _finished(store, "succeeded", now - 3000, b"c" * 200)
    running = store.create(state="running").id
    append_log(store, running, b"r" * 1000)
    just_done = _finished(store, "succeeded", now - 5, b"j" * 100)  # a client may still read it

    # 2000 bytes in all; at most 1500: a and b go (oldest end first), c stays
    assert store.prune(keep_days=0, max_bytes=1500, now=now) == [a, b]
    assert store.get(c) and store.get(running) and store.get(just_done)
    # even a limit below the running job's own log removes only finished jobs
    assert store.prune(keep_days=0, max_bytes=10, now=now) == [c]
    assert {r.id for r in store.list(limit=10)} == {running, just_done}
    assert store.log_size(running) == 1000 and store.log_size(just_done) == 100


def test_prune_orders_by_end_not_by_start(store):
    now = 1_000_000_000.0
    long_job = _finished(store, "succeeded", now - 1000, b"x" * 10)  # created first, ended last
    short_job = _finished(store, "succeeded", now - 2000, b"y" * 10)
    assert store.prune(keep_days=0, max_bytes=15, now=now) == [short_job]
    assert store.get(long_job)


def test_the_daemon_prunes_at_start(start_daemon, tmp_path):
    state = tmp_path / "pruned-state"
    s = Store(str(state))
    old = _finished(s, "succeeded", time.time() - 40 * 86400, b"old output")
    kept = _finished(s, "failed", time.time() - 86400, b"recent output")
    s.close()
    d = start_daemon(state={"dir": str(state), "keep_days": 30})
    assert d.json("GET", f"/api/mpi_jobs/{old}")[0] == 404
    assert not (state / "logs" / f"{old}.log").exists()
    assert d.json("GET", f"/api/mpi_jobs/{kept}")[1]["state"] == "failed"


@pytest.mark.logic
@pytest.mark.parametrize(
    "exc, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "state-disk-full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "state-disk-full"),
        (OSError(errno.EROFS, "Read-only file system"), "state-read-only"),
        (OSError(errno.EACCES, "Permission denied"), "state-read-only"),
        (OSError(errno.EIO, "Input/output error"), "state-write-failed"),
        (sqlite3.OperationalError("database or disk is full"), "state-disk-full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "state-read-only"),
        (sqlite3.OperationalError("disk I/O error"), "state-write-failed"),
    ],
)
def test_store_reason_names_the_fault(exc, reason):
    assert store_reason(exc) == reason


@pytest.mark.logic
def test_probe_write_of_a_writable_store_leaves_nothing(tmp_path):
    s = Store(str(tmp_path))
    s.probe_write()
    s.probe_write()
    assert os.listdir(tmp_path / "logs") == [] and s.list() == []
    s.close()


@pytest.mark.logic
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only file anyway")
def test_probe_write_names_a_database_it_cannot_write(tmp_path):
    Store(str(tmp_path)).close()
    (tmp_path / "jobs.sqlite3").chmod(0o444)
    s = Store(str(tmp_path))
    with pytest.raises(StoreError) as e:
        s.probe_write()
    assert e.value.reason == "state-read-only" and e.value.path.endswith("jobs.sqlite3")
