"""Failure attribution end to end on the real cluster: each fault is caused for real
(a rank's exit code, a SIGKILL from outside, a missing program, a host key the master
lacks, a timeout, a cancel) and the job's `failure` names it, in the record, the sync
answer and GET.  Every worker has 2 slots and jobs run np=5 with the middle worker as
master, so rank i is not on node i: OpenMPI 4 places ranks 0,1 on the master, 2,3 on
the first other node, 4 on the next."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import wait_for

SLOTS = {"label_rules": [{"match": "*-worker-*", "labels": {"slots": "2"}}]}
KEYS = {"kind", "node", "host", "rank", "exit_code", "signal", "message", "hint"}


@pytest.fixture
def d(start_daemon):
    return start_daemon(discovery=SLOTS)


def body(cluster, *args, **extra):
    w = cluster.workers
    return {"program": [str(cluster.mpi_program), *args], "np": 5, "master": w[1].name, **extra}


def rank_node(cluster, rank):
    """Where OpenMPI 4 puts `rank` for body(): the master's 2 slots, then the others."""
    w = cluster.workers
    return [w[1], w[1], w[0], w[0], w[2]][rank]


def test_a_rank_exiting_3_on_a_chosen_node(cluster, d):
    target = cluster.workers[0]
    status, job = d.json("POST", "/api/mpi_jobs/", body(cluster, "--exit-rank", "3", "3"))
    assert status == 200 and job["state"] == "failed" and job["exit_code"] == 3
    f = job["failure"]
    assert set(f) == KEYS
    assert (f["kind"], f["rank"], f["exit_code"], f["signal"]) == ("rank-exit", 3, 3, None)
    assert rank_node(cluster, 3) is target and f["node"] == target.name
    assert f["host"] == target.ip
    assert d.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["failure"] == f


def _rank_process(cluster, rank):
    """(pid, netns name) of the MPI program's process of `rank`, once it runs."""
    for p in os.listdir("/proc"):
        try:
            if not p.isdigit() or os.stat(f"/proc/{p}").st_uid != cluster.uid:
                continue
            if Path(f"/proc/{p}/comm").read_text().strip() != "mpiprog":
                continue
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            ns = subprocess.run(["ip", "netns", "identify", p], capture_output=True, text=True)
            return int(p), ns.stdout.strip()
    return None


def test_a_rank_killed_with_sigkill_on_a_chosen_node(cluster, d):
    target = cluster.workers[2]
    status, job = d.json("POST", "/api/mpi_jobs/", body(cluster, "--sleep", "30", wait=False))
    assert status == 202
    # killed inside MPI_Init, a rank is reported by mpirun without its rank number:
    # kill it once every rank has passed the allreduce
    wait_for(
        lambda: d.request("GET", f"/api/mpi_jobs/{job['id']}/logs")[2].count(b" of 5 on ") == 5,
        what="every rank's line",
    )
    found = []
    wait_for(lambda: found.append(_rank_process(cluster, 4)) or found[-1], what="rank 4")
    pid, ns = found[-1]
    assert ns == target.ns  # the rank runs where the map says, seen from outside
    os.kill(pid, 9)
    job = d.wait_job(job["id"])
    f = job["failure"]
    assert (f["kind"], f["rank"], f["signal"]) == ("rank-signal", 4, 9)
    assert f["node"] == target.name and "SIGKILL" in f["message"]


def test_a_missing_program_named_through_the_masters_host_name(cluster, start_daemon):
    """OpenMPI names its own node by host name; the master's host name here differs
    from its node name, so only `uname -n` (asked at connect) maps it back."""
    master = cluster.workers[1]
    uts = ["nsenter", "-t", str(master.init_pid), "-u"]
    subprocess.run([*uts, "hostname", f"box-{cluster.id}"], check=True)
    try:
        d = start_daemon(discovery=SLOTS)
        wait_for(
            lambda: any(
                n["hostname"] == f"box-{cluster.id}" for n in d.json("GET", "/api/nodes/")[1]
            ),
            what="the host name",
        )
        b = dict(body(cluster), program=["/nonexistent/program"])
        status, job = d.json("POST", "/api/mpi_jobs/", b)
    finally:
        subprocess.run([*uts, "hostname", master.name], check=True)
    assert status == 200 and job["state"] == "failed"
    f = job["failure"]
    assert f["kind"] == "exe-not-found" and "/nonexistent/program" in f["message"]
    assert (f["host"], f["node"]) == (f"box-{cluster.id}", master.name)


def test_a_worker_the_master_cannot_ssh_to(cluster, d):
    """mpirun's own text names no host; the daemon runs the preflight before the job
    is final, so the sync answer already names the worker and the failing check."""
    w = cluster.workers
    kh = cluster.home / ".ssh" / "known_hosts"
    saved = kh.read_text()
    kh.write_text("".join(line for line in saved.splitlines(True) if w[2].ip not in line))
    try:
        status, job = d.json("POST", "/api/mpi_jobs/", body(cluster))
    finally:
        kh.write_text(saved)
    assert status == 200 and job["state"] == "failed"
    f = job["failure"]
    assert f["kind"] == "daemon-launch" and f["node"] == w[2].name
    assert [(c["node"], c["check"]) for c in f["checks"]] == [(w[2].name, "master-ssh")]
    assert "Host key verification failed" in f["checks"][0]["message"]
    assert "known_hosts" in f["hint"]
    assert d.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["failure"] == f


def test_a_timeout(cluster, d):
    status, job = d.json("POST", "/api/mpi_jobs/", body(cluster, "--sleep", "30", timeout_s=2))
    assert status == 200 and job["state"] == "cancelled"
    f = job["failure"]
    assert f["kind"] == "timeout" and f["node"] is None and "timeout_s" in f["hint"]


def test_a_cancel_and_the_metric(cluster, d):
    _, job = d.json("POST", "/api/mpi_jobs/", body(cluster, "--sleep", "30", wait=False))
    wait_for(lambda: _rank_process(cluster, 0), what="rank 0")
    status, job = d.json("DELETE", f"/api/mpi_jobs/{job['id']}")
    assert status in (200, 202)  # 202: the sweep took longer than server.cancel_answer_s
    job = d.wait_job(job["id"])
    assert job["state"] == "cancelled"
    assert job["failure"]["kind"] == "cancelled"
    _, _, metrics = d.request("GET", "/metrics")
    assert b'mlbench_daemon_job_failures_total{kind="cancelled"}' in metrics


def test_a_succeeded_job_has_no_failure(cluster, d):
    status, job = d.json("POST", "/api/mpi_jobs/", body(cluster))
    assert status == 200 and job["state"] == "succeeded" and job["failure"] is None


def test_run_prints_the_root_cause_block(cluster, d):
    w = cluster.workers
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run(
        ["python3", "-m", "mlbench_daemon", "--url", d.url, "run", "--np", "5",
         "--master", w[1].name, "--", str(cluster.mpi_program), "--exit-rank", "2", "7"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 7
    assert "Root Cause (first observed failure):" in r.stderr
    assert "rank-exit" in r.stderr and f"{w[0].name} (launcher: {w[0].ip})" in r.stderr
    assert "rank 2" in r.stderr
    assert "Root Cause" not in r.stdout
