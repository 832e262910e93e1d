"""A job's JSON answers, byte for byte, against golden files (tests/golden/).

The golden files were captured from the code before jobs.py became a package, with
the real daemon serving HTTP on the real namespace cluster.  Each answer (status
line, the headers that carry meaning, the body bytes) is compared after
normalising only what must differ between runs:

- job ids (20 hex digits) -> ``<job-1>``, ``<job-2>``, ... in order of appearance;
- timestamps (``created``/``started``/``finished``) -> ``<time>``;
- the random cluster's addresses and host names -> ``<ip:w0>``/``<w0>`` (by worker
  index), its release label -> ``<release>``;
- OpenMPI's name of a process in mpirun's exit notice (``[[18820,1],0]``: the number
  is mpirun's job id, derived from its pid) -> ``[[<mpi-job>,1],0]``;
- OpenMPI's own ``[host:pid] ...`` diagnostic lines, which mpirun adds to the output
  now and then under load (e.g. ``plm:rsh: Warning: setpgid(...) failed``, a race
  between its fork and the child's exec), are removed;
- mpirun's notices framed by lines of dashes (after a rank exits non-zero it prints
  one or two, depending on timing inside mpirun) are removed, from the answer and
  from the golden file alike (the files stay as captured).
- a job's ``log_bytes`` (the size of its log, which counts those diagnostic lines and
  notices) -> ``<bytes>``; tests/test_web.py checks the value against the log.

A change that alters a job's output on purpose regenerates the files in the same
commit (``MLBENCH_UPDATE_GOLDEN=1``) and says so.
"""

import os
import re
from pathlib import Path

import pytest

from tests.helpers import wait_for

GOLDEN = Path(__file__).resolve().parent / "golden" / "jobs"
UPDATE = bool(os.environ.get("MLBENCH_UPDATE_GOLDEN"))
KEEP_HEADERS = ("content-type", "location", "x-next-offset")
TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
MPI_PROCESS = re.compile(rb"\[\[\d+,(\d+)\],(\d+)\]")
MPI_DIAGNOSTIC = re.compile(rb"\[[\w.-]+:\d+\] [^\n\\]*(?:\\(?!n)[^\n\\]*)*(?:\\n|\n)")
MPI_NOTICE = re.compile(rb"-{40,}(?:\\n|\n).*?-{40,}(?:\\n|\n)", re.S)
JOB_ID = re.compile(rb"(?<![0-9a-f])[0-9a-f]{20}(?![0-9a-f])")
LOG_BYTES = re.compile(rb'"log_bytes": \d+')

# Rank 0 alone prints, so the output does not depend on how ranks interleave.
RANK0 = 'if [ "$OMPI_COMM_WORLD_RANK" = 0 ]; then {}; fi'


class Normaliser:
    def __init__(self, cluster):
        workers = sorted(cluster.workers, key=lambda h: h.index)
        subs = {}
        for i, h in enumerate(workers):
            subs[h.ip.encode()] = f"<ip:w{i}>".encode()
            subs[h.name.encode()] = f"<w{i}>".encode()
        subs[cluster.release.encode()] = b"<release>"
        self.subs = subs
        alts = b"|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True))
        self.names = re.compile(rb"(?<![\w.-])(" + alts + rb")(?![\w-]|\.\d)")
        self.ids = {}

    def _id(self, m):
        return self.ids.setdefault(m.group(0), b"<job-%d>" % (len(self.ids) + 1))

    def __call__(self, data):
        data = JOB_ID.sub(self._id, data)
        data = TIME.sub(b"<time>", data)
        data = LOG_BYTES.sub(b'"log_bytes": <bytes>', data)
        data = MPI_DIAGNOSTIC.sub(b"", data)
        data = MPI_PROCESS.sub(rb"[[<mpi-job>,\1],\2]", data)
        return self.names.sub(lambda m: self.subs[m.group(1)], data)


def answer(norm, status, headers, body):
    head = [f"{status}".encode()]
    head += [f"{k}: {headers[k]}".encode() for k in KEEP_HEADERS if k in headers]
    return norm(b"\n".join(head) + b"\n\n" + body)


def check(name, got):
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(got)
    assert path.exists(), f"no golden file {path.name}: run with MLBENCH_UPDATE_GOLDEN=1"
    want = MPI_NOTICE.sub(b"", path.read_bytes())
    got = MPI_NOTICE.sub(b"", got)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        at = min(len(got), len(want)) if at is None else at
        lo = max(0, at - 80)
        pytest.fail(
            f"{name}: the answer differs from golden/jobs/{path.name} at byte {at}:\n"
            f"  got:  {got[lo : at + 120]!r}\n  want: {want[lo : at + 120]!r}"
        )


def sh_program(script):
    return ["/bin/sh", "-c", script, "sh"]


@pytest.mark.timeout(600)
def test_job_answers_match_the_golden_files(start_daemon, cluster):
    # connect_timeout_s bounds an SSH channel's opening: far above server.cancel_answer_s
    # (2 s), so the DELETEs of a job whose master is frozen answer before the kill fails
    d = start_daemon(mpi={"max_concurrent_jobs": 1}, ssh={"connect_timeout_s": 10.0})
    norm = Normaliser(cluster)
    w = sorted(cluster.workers, key=lambda h: h.index)
    got = {}

    def call(name, method, path, body=None):
        status, headers, raw = d.request(method, path, body)
        got[name] = answer(norm, status, headers, raw)
        return status, raw

    # 1. a sync job on two named nodes with env, invalid UTF-8, quotes and controls
    prog = sh_program(RANK0.format(r'printf "hello \"world\"\n\377\376 tab\t end\n"; echo "$G"'))
    body = {
        "program": prog,
        "env": {"G": "h\u00e9llo \u2603"},
        "np": 2,
        "nodes": [w[2].name, w[1].name],
        "master": w[2].name,
    }
    status, raw = call("01-sync-succeeded", "POST", "/api/mpi_jobs", body)
    assert status == 200, raw
    ok_id = JOB_ID.search(raw).group(0).decode()

    # 2. a sync job that exits 3 (np 1 on the default master)
    status, raw = call(
        "02-sync-failed",
        "POST",
        "/api/mpi_jobs/",
        {"program": sh_program("echo out; exit 3"), "np": 1, "timeout_s": 100},
    )
    assert status == 200, raw

    # 3. an async job stopped by its timeout
    status, raw = call(
        "03-async-submitted",
        "POST",
        "/api/mpi_jobs",
        {
            "program": sh_program(RANK0.format("echo started; sleep 60")),
            "timeout_s": 2,
            "wait": False,
        },
    )
    assert status == 202, raw
    timeout_id = JOB_ID.search(raw).group(0).decode()
    assert d.wait_job(timeout_id)["state"] == "cancelled"
    call("04-timed-out-record", "GET", f"/api/mpi_jobs/{timeout_id}")

    # 4. a job cancelled mid-run, and one queued behind it, cancelled while queued
    status, raw = call(
        "05-async-to-cancel",
        "POST",
        "/api/mpi_jobs",
        {"program": sh_program(RANK0.format("echo ready; sleep 60")), "wait": False},
    )
    # job 3 reads final before its run thread has given its slot back (its master's dir
    # is removed first): this job is queued or launching by a race the test cannot see,
    # so the golden pins the answer's shape with either reason
    got["05-async-to-cancel"] = got["05-async-to-cancel"].replace(
        b'"waiting": {"reason": "queued"', b'"waiting": {"reason": "launching"'
    )
    cancel_id = JOB_ID.search(raw).group(0).decode()
    status, raw = call(
        "06-async-queued",
        "POST",
        "/api/mpi_jobs",
        {"program": sh_program("echo never"), "wait": False, "np": 1},
    )
    queued = JOB_ID.search(raw).group(0).decode()
    wait_for(
        lambda: b"ready" in d.request("GET", f"/api/mpi_jobs/{cancel_id}/logs")[2],
        what="the job to start",
    )
    status, _ = call("07-cancel-queued", "DELETE", f"/api/mpi_jobs/{queued}")
    assert status == 200  # dequeued: final at once
    # the master's sshd frozen: the kill cannot be delivered, so the answer comes after
    # server.cancel_answer_s, 202 with the job still running; a second DELETE answers
    # 202 at once; once thawed the cancel goes on to its end
    master = w[0]  # the job's master (np unset: the first of the sorted workers)
    cluster.freeze(master)
    try:
        status, _ = call("08-cancel-running", "DELETE", f"/api/mpi_jobs/{cancel_id}")
        assert status == 202
        status, _ = call("09-cancel-again", "DELETE", f"/api/mpi_jobs/{cancel_id}")
        assert status == 202
    finally:
        cluster.thaw(master)
    assert d.wait_job(cancel_id)["state"] == "cancelled"
    call("09b-cancelled-record", "GET", f"/api/mpi_jobs/{cancel_id}")
    status, _ = call("09c-cancel-final", "DELETE", f"/api/mpi_jobs/{cancel_id}")
    assert status == 409

    # 5. reading: records, list, logs paged and followed
    call("10-record", "GET", f"/api/mpi_jobs/{ok_id}")
    call("11-list", "GET", "/api/mpi_jobs?limit=10")
    call("12-logs-page-1", "GET", f"/api/mpi_jobs/{ok_id}/logs?offset=0&limit=7")
    call("13-logs-page-2", "GET", f"/api/mpi_jobs/{ok_id}/logs?offset=7&limit=65536")
    call("14-logs-past-end", "GET", f"/api/mpi_jobs/{ok_id}/logs?offset=100000")
    call("15-logs-follow", "GET", f"/api/mpi_jobs/{ok_id}/logs?follow=1&offset=3")

    # 6. errors
    call("16-bad-request", "POST", "/api/mpi_jobs", {"np": 0})
    call("17-unknown-field", "POST", "/api/mpi_jobs", {"npp": 2})
    call("18-not-found", "GET", "/api/mpi_jobs/0123456789abcdef0123")
    call("19-logs-not-found", "GET", "/api/mpi_jobs/nosuchjob/logs")
    call("20-unknown-node", "POST", "/api/mpi_jobs", {"nodes": ["no-such-node"]})

    for name, data in got.items():
        check(name, data)
    if not UPDATE:
        stale = {p.stem for p in GOLDEN.glob("*.txt")} - set(got)
        assert not stale, f"golden files no test answer produced: {sorted(stale)}"
