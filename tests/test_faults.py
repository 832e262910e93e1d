"""Faults of the head node's own state dir while the daemon runs (issue 19).

Real parts: the daemon serving the namespace cluster, its state dir on a small tmpfs
that is filled up, or under a read-only bind mount put over it at run time."""

import json
import os
import subprocess
import urllib.request

import pytest

from tests.helpers import HANG, call_port, http, served, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _health(url):
    return json.loads(http(url + "/healthz")[1])


def _post(url):
    """POST a job that is never waited for -> (status, decoded answer), whatever the status."""
    port = int(url.rsplit(":", 1)[1])
    return call_port(port, "POST", "/api/mpi_jobs/", {"program": ["/bin/true"], "wait": False})


def _gauge(url, reason):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return f'mlbench_daemon_state_fault{{reason="{reason}"}} 1.0' in text


def _fill(path):
    """Write zeros into `path` until the filesystem is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("fault", ["state-disk-full", "state-read-only"])
def test_a_state_dir_that_cannot_be_written_degrades_and_recovers(cluster, tmp_path, fault):
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    try:
        with served(cluster, tmp_path, ssh={"use_system_known_hosts": False}) as d:
            assert _health(d.url)["status"] == "ok" and "reason" not in _health(d.url)
            filler = state / "filler"
            if fault == "state-disk-full":
                _fill(filler)
            else:
                subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
            try:
                wait_for(lambda: _health(d.url)["status"] == "degraded", HANG, "healthz degraded")
                health = _health(d.url)
                assert health["reason"] == fault
                assert "/" not in json.dumps(health)  # no path, no error text without a token
                status, body = _post(d.url)
                assert status == (507 if fault == "state-disk-full" else 503), body
                assert body["error"] == fault
                assert _gauge(d.url, fault)
            finally:
                if fault == "state-disk-full":
                    filler.unlink()
                else:
                    subprocess.run(["umount", str(state)], check=True)
            wait_for(lambda: _health(d.url)["status"] == "ok", HANG, "healthz ok again")
            assert not _gauge(d.url, fault)
            status, body = _post(d.url)
            assert status == 202, body
            job = body["id"]
            wait_for(
                lambda: json.loads(http(f"{d.url}/api/mpi_jobs/{job}")[1])["state"] == "succeeded",
                HANG,
                "the job after recovery",
            )
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
