"""Cancel never holds a server thread (issue 19, item 2): real sshd, real mpirun.

A job whose master's sshd is frozen (SIGSTOP: the kill cannot reach it) is cancelled by
10 DELETEs at once: each answers 202 within server.cancel_answer_s, one kill and sweep
runs (one cancel thread), GET /api/nodes/ keeps answering within 1 s, and the CLI's
``cancel`` follows the 202 until the job is cancelled once the master thaws.
"""

import concurrent.futures
import threading
import time

import pytest

from mlbench_daemon import cli
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(300)

ANSWER_S = 2.0  # server.cancel_answer_s (the default)


def sh_program(script):
    return ["/bin/sh", "-c", script, "sh"]


def cancel_threads(job_id):
    return [t for t in threading.enumerate() if t.name == f"job-{job_id}-cancel"]


def test_deletes_of_a_stuck_job_answer_202_and_never_hold_the_server(start_daemon, cluster):
    d = start_daemon(server={"cancel_answer_s": ANSWER_S})
    master = sorted(cluster.workers, key=lambda h: h.index)[0]
    status, job = d.json(
        "POST",
        "/api/mpi_jobs/",
        {
            "program": sh_program("echo ready; sleep 60"),
            "np": 1,
            "nodes": [master.name],
            "master": master.name,
            "wait": False,
        },
    )
    assert status == 202, job
    job_id = job["id"]
    wait_for(
        lambda: b"ready" in d.request("GET", f"/api/mpi_jobs/{job_id}/logs")[2],
        what="the job to start",
    )
    cluster.freeze(master)  # its sshd tree: the kill cannot be delivered while frozen
    try:

        def delete():
            t = time.monotonic()
            status, _, _ = d.request("DELETE", f"/api/mpi_jobs/{job_id}")
            return status, time.monotonic() - t

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            deletes = [pool.submit(delete) for _ in range(10)]
            slowest = 0.0
            while not all(f.done() for f in deletes):
                t = time.monotonic()
                assert d.request("GET", "/api/nodes/")[0] == 200
                slowest = max(slowest, time.monotonic() - t)
            answers = [f.result() for f in deletes]
        assert slowest < 1.0, f"GET /api/nodes/ took {slowest:.2f} s during the DELETEs"
        assert [s for s, _ in answers] == [202] * 10, answers
        assert max(took for _, took in answers) < ANSWER_S + 3.0, answers  # a generous bound
        assert len(cancel_threads(job_id)) == 1  # one kill and sweep, not ten
        assert d.json("GET", f"/api/mpi_jobs/{job_id}")[1]["state"] == "running"

        # the CLI: its DELETE gets 202 too, and it polls until the job is final
        got = {}

        def run_cli():
            got["code"] = cli.main(["--url", d.url, "cancel", job_id], environ={}, out=Out())

        cli_thread = threading.Thread(target=run_cli)
        cli_thread.start()
        time.sleep(1.0)  # the CLI is polling now (its DELETE answered at once)
        assert cli_thread.is_alive() and "code" not in got
    finally:
        cluster.thaw(master)
    cli_thread.join(60)
    assert got.get("code") == 0
    assert Out.last.strip() == f"job {job_id}: cancelled"
    done = d.wait_job(job_id)
    assert (done["state"], done["reason"]) == ("cancelled", "cancelled")
    assert done["error"].startswith("cancelled: process group "), done["error"]
    assert cancel_threads(job_id) == []
    status, _, raw = d.request("DELETE", f"/api/mpi_jobs/{job_id}")
    assert status == 409, raw


class Out:
    """The CLI's stdout (text), kept for the test."""

    last = ""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)
        Out.last = "".join(self.parts)
        return len(s)

    def flush(self):
        pass
