"""Per-rank output (`rank_output`) on the real cluster, once per launcher: the launcher's
own tag option in `command`, `logs?rank=N` holding only rank N's lines while the job's log
holds every line, a kill -9 of the daemon mid-output losing and doubling nothing in the
rank logs, and failure attribution reading the tagged output.

Every worker has 2 slots (6 in all) and jobs run np=4, so a host holds two ranks."""

import json
import os
import re
import subprocess
import sys

import pytest

from mlbench_daemon.client import ClientError
from mlbench_daemon.jobs import flavour
from tests.helpers import call_port, served
from tests.test_flavours import FLAVOURS, mpi_or_skip, node_of_rank
from tests.test_jobs import http, wait_for, wait_job_ended

SLOTS = {"label_rules": [{"match": "*-worker-*", "labels": {"slots": "2"}}]}
LINES = 3000  # rank 0's --bytes output: lines of 99 digits and a newline
DIGITS = ("0123456789" * 10)[:99].encode() + b"\n"


def log(url, job_id, **query):
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return http(f"{url}/api/mpi_jobs/{job_id}/logs?{q}")[1]


def whole(url, job_id, rank=None):
    """A log read page by page (X-Next-Offset), as a client does."""
    out, offset = b"", 0
    while True:
        extra = {} if rank is None else {"rank": rank}
        data = log(url, job_id, offset=offset, **extra)
        if not data:
            return out
        out, offset = out + data, offset + len(data)


def rank_line(job, rank, n=4):
    """The report line rank `rank` printed, as it appears in the untagged output."""
    m = re.search(rf"rank {rank} of {n} on [0-9.]+: sum=\d+ expected=\d+\n", job["response"])
    assert m, job["response"][-2000:]
    return m[0].encode()


@pytest.mark.parametrize("name", FLAVOURS)
def test_rank_logs_hold_each_ranks_lines_and_survive_a_kill_9(cluster, tmp_path, name):
    mpi = mpi_or_skip(cluster, name)
    sections = {"ssh": {"use_system_known_hosts": False}, "mpi": mpi, "discovery": SLOTS}
    with served(cluster, tmp_path, **sections) as d:
        prog = [*mpi["program"], "--bytes", str(LINES * 100), "--sleep", "4"]
        body = {"program": prog, "np": 4, "rank_output": True, "wait": False}
        _, answer = http(d.url + "/api/mpi_jobs/", "POST", body)
        job_id = json.loads(answer)["id"]
        wait_for(lambda: len(log(d.url, job_id, rank=0)) > 50_000, what="rank 0's output")
        d.kill_and_restart()  # mid-output: the rank logs hold bytes past their checkpoint
        job = wait_job_ended(d.url, job_id)
        _, job = call_port(d.port, "GET", f"/api/mpi_jobs/{job_id}")
        state = (job["state"], job["flavour"], job["rank_output"])
        assert state == ("succeeded", name, True), whole(d.url, job_id)[-3000:]
        assert str(flavour.get(name).tag_option)[1:-1] in job["command"]
        combined = whole(d.url, job_id)
        job["response"] = flavour.untag(name, combined.decode())
        total = 0
        for r in range(4):
            got = whole(d.url, job_id, r)
            want = rank_line(job, r)
            if r == 0:
                want += b"allreduce ok 4\n" + DIGITS * LINES
            assert got == want, (r, len(got), len(want), got[:300])
            assert log(d.url, job_id, rank=r, tail=len(DIGITS)) == want[-len(DIGITS) :]
            total += len(got)
        # the job's log keeps every byte, tagged (a launcher may cut a line in pieces, each
        # tagged: OpenMPI 4 does at its forwarding buffer's size), and the launcher's own
        # lines untagged (OpenMPI 5 may warn "plm:ssh: ... setpgid ... failed")
        tag = flavour.get(name).tag
        launcher = b"".join(line for line in combined.splitlines(True) if not tag.match(line))
        assert len(job["response"].encode()) - len(launcher) == total
        assert len(launcher) < 1000, launcher
        status, err = call_port(d.port, "GET", f"/api/mpi_jobs/{job_id}/logs?rank=4")
        assert (status, err["field"]) == (400, "rank")
        assert err["message"] == f"rank: job {job_id} has ranks 0 to 3, not 4"


def test_a_rank_follow_streams_one_ranks_lines_and_rank_needs_rank_output(cluster, tmp_path):
    mpi = mpi_or_skip(cluster, "openmpi4")
    sections = {"ssh": {"use_system_known_hosts": False}, "mpi": mpi, "discovery": SLOTS}
    with served(cluster, tmp_path, **sections) as d:
        prog = [*mpi["program"], "--sleep", "2"]
        body = {"program": prog, "np": 4, "rank_output": True, "wait": False}
        job_id = json.loads(http(d.url + "/api/mpi_jobs/", "POST", body)[1])["id"]
        followed = log(d.url, job_id, rank=3, follow=1)  # from the start until the job ends
        assert re.fullmatch(rb"rank 3 of 4 on [0-9.]+: sum=6 expected=6\n", followed), followed
        plain = json.loads(http(d.url + "/api/mpi_jobs/", "POST", {"program": prog})[1])
        assert plain["rank_output"] is False and "--tag-output" not in plain["command"]
        status, err = call_port(d.port, "GET", f"/api/mpi_jobs/{plain['id']}/logs?rank=0")
        assert (status, err["field"]) == (400, "rank")
        assert "not submitted with rank_output: true" in err["message"]
        with pytest.raises(ClientError, match="HTTP 400"):
            log(d.url, job_id, rank="x")
        # the CLI: run with --rank-output, then logs --rank N of that job
        cli = [sys.executable, "-m", "mlbench_daemon", "--url", d.url]
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        r = subprocess.run(
            [*cli, "--json", "run", "--np", "4", "--rank-output", "--", *mpi["program"]],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        ran = json.loads(r.stdout[r.stdout.index("{") :])
        assert ran["rank_output"] and "--tag-output" in ran["command"]
        r = subprocess.run(
            [*cli, "logs", "--rank", "2", ran["id"]], capture_output=True, env=env, timeout=60
        )
        assert r.returncode == 0 and r.stdout == whole(d.url, ran["id"], 2), r.stderr
        assert re.fullmatch(rb"rank 2 of 4 on [0-9.]+: sum=6 expected=6\n", r.stdout)


@pytest.mark.parametrize("name", FLAVOURS)
def test_attribution_names_the_failing_rank_with_rank_output_on(cluster, tmp_path, name):
    """As tests/test_flavours.py's exit-3 case, with every line tagged: rank 1 exits 3
    while the others still run, the master in the middle of the host list."""
    mpi = mpi_or_skip(cluster, name)
    w = sorted(cluster.workers, key=lambda h: h.index)
    program = ["/bin/sh", "-c", '"$0" "$@" || exit $?; sleep 5', mpi["program"][0],
               "--exit-rank", "1", "3"]  # fmt: skip
    sections = {"ssh": {"use_system_known_hosts": False}, "mpi": mpi}
    with served(cluster, tmp_path, **sections) as d:
        body = {"program": program, "master": w[1].name, "rank_output": True}
        _, job = call_port(d.port, "POST", "/api/mpi_jobs/", body)
    assert (job["state"], job["exit_code"], job["flavour"]) == ("failed", 3, name), job
    assert flavour.get(name).tag.search(job["response"].encode())
    where = node_of_rank(job, 1)
    f = job["failure"]
    assert (f["kind"], f["exit_code"]) == ("rank-exit", 3), (f, job["response"])
    if name == "mpich":  # Hydra names neither rank nor host of a non-zero exit by default
        assert (f["rank"], f["node"]) == (None, None), f
    else:
        assert (f["rank"], f["node"]) == (1, where), (f, job["response"])
