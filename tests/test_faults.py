"""Faults of the head node's own state dir while the daemon runs (issue 19).

Real parts: the daemon serving the namespace cluster, its state dir on a small tmpfs
that is filled up, or under a read-only bind mount put over it at run time; a job whose
output arrives while the disk is full."""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import urllib.request

import pytest

from tests.cluster.cluster import STATE_ROOT
from tests.helpers import HANG, call_port, http, served, wait_for
from tests.test_flavours import mpi_or_skip

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _health(url):
    return json.loads(http(url + "/healthz")[1])


def _healthy(url):
    try:
        return _health(url)["status"] == "ok"
    except OSError:  # not serving yet
        return False


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


# --- a disk that fills while a job runs (issue 19, item 1) ------------------------------

BIG = 2_000_000  # the bytes the job prints while the state disk is full


def _job(url, job_id):
    return json.loads(http(f"{url}/api/mpi_jobs/{job_id}")[1])


def _whole_log(url, job_id):
    """The job's log as served, read a chunk at a time."""
    data = b""
    while True:
        chunk = http(f"{url}/api/mpi_jobs/{job_id}/logs?offset={len(data)}", timeout=HANG)[1]
        if not chunk:
            return data
        data += chunk


def _follow(url, job_id, into):
    """GET ...?follow=1 until the daemon ends it; the bytes go into `into`."""
    req = f"{url}/api/mpi_jobs/{job_id}/logs?follow=1"
    with urllib.request.urlopen(req, timeout=HANG) as r:  # loopback only
        while chunk := r.read(65536):
            into.append(chunk)


@contextlib.contextmanager
def _small_state_disk(tmp_path):
    """tmp_path/state on an 8 MB tmpfs; a gate directory every host's user can read."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    gates = tempfile.mkdtemp(prefix="mlbench-gate-", dir=STATE_ROOT)
    os.chmod(gates, 0o755)
    try:
        yield state, pathlib.Path(gates)
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
        shutil.rmtree(gates, ignore_errors=True)


def _start_job_then_fill(d, state, gates):
    """A job (one rank) that prints "started", waits for the gate, then prints BIG bytes
    and "end"; the state disk is filled once it started, then the gate opened.
    -> (job id, the filler file, the whole output expected)."""
    script = f'echo started; while [ ! -e {gates}/go ]; do sleep 0.05; done; ' \
        f'head -c {BIG} /dev/zero | tr "\\0" a; echo; echo end'  # fmt: skip
    status, job = _post_body(d.url, {"program": ["/bin/sh", "-c", script], "np": 1, "wait": False})
    assert status == 202, job
    wait_for(lambda: _whole_log(d.url, job["id"]) == b"started\n", HANG, "the job to start")
    filler = state / "filler"
    _fill(filler)
    (gates / "go").touch()
    return job["id"], filler, b"started\n" + b"a" * BIG + b"\nend\n"


def _post_body(url, body):
    port = int(url.rsplit(":", 1)[1])
    return call_port(port, "POST", "/api/mpi_jobs/", body)


@pytest.mark.parametrize("flavour", ["openmpi4", "mpich"])
def test_a_state_disk_that_fills_mid_job_is_caught_up_once_freed(cluster, tmp_path, flavour):
    """The job's output is kept on its master while the log cannot take it: the job shows
    store_error and waits in store-retry, /healthz is degraded, a POST gets 507, a log
    follower ends with what there is; once space is freed, without a restart, the job
    ends succeeded with every byte, once."""
    mpi = mpi_or_skip(cluster, flavour)
    with _small_state_disk(tmp_path) as (state, gates):
        with served(cluster, tmp_path, ssh={"use_system_known_hosts": False}, mpi=mpi) as d:
            job_id, filler, expected = _start_job_then_fill(d, state, gates)
            wait_for(lambda: _job(d.url, job_id)["store_error"], HANG, "the job's store_error")
            job = _job(d.url, job_id)
            assert job["state"] == "running" and job["waiting"]["reason"] == "store-retry", job
            assert job["store_error"]["reason"] == "state-disk-full", job
            assert str(state) not in job["store_error"]["message"]  # no path in the answer
            got = []
            follower = threading.Thread(target=_follow, args=(d.url, job_id, got), daemon=True)
            follower.start()
            wait_for(lambda: _health(d.url)["status"] == "degraded", HANG, "healthz degraded")
            assert _health(d.url)["reason"] == "state-disk-full"
            status, body = _post(d.url)
            assert (status, body["error"]) == (507, "state-disk-full"), body
            follower.join(HANG)
            assert not follower.is_alive(), "the log follower never ended"
            assert expected.startswith(b"".join(got)) and b"started\n" in b"".join(got)
            assert _job(d.url, job_id)["state"] == "running"  # still retrying, not given up
            filler.unlink()
            wait_for(lambda: _job(d.url, job_id)["state"] != "running", HANG, "the job's end")
            job = _job(d.url, job_id)
            assert (job["state"], job["store_error"], job["waiting"]) == ("succeeded", None, None)
            assert job["flavour"] == flavour
            assert job["log_bytes"] == len(expected)
            assert _whole_log(d.url, job_id) == expected
            wait_for(lambda: _health(d.url)["status"] == "ok", HANG, "healthz ok again")


def test_a_kill_while_the_state_disk_is_full_loses_nothing(cluster, tmp_path):
    """kill -9 while the job's output cannot be written: after space is freed and the
    daemon started again, the job is re-attached and ends succeeded with its whole log."""
    with _small_state_disk(tmp_path) as (state, gates):
        with served(cluster, tmp_path, ssh={"use_system_known_hosts": False}) as d:
            job_id, filler, expected = _start_job_then_fill(d, state, gates)
            wait_for(lambda: _job(d.url, job_id)["store_error"], HANG, "the job's store_error")
            d.process.kill()
            d.process.wait(HANG)
            filler.unlink()
            d.start()
            wait_for(lambda: _healthy(d.url), HANG, "the daemon to serve, ok")
            wait_for(lambda: _job(d.url, job_id)["state"] != "running", HANG, "the job's end")
            job = _job(d.url, job_id)
            assert (job["state"], job["error"], job["store_error"]) == ("succeeded", None, None)
            assert _whole_log(d.url, job_id) == expected
