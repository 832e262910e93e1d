"""POST /api/preflight/ and `mlbench-daemon check` on the real cluster: each fault is
caused for real on one host (host keys, PATH, an MPI wrapper, a bind mount, nftables)."""

import os
import secrets
import shutil
import subprocess
import threading
import time

import pytest

from mlbench_daemon.jobs import preflight
from mlbench_daemon.ssh import watch


@pytest.fixture
def scratch(cluster):
    """A directory the cluster user can read (pytest's scratch is root's alone)."""
    d = cluster.dir / f"scratch-{secrets.token_hex(3)}"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def by(answer, node=None, check=None):
    return [c for c in answer["checks"] if c["node"] == node and c["check"] == check]


def failing(answer):
    return [(c["node"], c["check"]) for c in answer["checks"] if c["status"] == "fail"]


def names(cluster):
    return [h.name for h in cluster.workers]


def test_shape_of_a_healthy_cluster(cluster, daemon):
    status, answer = daemon.json("POST", "/api/preflight/", {"np": 3})
    assert status == 200, answer
    assert list(answer)[:6] == ["ok", "master_name", "command", "nodes", "flavour", "checks"]
    assert answer["ok"] is True, failing(answer)
    w = names(cluster)
    assert answer["master_name"] == w[0]
    assert answer["flavour"] == "openmpi4"
    assert answer["command"].startswith("['")
    assert [n[2] for n in answer["nodes"]] == w
    for c in answer["checks"]:
        assert set(c) == {"node", "check", "status", "ok", "message", "hint"}
        assert c["status"] == "pass" and c["ok"] is True, c
        assert c["check"] in preflight.CHECKS
    for name in w[1:]:
        for kind in ("master-ssh", "launcher-daemon", "mpi-version", "program", "dirs", "tcp"):
            assert len(by(answer, name, kind)) == 1, (name, kind)
    assert by(answer, w[0], "launcher-daemon")[0]["message"].endswith("/mpirun")
    assert by(answer, w[1], "launcher-daemon")[0]["message"].endswith("/orted")
    assert "connected to" in by(answer, w[1], "tcp")[0]["message"]
    assert len(by(answer, None, "slots")) == 1


def test_the_command_is_what_a_job_would_run(cluster, daemon):
    body = {"program": [str(cluster.mpi_program), "--sleep", "0"], "np": 2}
    _, answer = daemon.json("POST", "/api/preflight/", body)
    job = daemon.json("POST", "/api/mpi_jobs/", body)[1]
    assert answer["command"] == job["command"]
    assert answer["nodes"] == job["nodes"] and answer["master_name"] == job["master_name"]


def test_bad_input_is_answered_as_for_a_job(cluster, daemon):
    assert daemon.json("POST", "/api/preflight/", {"np": 0})[0] == 400
    status, err = daemon.json("POST", "/api/preflight/", {"env": {"A": "b"}})
    assert status == 400 and err["field"] == "env"
    assert daemon.json("POST", "/api/preflight/", {"nodes": ["nope"]})[0] == 409
    assert daemon.json("POST", "/api/preflight/", {"selector": "component=none"})[0] == 503


def test_a_worker_missing_from_the_masters_known_hosts(cluster, daemon):
    w = cluster.workers
    kh = cluster.home / ".ssh" / "known_hosts"
    saved = kh.read_text()
    try:
        kh.write_text("".join(line for line in saved.splitlines(True) if w[2].ip not in line))
        _, answer = daemon.json("POST", "/api/preflight/", {})
    finally:
        kh.write_text(saved)
    assert answer["ok"] is False
    bad = by(answer, w[2].name, "master-ssh")[0]
    assert bad["status"] == "fail" and "Host key verification failed" in bad["message"]
    assert w[2].name in bad["hint"] and "known_hosts" in bad["hint"]
    assert by(answer, w[2].name, "program")[0]["status"] == "not-checked"
    assert by(answer, w[1].name, "master-ssh")[0]["status"] == "pass"
    assert set(failing(answer)) == {(w[2].name, "master-ssh")}


def _bin_without(scratch, *missing):
    """A directory like /usr/bin (symlinks) without the named programs."""
    d = scratch / "bin-without"
    d.mkdir(exist_ok=True)
    for entry in os.listdir("/usr/bin"):
        if entry not in missing:
            os.symlink(f"/usr/bin/{entry}", d / entry)
    d.chmod(0o755)
    return d


def test_orted_missing_on_one_workers_path(cluster, start_daemon, scratch):
    """With a relative mpi.mpirun, OpenMPI 4 finds orted on the worker's PATH."""
    w = cluster.workers
    d = start_daemon(mpi={"mpirun": "mpirun"})
    cluster.set_env(w[1], PATH=str(_bin_without(scratch, "orted")))
    _, answer = d.json("POST", "/api/preflight/", {})
    assert set(failing(answer)) == {(w[1].name, "launcher-daemon")}, failing(answer)
    bad = by(answer, w[1].name, "launcher-daemon")[0]
    assert "orted not found on the non-interactive PATH" in bad["message"]
    assert "PATH" in bad["hint"]
    assert by(answer, w[2].name, "launcher-daemon")[0]["status"] == "pass"


def test_an_absolute_mpirun_finds_orted_under_its_prefix(cluster, daemon, scratch):
    """The same PATH does not matter when mpi.mpirun is absolute (OpenMPI 4 then
    runs orted from mpirun's prefix): no false alarm."""
    w = cluster.workers
    cluster.set_env(w[1], PATH=str(_bin_without(scratch, "orted")))
    _, answer = daemon.json("POST", "/api/preflight/", {})
    assert answer["ok"] is True, failing(answer)


def test_another_mpi_version_on_one_worker(cluster, start_daemon, scratch):
    w = cluster.workers
    wrap = scratch / "other-mpi"
    wrap.mkdir()
    (wrap / "orted").write_text('#!/bin/sh\nexec /usr/bin/orted "$@"\n')
    (wrap / "mpirun").write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "mpirun (Open MPI) 4.0.3"; exit 0; }\n'
        'exec /usr/bin/mpirun "$@"\n'
    )
    for f in wrap.iterdir():
        f.chmod(0o755)
    wrap.chmod(0o755)
    d = start_daemon(mpi={"mpirun": "mpirun"})
    cluster.set_env(w[2], PATH=f"{wrap}:/usr/local/bin:/usr/bin:/bin")
    _, answer = d.json("POST", "/api/preflight/", {})
    assert set(failing(answer)) == {(w[2].name, "mpi-version")}, failing(answer)
    bad = by(answer, w[2].name, "mpi-version")[0]
    assert "4.0.3" in bad["message"] and "4.1" in bad["message"]
    assert by(answer, w[1].name, "mpi-version")[0]["status"] == "pass"


def test_the_program_not_executable_on_one_node(cluster, daemon, scratch):
    """The program's directory differs on one host (a bind mount in its own mount
    namespace): there the file is not executable for the cluster user."""
    w = cluster.workers
    good, bad = scratch / "app", scratch / "app-broken"
    for d, mode in ((good, 0o755), (bad, 0o644)):
        d.mkdir()
        shutil.copy(cluster.mpi_program, d / "prog")
        (d / "prog").chmod(mode)
        d.chmod(0o755)
    enter = ["nsenter", "-t", str(w[1].init_pid), "-m"]
    subprocess.run([*enter, "mount", "--bind", str(bad), str(good)], check=True)
    try:
        _, answer = daemon.json("POST", "/api/preflight/", {"program": [str(good / "prog")]})
    finally:
        subprocess.run([*enter, "umount", str(good)], check=True)
    assert set(failing(answer)) == {(w[1].name, "program")}, failing(answer)
    msg = by(answer, w[1].name, "program")[0]["message"]
    assert "not executable" in msg and cluster.user in msg
    _, answer = daemon.json("POST", "/api/preflight/", {"program": ["/nonexistent/prog"]})
    assert {c for n, c in failing(answer)} == {"program"} and len(failing(answer)) == 3


def test_tcp_dropped_between_two_workers_and_one_preflight_at_a_time(cluster, daemon):
    w = cluster.workers
    cluster.netns_exec(
        w[2],
        ["nft", "-f", "-"],
        input=(
            "table inet mlbt_pf {\n chain in {\n  type filter hook input priority 0;\n"
            f"  ip saddr {w[1].ip} drop\n }}\n}}\n"
        ),
    )
    try:
        first = {}
        t = threading.Thread(target=lambda: first.update(a=daemon.json("POST", "/api/preflight/")))
        t.start()
        time.sleep(0.5)
        status, busy = daemon.json("POST", "/api/preflight/", {})
        t.join(60)
    finally:
        cluster.netns_exec(w[2], ["nft", "delete", "table", "inet", "mlbt_pf"], check=False)
    assert status == 429 and "already running" in busy["message"]
    status, answer = first["a"]
    assert status == 200
    assert set(failing(answer)) == {(w[1].name, "tcp"), (w[2].name, "tcp")}, failing(answer)
    assert w[2].name in by(answer, w[1].name, "tcp")[0]["message"]
    assert w[1].name in by(answer, w[2].name, "tcp")[0]["message"]
    assert w[0].name not in by(answer, w[1].name, "tcp")[0]["message"]  # the master is reached
    assert daemon.json("POST", "/api/preflight/", {})[1]["ok"] is True  # free again


def test_np_over_the_slots(cluster, daemon):
    _, answer = daemon.json("POST", "/api/preflight/", {"np": 4})
    assert failing(answer) == [(None, "slots")]
    assert "np=4" in by(answer, None, "slots")[0]["message"]


def test_one_deadline_for_a_master_that_cannot_reach_a_worker(cluster, start_daemon):
    """SYNs from the master to one worker are dropped: its ssh hangs until the deadline,
    the answer comes anyway, naming that worker."""
    w = cluster.workers
    d = start_daemon(mpi={"preflight_timeout_s": 4})
    cluster.netns_exec(
        w[2],
        ["nft", "-f", "-"],
        input=(
            "table inet mlbt_pf {\n chain in {\n  type filter hook input priority 0;\n"
            f"  ip saddr {w[0].ip} drop\n }}\n}}\n"
        ),
    )
    try:
        start = time.monotonic()
        _, answer = d.json("POST", "/api/preflight/", {})
        took = time.monotonic() - start
    finally:
        cluster.netns_exec(w[2], ["nft", "delete", "table", "inet", "mlbt_pf"], check=False)
    assert took < 4 + 10, took
    assert (w[2].name, "master-ssh") in failing(answer)
    assert by(answer, w[1].name, "master-ssh")[0]["status"] == "pass"


def _snapshot(cluster):
    """The cluster user's files (home, each host's TMPDIR, /tmp) and processes."""
    files = set()
    for root in [cluster.home, *(h.dir / "tmp" for h in cluster.hosts)]:
        for dirpath, dirs, fs in os.walk(root):
            files.update(os.path.join(dirpath, f) for f in fs + dirs)
    for entry in os.scandir("/tmp"):  # other test runs come and go here: ours only
        try:
            if entry.stat(follow_symlinks=False).st_uid == cluster.uid:
                files.add(entry.path)
        except OSError:
            pass
    procs = {
        (p, c)
        for p, c in cluster.user_processes()
        if not c.startswith("sshd") and watch.MARK not in c  # the daemon's probe loops
    }
    return files, procs


def test_leaves_nothing_behind(cluster, daemon):
    daemon.json("POST", "/api/preflight/", {})  # connections and caches settle first
    files0, procs0 = _snapshot(cluster)
    _, answer = daemon.json("POST", "/api/preflight/", {})
    assert answer["ok"] is True
    deadline = time.monotonic() + 10
    while True:
        files1, procs1 = _snapshot(cluster)
        if (files1 == files0 and procs1 <= procs0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert files1 - files0 == set()
    assert procs1 - procs0 == set()


def test_cli_check_exit_codes(cluster, daemon, scratch):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    base = ["python3", "-m", "mlbench_daemon", "--url", daemon.url, "check"]
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "NODE" in r.stdout and "launcher-daemon" in r.stdout and "pass" in r.stdout
    r = subprocess.run([*base, "--np", "9"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "slots" in r.stdout and "fail" in r.stdout
    r = subprocess.run([*base, "--node", "nope"], capture_output=True, text=True, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 2 and "409" in r.stderr
    r = subprocess.run([*base, "--np", "x"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2


def test_tcp_not_checked_without_python3_on_a_worker(cluster, daemon, scratch):
    """Without the means to test TCP on a node, the check says what it needs."""
    w = cluster.workers
    bare = _bin_without(scratch, *[e for e in os.listdir("/usr/bin") if e.startswith("python")])
    cluster.set_env(w[2], PATH=str(bare))
    _, answer = daemon.json("POST", "/api/preflight/", {})
    c = by(answer, w[2].name, "tcp")[0]
    assert (c["status"], c["ok"]) == ("not-checked", None)
    assert "python3" in c["message"] and w[2].name in c["message"]
    assert by(answer, w[1].name, "tcp")[0]["status"] == "pass"
    assert answer["ok"] is True  # nothing failed


def test_a_single_node(cluster, daemon):
    w = cluster.workers
    _, answer = daemon.json("POST", "/api/preflight/", {"nodes": [w[1].name]})
    assert answer["ok"] is True and answer["master_name"] == w[1].name
    assert {c["node"] for c in answer["checks"]} == {w[1].name, None}


def test_a_hostile_program_name_is_data_on_every_host(cluster, daemon, scratch):
    """program[0] reaches the master and, through its ssh, every worker as one word."""
    mark = scratch / "pwned"
    hostile = f"/nonexistent/a b;touch {mark} $(touch {mark}) `touch {mark}` '\"\\"
    _, answer = daemon.json("POST", "/api/preflight/", {"program": [hostile, "x"]})
    bad = [c for c in answer["checks"] if c["check"] == "program"]
    assert len(bad) == 3 and all(c["status"] == "fail" for c in bad)
    assert all(c["message"] == f"{hostile} does not exist" for c in bad), bad
    assert not mark.exists()
    assert by(answer, cluster.workers[1].name, "master-ssh")[0]["status"] == "pass"
