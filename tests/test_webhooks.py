"""Webhooks against the real daemon process (`mlbench-daemon serve`) on the test cluster,
with a real receiver on loopback (tests/receiver.py): a hanging receiver slows no read of
the API; the receiver then down while the daemon is killed with `kill -9` and started
again; once the receiver is back, every (job, event) arrives, signed, and any event that
arrives twice (a POST in flight at the kill) carries the same id and bytes.

The receiver is down 60 s (the backoff is capped at 2 s: the outage spans many retries and
the restart)."""

import re
import time

import pytest

from mlbench_daemon.client import Client
from tests.helpers import HANG, served, serves, wait_for
from tests.receiver import Receiver, body
from tests.test_webhooks_logic import SECRET, hooks_config

JOBS = 10
DOWN_S = 60.0


def outbox(client):
    text = client.call("GET", "/metrics").body.decode()
    return float(re.search(r"^mlbench_daemon_webhook_outbox (\S+)$", text, re.M).group(1))


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_a_hanging_receiver_then_a_kill_9_loses_no_event(cluster, tmp_path):
    receiver = Receiver(SECRET).start("hang")
    hooks = hooks_config(tmp_path, receiver, backoff_s=0.5, backoff_max_s=2.0)
    try:
        with served(
            cluster, tmp_path, webhooks=hooks, mpi={"max_concurrent_jobs": 4, "queue_size": 20},
            log={"level": "warning"},
        ) as daemon:  # fmt: skip
            client = Client(daemon.url)
            ids = [
                client.json("POST", "/api/mpi_jobs/", {"program": ["true"], "wait": False})["id"]
                for _ in range(JOBS)
            ]
            slowest = 0.0  # GET /api/nodes/ while every sender may hang on the receiver
            deadline = time.monotonic() + HANG
            while any(client.json("GET", f"/api/mpi_jobs/{i}")["state"] in ("pending", "running")
                      for i in ids):  # fmt: skip
                assert time.monotonic() < deadline, "jobs never ended"
                t0 = time.monotonic()
                assert client.call("GET", "/api/nodes/").status == 200
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.05)
            assert slowest < 1.0, slowest
            # what each job made: its start if it ran (a launch may fail at a high load), its end
            ends = [client.json("GET", f"/api/mpi_jobs/{i}") for i in ids]
            expected = {f"{j['id']}.job.{j['state']}" for j in ends} | {
                f"{j['id']}.job.started" for j in ends if j["started"] is not None
            }
            assert outbox(client) == len(expected)  # nothing delivered to a hanging receiver
            receiver.stop()  # down
            down_at = time.monotonic()
            daemon.process.kill()  # SIGKILL while every delivery is pending
            daemon.process.wait(HANG)
            daemon.start()
            wait_for(lambda: serves(daemon.url), what="the daemon to serve again")
            assert outbox(client) == len(expected)
            time.sleep(max(0.0, down_at + DOWN_S - time.monotonic()))
            receiver.start("ok")
            wait_for(lambda: outbox(client) == 0, timeout=120, what="every event delivered")
    finally:
        receiver.stop()
    got = receiver.delivered()
    assert {g["id"] for g in got} == expected and len(expected) >= JOBS + 1
    assert all(g["verified"] for g in got) and receiver.invalid() == []
    for cut in receiver.hung:  # a POST the hanging receiver never answered: resent later on
        assert all(g["attempt"] > cut["attempt"] for g in got if g["id"] == cut["id"])
    first = {}
    for g in got:  # duplicates only as the same event: same id, same bytes
        assert first.setdefault(g["id"], g["body"]) == g["body"]
        assert body(g)["id"] == g["id"] and body(g)["event"] == g["event"]
