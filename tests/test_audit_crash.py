"""The audit log under a crash (issue 24): 50 writes spread over 10 s against the real
daemon process, `kill -9`, a restart: every line of the file parses, and every write the
daemon acknowledged more than 1 s before the kill has its line.  (`kill -9` leaves the
page cache intact, so the fsync bound itself is tested apart, in test_audit.py, by
counting syncs through the injectable sync function.)"""

import json
import os
import stat
import time

import pytest

from mlbench_daemon import tokens
from mlbench_daemon.client import Client
from mlbench_daemon.vocabulary import Role
from tests.helpers import HANG, Served, free_port, serves, stop_process, wait_for

WRITES = 50
SPREAD_S = 10.0


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_every_acknowledged_write_survives_a_kill_9_and_every_line_parses(cluster, tmp_path):
    tokens_file = str(tmp_path / "tokens.json")
    token = tokens.add(tokens_file, "alice", Role.SUBMITTER)
    port = free_port()
    state = tmp_path / "state"
    config = cluster.write_config(
        tmp_path / "daemon.toml",
        state,
        server={"port": port, "tokens_file": tokens_file},
        mpi={"queue_size": 100},
        log={"level": "warning"},
    )
    daemon = Served(config, state, port, None)
    daemon.start()
    try:
        wait_for(lambda: serves(daemon.url), what="the daemon to serve")
        client = Client(daemon.url, token)
        wait_for(
            lambda: sum(n["phase"] == "Running" for n in client.json("GET", "/api/nodes/")) == 3,
            what="every worker Running",
        )
        acked = []  # (monotonic time the answer came, job id)
        start = time.monotonic()
        for n in range(WRITES):
            time.sleep(max(0.0, start + n * SPREAD_S / WRITES - time.monotonic()))
            answer = client.call("POST", "/api/mpi_jobs/", {"program": ["true"], "wait": False})
            assert answer.status == 202, answer.body
            acked.append((time.monotonic(), answer.json()["id"]))
        killed_at = time.monotonic()
        daemon.process.kill()  # SIGKILL: no shutdown, no final sync
        daemon.process.wait(HANG)
        daemon.start()
        wait_for(lambda: serves(daemon.url), what="the daemon to serve again")
        path = state / "audit.log"
        raw = path.read_bytes()
        lines = [json.loads(line) for line in raw.splitlines()]  # every line parses
        assert raw.endswith(b"\n")
        logged = {x["job"] for x in lines if x["method"] == "POST" and x["outcome"] == "ok"}
        due = [job for at, job in acked if at < killed_at - 1.0]
        assert len(due) >= WRITES - 10 and set(due) <= logged
        assert all(x["token"] == "alice" and x["status"] == 202 for x in lines)
        assert token not in raw.decode() and token.partition(".")[2] not in raw.decode()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        stop_process(daemon.process)
