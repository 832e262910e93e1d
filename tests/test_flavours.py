"""The three MPI launchers (mpi.flavour): OpenMPI 4, OpenMPI 5 (PRRTE) and MPICH (Hydra).

Unit tests read the launchers' real texts (version output from the installed
launchers; failure output captured on the namespace cluster, docs/MPI-FLAVOURS.md).
The cluster tests run every job kind on the real cluster once per launcher, with
mpi.flavour left to auto, so detection is exercised each time."""

import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mlbench_daemon.errors import BadRequest
from mlbench_daemon.jobs import failure, flavour, validate
from tests.cluster import MPIS, ClusterError
from tests.helpers import cancel_job, served
from tests.test_jobs import (
    HANG,
    Env,
    argv_received,
    http,
    job_processes,
    paged_log,
    payload,
    rank_lines,
    wait_for,
    wait_job_ended,
    wait_ranks,
    written_bytes,
)

DATA = Path(__file__).resolve().parent / "data" / "launchers"
FLAVOURS = list(MPIS)


# --- detection, argv, markers (no cluster) ------------------------------------------------


@pytest.mark.logic
@pytest.mark.parametrize("name", FLAVOURS)
def test_detects_each_installed_launcher_from_its_version_output(name):
    m = MPIS[name]
    if not os.path.exists(m.launcher):
        pytest.skip(f"{m.launcher} is not installed (.ci/run installs it)")
    r = subprocess.run([m.launcher, "--version"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got, version = flavour.detect((r.stdout + r.stderr).decode())
    assert got == name
    assert re.fullmatch(r"(Open MPI|MPICH) \d+\.\d+\S*", version), version


@pytest.mark.logic
def test_detects_intel_mpi_as_hydra_and_refuses_the_unknown():
    intel = (DATA / "impi-version.txt").read_text()
    assert flavour.detect(intel) == ("mpich", "Intel MPI 2021.18.1")
    with pytest.raises(ValueError, match="not OpenMPI 4 or 5 nor MPICH"):
        flavour.detect("mpirun (Some MPI) 1.0\n")
    with pytest.raises(ValueError, match="no output"):
        flavour.detect("")


@pytest.mark.logic
def test_argv_per_flavour():
    hosts, prog = ["10.0.0.1:2", "10.0.0.2"], ["/bin/prog", "-n", "x"]
    args = ["--opt", "v"]
    assert flavour.get("openmpi4").argv("/l", args, hosts, 3, ["A", "B"], prog) == [
        "/l", "--opt", "v", "-x", "A", "-x", "B", "--host", "10.0.0.1:2,10.0.0.2", "-np", "3",
        *prog,
    ]  # fmt: skip
    assert flavour.get("openmpi5").argv("/l", [], hosts, None, ["A"], prog) == [
        "/l", "-x", "A", "--host", "10.0.0.1:2,10.0.0.2", *prog,
    ]  # fmt: skip
    # Hydra: the whole environment goes by itself; never -genv (values on argv) nor -x
    assert flavour.get("mpich").argv("/l", args, hosts, 3, ["A"], prog) == [
        "/l", "-launcher", "ssh", "--opt", "v",
        "-hosts", "10.0.0.1:2,10.0.0.2", "-n", "3", *prog,
    ]  # fmt: skip


@pytest.mark.logic
@pytest.mark.parametrize("name", ["OMPI_MCA_mlbench_job_id", "PRTE_MCA_mlbench_job_id",
                                  "MLBENCH_JOB_ID", "mlbench_job_id"])  # fmt: skip
def test_marker_names_are_reserved(name):
    with pytest.raises(BadRequest) as info:
        validate({"env": {name: "x"}}, ["/bin/prog"])
    assert info.value.field == "env"


@pytest.mark.logic
def test_rank_placement_per_flavour():
    """OpenMPI 4 fills the launcher's host first; OpenMPI 5 and Hydra go in list order
    (both measured with the launcher on the second host: docs/MPI-FLAVOURS.md)."""
    hosts = [("a", 2), ("b", 2), ("c", 1)]
    assert flavour.rank_hosts("openmpi4", hosts, 5, "b") == ["b", "b", "a", "a", "c"]
    assert flavour.rank_hosts("openmpi5", hosts, 5, "b") == ["a", "a", "b", "b", "c"]
    assert flavour.rank_hosts("mpich", hosts, None, "b") == ["a", "a", "b", "b", "c"]
    assert flavour.rank_hosts("mpich", hosts, 6, "b") is None


NODES = [(f"198.19.138.{10 + i}", f"t35fafc-mlbench-worker-{i}") for i in range(4)]
HOSTS = ",".join(f"{ip}:1" for ip, _ in NODES)
W = [name for _, name in NODES]


def attribute(name, text, command, exit_code=None):
    """The failure the daemon records for a job of flavour `name` whose launcher printed
    `text`, run on NODES[0] with `command` (the launcher's options)."""
    return failure.attribute(
        state="failed",
        reason=None,
        exit_code=exit_code,
        output=text,
        command=["/l", *command, "/opt/app/prog"],
        master=W[0],
        master_ip=NODES[0][0],
        nodes=[failure.NodeRef(n, ip, n) for ip, n in NODES],  # hostname = node name
        flavour=name,
    )


@pytest.mark.logic
@pytest.mark.parametrize(
    "name, capture, command, facts, message",
    [
        ("openmpi5", "exit3", ["--host", HOSTS, "-np", "4"],
         {"kind": "rank-exit", "rank": 0, "exit_code": 3, "node": W[0]},
         f"rank 0 on {W[0]} ({NODES[0][0]}) exited with code 3"),
        ("openmpi5", "signal", ["--host", HOSTS, "-np", "4"],
         {"kind": "rank-signal", "rank": 2, "signal": 11, "node": W[2]},
         f"rank 2 on {W[2]} was killed by signal 11 (SIGSEGV)"),
        ("openmpi5", "missing", ["--host", HOSTS],
         {"kind": "exe-not-found", "rank": 0, "node": W[0]},
         f"the program '/opt/app/no-such-prog' could not be run on {W[0]}"),
        ("openmpi5", "noroute", ["--host", HOSTS + ",198.19.138.99:1"],
         {"kind": "daemon-launch", "host": "198.19.138.99", "node": None},
         "mpirun could not start its daemon on one or more nodes (ssh to 198.19.138.99 failed)"),
        ("mpich", "exit3", ["-hosts", "198.19.138.10:2,198.19.138.11:1", "-n", "3"],
         {"kind": "rank-exit", "rank": 1, "exit_code": 4, "node": W[0]},
         f"rank 1 on {W[0]} ({NODES[0][0]}) exited with code 4"),
        ("mpich", "signal", ["-hosts", HOSTS, "-n", "4"],
         {"kind": "rank-signal", "rank": None, "signal": 11, "node": W[1]},
         f"a rank on {W[1]} ({NODES[1][0]}) was killed by signal 11 (SIGSEGV)"),
        ("mpich", "missing", ["-hosts", HOSTS],
         {"kind": "exe-not-found", "node": W[0]},
         f"the program '/opt/app/no-such-prog' could not be run on {W[0]}"),
        ("mpich", "refused", ["-hosts", HOSTS],
         {"kind": "daemon-launch", "host": "198.19.138.2", "node": None},
         "mpirun could not start its daemon on one or more nodes (ssh to 198.19.138.2 failed)"),
    ],
)  # fmt: skip
def test_failure_texts_name_rank_and_node(name, capture, command, facts, message):
    f = attribute(name, (DATA / f"{name}.{capture}.txt").read_text(), command)
    assert {k: f[k] for k in facts} == facts
    assert f["message"] == message


@pytest.mark.logic
def test_output_without_a_verdict_explains_nothing():
    for name in FLAVOURS:
        assert flavour.explain(name, "rank 0 of 1 on 10.0.0.1\n", ["/l"], None) is None


# --- every job kind on the real cluster, once per launcher -----------------------------


def mpi_or_skip(cluster, name):
    """The cluster's [mpi] settings for flavour `name`; a skip when it is not installed here
    (a failure with MLBENCH_REQUIRE_CLUSTER set)."""
    try:
        return cluster.mpi_config(name)
    except ClusterError as e:
        if os.environ.get("MLBENCH_REQUIRE_CLUSTER"):
            raise
        pytest.skip(str(e))


@pytest.fixture(params=FLAVOURS)
def fenv(request, cluster, tmp_path):
    mpi = mpi_or_skip(cluster, request.param)
    e = Env(cluster, tmp_path / "state", **mpi, cancel_grace_s=2.0)
    e.flavour = request.param
    e.prog = lambda *args: [mpi["program"][0], *args]
    yield e
    e.close()


DAEMONS = {"openmpi4": "orted", "openmpi5": "prted", "mpich": "hydra_pmi_proxy"}


def node_of_rank(job, rank):
    """The node a rank really ran on, from the rank's own report line."""
    ip = re.search(rf"rank {rank} of \d+ on ([0-9.]+):", job["response"])[1]
    return next(n[2] for n in job["nodes"] if n[0] == ip)


def test_empty_body_runs_on_every_node_with_the_detected_flavour(fenv, cluster):
    job = fenv.run(None)
    assert (job["state"], job["exit_code"], job["flavour"]) == ("succeeded", 0, fenv.flavour)
    assert rank_lines(job["response"], 3) and "allreduce ok 3" in job["response"]
    for h in cluster.workers:
        assert f"on {h.ip}: sum=3" in job["response"]
    f = flavour.get(fenv.flavour)
    assert job["command"].startswith(str([fenv.cfg.mpi.mpirun, *f.fixed, *fenv.cfg.mpi.args])[:-1])
    wait_for(lambda: job_processes(cluster) == [], what="nothing of the job left")


def test_exit_code_3_names_the_failing_ranks_node(fenv, cluster, tmp_path):
    """The master in the middle of the host list: OpenMPI 4 puts rank 1 elsewhere than
    OpenMPI 5 and Hydra do; the node named must be where rank 1 really ran.  Rank 1
    fails while the others still run (OpenMPI names the rank only then).  Hydra names
    no host for a non-zero exit in its default output, and the daemon never adds the
    option that would (it changes the output): the code is still given, the node only
    when the operator put -print-all-exitcodes in mpi.args."""
    w = sorted(cluster.workers, key=lambda h: h.index)
    program = [
        "/bin/sh",
        "-c",
        '"$0" "$@" || exit $?; sleep 5',
        fenv.prog()[0],
        "--exit-rank",
        "1",
        "3",
    ]
    job = fenv.run({"program": program, "master": w[1].name})
    assert (job["state"], job["exit_code"], job["flavour"]) == ("failed", 3, fenv.flavour), job
    assert "Exit codes:" not in job["response"]
    where = node_of_rank(job, 1)
    f = job["failure"]
    named = None if fenv.flavour == "mpich" else where
    assert (f["kind"], f["node"], f["exit_code"]) == ("rank-exit", named, 3), (f, job["response"])
    assert f"on {where}" in f["message"] or "-print-all-exitcodes in mpi.args" in f["message"]
    if fenv.flavour != "mpich":
        return
    mpi = cluster.mpi_config("mpich")
    e = Env(cluster, tmp_path / "opt-in", **{**mpi, "args": [*mpi["args"], "-print-all-exitcodes"]})
    try:
        job = e.run({"program": program, "master": w[1].name})
    finally:
        e.close()
    f = job["failure"]
    assert (f["kind"], f["node"], f["exit_code"]) == ("rank-exit", where, 3), (f, job["response"])


def test_hostile_argv_arrives_byte_identical(fenv, cluster):
    canary = cluster.home / f"canary-{secrets.token_hex(4)}"
    args = [";", f"$(touch {canary})", f"`touch {canary}`", "'", '"', "\n", "\\", "&&",
            f">{canary}", "--host", "-np", "-n", "-hosts", "-genv", "ü€😀", "*", "$HOME",
            " ", ""]  # fmt: skip
    job = fenv.run({"program": fenv.prog("--argv", *args), "nodes": [cluster.workers[1].name]})
    assert job["state"] == "succeeded", job
    assert argv_received(job) == [a.encode() for a in ["--argv", *args]]
    assert not canary.exists()


def test_env_value_reaches_every_rank_and_no_command_line_on_any_host(fenv, cluster):
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    job = fenv.jobs.submit(
        {
            "program": fenv.prog("--env", "TOKEN", "--sleep", "3"),
            "env": {"TOKEN": secret},
            "wait": False,
        }
    )
    seen = set()
    while fenv.jobs.get(job["id"])["state"] in ("pending", "running"):
        for pid, _ in cluster.user_processes():  # every host's processes (root sees all)
            try:
                assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
                seen.add(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                pass
        time.sleep(0.05)
    assert DAEMONS[fenv.flavour] in seen, seen  # looked while the remote daemons ran
    done = fenv.jobs.wait(job["id"], HANG)
    assert done["state"] == "succeeded", done
    assert all(f"env {r} TOKEN={secret}" in done["response"] for r in range(3))
    assert secret not in json.dumps({k: v for k, v in done.items() if k != "response"})
    assert ("'-x', 'TOKEN'" in done["command"]) == (fenv.flavour != "mpich")


def test_async_job_with_follow(fenv):
    job = fenv.jobs.submit(
        {"program": fenv.prog("--bytes", "200000", "--sleep", "1"), "wait": False}
    )
    assert job["state"] in ("pending", "running")
    followed = b"".join(fenv.jobs.follow_log(job["id"], 0))
    done = fenv.jobs.wait(job["id"])
    assert done["state"] == "succeeded" and followed == done["response"].encode()
    assert payload(RANK_REPORTS.sub(b"", followed)) == written_bytes(200000)


RANK_REPORTS = re.compile(rb"\[mpiexec@[\w.-]+\] Exit codes: (?:\[[^\]]+\] [\d,]+\n)+")


def host_of(cluster, pid):
    """The test host whose network namespace the process is in."""
    ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    return next((h for h in cluster.hosts if os.stat(f"/run/netns/{h.ns}").st_ino == ino), None)


def test_cancel_leaves_nothing_even_with_a_remote_daemon_deaf_to_term(fenv, cluster):
    """Every rank leaves a detached process; one remote launcher daemon (orted, prted,
    hydra_pmi_proxy) is stopped, so it hears neither TERM nor its launcher's end: only
    the sweep's KILL, finding it by its marker (Hydra's proxies: by the control port),
    ends it.  Nothing of the job may be left on any host."""
    detach = 'setsid sleep 300 </dev/null >/dev/null 2>&1 & exec "$0" --sleep 60'
    w = sorted(cluster.workers, key=lambda h: h.index)
    job = fenv.jobs.submit({"program": ["/bin/sh", "-c", detach, fenv.prog()[0]], "wait": False})
    wait_ranks(fenv, job["id"])
    wait_for(
        lambda: sum(cmd.startswith("sleep 300") for _, cmd in job_processes(cluster)) == 3,
        what="a detached process on every host",
    )
    daemon = DAEMONS[fenv.flavour]
    remote = [
        pid
        for pid, _ in job_processes(cluster)
        if Path(f"/proc/{pid}/comm").read_text().strip() == daemon and host_of(cluster, pid) is w[2]
    ]
    assert remote, job_processes(cluster)
    for pid in remote:
        os.kill(pid, signal.SIGSTOP)
    done = cancel_job(fenv.jobs, job["id"])
    assert done["state"] == "cancelled", done
    assert "verified no process left on 3 host(s)" in done["error"], done["error"]
    wait_for(lambda: job_processes(cluster) == [], timeout=10, what="nothing of the job left")


@pytest.mark.parametrize("name", FLAVOURS)
def test_daemon_killed_mid_job_reattaches_and_completes_the_log(cluster, tmp_path, name):
    mpi = mpi_or_skip(cluster, name)
    with served(cluster, tmp_path, ssh={"use_system_known_hosts": False}, mpi=mpi) as d:
        url = d.url
        prog = [*mpi["program"], "--bytes", "300000", "--sleep", "5", "--exit", "5"]
        status, body = http(url + "/api/mpi_jobs/", "POST", {"program": prog, "wait": False})
        assert status == 202
        job_id = json.loads(body)["id"]
        wait_for(
            lambda: b"rank 2 of 3" in http(f"{url}/api/mpi_jobs/{job_id}/logs?limit=1000000")[1],
            what="ranks",
        )
        d.kill_and_restart()
        job = wait_job_ended(url, job_id)
        assert (job["state"], job["exit_code"], job["flavour"]) == ("failed", 5, name), job
        log = b"".join(paged_log(url, job_id))
        assert rank_lines(log.decode(), 3)
        # every byte, once, in order (then the launcher's own notice of exit code 5)
        assert payload(RANK_REPORTS.sub(b"", log)).startswith(written_bytes(300000))


@pytest.mark.logic
def test_a_launcher_that_names_no_rank_still_gives_the_code_and_a_lone_ranks_node():
    """OpenMPI prints its "Process name / Exit code" notice only when other ranks still
    ran; its other notice names nobody.  Hydra's default output names nobody either."""
    text = (
        "Primary job  terminated normally, but 1 process returned\n"
        "a non-zero exit code. Per user-direction, the job has been aborted.\n"
    )
    one = ["--host", NODES[1][0]]
    assert attribute("openmpi5", text, one, 3)["message"] == (
        f"rank 0 on {W[1]} ({NODES[1][0]}) exited with code 3"
    )
    three = ["--host", HOSTS, "-np", "3"]
    assert attribute("openmpi5", text, three, 3)["message"] == (
        "a rank exited with code 3 (mpirun names a failing rank only while other ranks run)"
    )
    assert attribute("openmpi5", text, one, 139)["kind"] == "rank-signal"
    hydra = ["-launcher", "ssh", "-hosts", HOSTS, "-n", "3"]
    f = attribute("mpich", "", hydra, 3)
    assert (f["kind"], f["node"], f["exit_code"]) == ("rank-exit", None, 3)
    assert f["message"] == (
        "a rank exited with code 3 (Hydra names the host only with -print-all-exitcodes "
        "in mpi.args)"
    )


@pytest.mark.parametrize("name", FLAVOURS)
def test_a_worker_whose_launcher_differs_is_caught_by_the_preflight(name, cluster, start_daemon):
    """On one worker the launcher is another version (a file bind-mounted over it in
    that host's own mount namespace): the preflight names that worker, having found
    the flavour's own remote daemon where the launcher will look for it."""
    mpi = mpi_or_skip(cluster, name)
    f, launcher = flavour.get(name), Path(mpi["mpirun"]).resolve()  # the file behind links
    version = {"openmpi4": "4.0.3", "openmpi5": "5.0.1", "mpich": "4.9.1"}[name]
    said = (
        f"HYDRA build details:\\n    Version:   {version}\\n"
        if name == "mpich"
        else f"mpirun (Open MPI) {version}\\n"
    )
    other = cluster.dir / f"other-{name}-{secrets.token_hex(3)}"
    other.write_text(f"#!/bin/sh\nprintf '{said}'\n")
    other.chmod(0o755)
    w = sorted(cluster.workers, key=lambda h: h.index)
    d = start_daemon(mpi=mpi)
    # in the host's PID namespace too: umount reads /proc/self/mountinfo
    enter = ["nsenter", "-t", str(w[2].init_pid), "-m", "-p"]
    subprocess.run([*enter, "mount", "--bind", str(other), str(launcher)], check=True)
    try:
        status, answer = d.json("POST", "/api/preflight/", {})
    finally:
        subprocess.run([*enter, "umount", str(launcher)], check=True)
        other.unlink()
    assert status == 200 and answer["flavour"] == name, answer
    bad = [c for c in answer["checks"] if c["status"] == "fail"]
    assert [(c["node"], c["check"]) for c in bad] == [(w[2].name, "mpi-version")], bad
    assert version in bad[0]["message"]
    ok = [c for c in answer["checks"] if c["node"] == w[1].name and c["check"] == "launcher-daemon"]
    assert ok[0]["status"] == "pass" and ok[0]["message"].endswith("/" + f.daemon), ok


@pytest.mark.logic
@pytest.mark.parametrize("name", FLAVOURS)
def test_failure_attribution_per_flavour(name):
    """jobs.failure reads each flavour's own texts: the captured OpenMPI 5 and Hydra
    outputs, and OpenMPI 4's first notice alone (its second, naming the rank, depends
    on mpirun's timing) for a job of one rank."""
    refs = [failure.NodeRef(n, ip, n) for ip, n in NODES]
    if name == "openmpi4":
        text = "Primary job  terminated normally, but 1 process returned\na non-zero exit code."
        command, code = ["/l", "--host", f"{NODES[1][0]},{NODES[2][0]}", "-np", "1", "/p"], 3
    else:
        text = (DATA / f"{name}.exit3.txt").read_text()
        hosts = HOSTS if name == "openmpi5" else "198.19.138.10:2,198.19.138.11:1"
        command = ["/l", flavour.get(name).host_option, hosts, "/opt/app/prog"]
        code = 3 if name == "openmpi5" else 7
    f = failure.attribute(state="failed", reason=None, exit_code=code, output=text,
                          command=command, master=NODES[1][1], master_ip=NODES[1][0],
                          nodes=refs, flavour=name)  # fmt: skip
    want = {"openmpi4": (0, NODES[1][1], 3), "openmpi5": (0, NODES[0][1], 3),
            "mpich": (1, NODES[0][1], 4)}[name]  # fmt: skip
    assert (f["kind"], f["rank"], f["node"], f["exit_code"]) == ("rank-exit", *want), f
