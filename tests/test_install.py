"""The installed service under a real systemd.

A container (tests/container.py: debootstrap'ed Debian, systemd booted by
systemd-nspawn, same network namespace as the test cluster) gets the wheelhouse
`make wheelhouse` builds and runs the project's own installer in it, as an
operator would.  The tests run in file order on one container: install, use,
stop/start, watchdog, journal, bad config, hardening, upgrade, uninstall,
reinstall without python3-venv; each test takes up the state the one before left.
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.cluster.cluster import to_toml
from tests.container import Container, rootfs
from tests.helpers import HANG, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
NAME = "mlbench-daemon"
INSTALLER = "/root/wheelhouse/install.sh"
CONF = f"/etc/{NAME}/{NAME}.toml"
WATCHDOG_S = 30  # the unit's WatchdogSec
RESTART_S = 5  # the unit's RestartSec

# the first test also sets up the container: debootstrap (1-2 min) when nothing is cached
pytestmark = pytest.mark.timeout(900)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: debootstrap, an overlay mount and systemd-nspawn boot a container",
)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory):
    """`make wheelhouse` into a directory of this run."""
    out = tmp_path_factory.mktemp("wheelhouse") / "wheelhouse"
    t0 = time.monotonic()
    r = subprocess.run(
        ["make", "-s", "wheelhouse", f"WHEELHOUSE={out}", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nmake wheelhouse: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return out


def test_the_wheel_ships_every_file_of_the_package(wheelhouse):
    """Package data (the status page under mlbench_daemon/web/) is in the wheel."""
    (wheel,) = wheelhouse.glob("mlbench_daemon-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    tree = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "mlbench_daemon").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    package = {n for n in shipped if n.startswith("mlbench_daemon/")}
    assert tree and package == tree, (tree - package, package - tree)
    for f in ("install.sh", f"{NAME}.service", f"{NAME}.toml", "PYTHON"):
        assert (wheelhouse / f).is_file()
    assert list(wheelhouse.glob("pip-*.whl")) and list(wheelhouse.glob("paramiko-*.whl"))


# --- the container ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def box(wheelhouse, cluster_session):
    t0 = time.monotonic()
    root, took = rootfs(log=lambda m: print(m, file=sys.stderr))
    how = f"debootstrap {took:.1f}s" if took else "cached"
    print(f"root filesystem: {how} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    t0 = time.monotonic()
    c = Container(root).start()
    print(f"container boot: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    try:
        shutil.copytree(wheelhouse, c.path("/root/wheelhouse"))
        c.port = free_port()
        yield c
    finally:
        c.stop()


def install(box, *args, check=True):
    r = box.run(["sh", INSTALLER, *args], check=False, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def show(box, prop):
    return box.run(["systemctl", "show", "-P", prop, NAME]).stdout.strip()


def journal(box):
    """The unit's journal entries (dicts), oldest first."""
    out = box.run(["journalctl", "-u", NAME, "-o", "json", "--no-pager"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    for e in entries:
        if isinstance(e.get("MESSAGE"), list):  # journald's form for non-UTF-8 bytes
            e["MESSAGE"] = bytes(e["MESSAGE"]).decode(errors="replace")
    return entries


def daemon_lines(box):
    return [e for e in journal(box) if e.get("SYSLOG_IDENTIFIER") == NAME]


def api(box, method, path, body=None, timeout=120):
    """-> (status, parsed JSON or text) from the installed daemon (shared loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", box.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        kind = r.getheader("Content-Type") or ""
        return r.status, json.loads(raw) if "json" in kind else raw.decode()
    finally:
        conn.close()


def job_state(box, job_id):
    return api(box, "GET", f"/api/mpi_jobs/{job_id}")[1]["state"]


def start_job(box, cluster, sleep_s):
    status, job = api(
        box,
        "POST",
        "/api/mpi_jobs/",
        {"program": [str(cluster.mpi_program), "--sleep", str(sleep_s)], "wait": False},
    )
    assert status in (200, 201, 202), job
    wait_for(lambda: job_state(box, job["id"]) == "running", HANG, "the job to run")
    return job["id"]


def finish(box, job_id, timeout=120):
    """Wait for the job's end; -> (record, full log)."""
    wait_for(lambda: job_state(box, job_id) not in ("pending", "running"), timeout, "the job's end")
    _, rec = api(box, "GET", f"/api/mpi_jobs/{job_id}")
    _, log = api(box, "GET", f"/api/mpi_jobs/{job_id}/logs?offset=0&limit=1048576")
    return rec, log


def assert_complete(rec, log, n=3):
    assert rec["state"] == "succeeded" and rec["exit_code"] == 0, rec
    assert len(re.findall(r"^rank \d+ of \d+ on ", log, re.M)) == n, log
    assert f"allreduce ok {n}" in log, log


def mpi_processes(cluster):
    return [p for p, cmd in cluster.user_processes() if str(cluster.mpi_program) in cmd]


def write_config(box, cluster, **overrides):
    """The daemon's config for the test cluster, as an operator would install it."""
    cfg = cluster.daemon_config(
        f"/var/lib/{NAME}",
        server={"host": "127.0.0.1", "port": box.port},
        ssh={
            "key_file": "${CREDENTIALS_DIRECTORY}/ssh_key",
            "known_hosts": f"/etc/{NAME}/known_hosts",
        },
        log={"level": "info"},
    )
    for section, values in overrides.items():
        cfg[section].update(values)
    box.path("/root/config.toml").write_text(to_toml(cfg))
    box.run(["install", "-m", "0640", "-g", NAME, "/root/config.toml", CONF])


def snapshot(box):
    """(path, inode, size, mtime) of everything the installer owns."""
    out = []
    for top in (
        f"/opt/{NAME}",
        f"/etc/{NAME}",
        f"/etc/systemd/system/{NAME}.service",
        f"/usr/local/bin/{NAME}",
        "/etc/systemd/system/multi-user.target.wants",
    ):
        p = box.path(top)
        for q in [p, *(p.rglob("*") if p.is_dir() and not p.is_symlink() else [])]:
            st = q.lstat()
            out.append((str(q), st.st_ino, st.st_size, st.st_mtime_ns))
    return sorted(out)


# --- the tests, in order ------------------------------------------------------------------


@needs_root
def test_the_installer_refuses_a_python_under_home_and_a_wheelhouse_for_another_python(box):
    box.run(["cp", "/usr/bin/python3", "/root/python3"])  # like a pyenv Python
    r = install(box, "--python", "/root/python3", check=False)
    assert r.returncode == 1 and "ProtectHome=yes" in r.stderr, r.stderr
    other = box.path("/root/wheelhouse-other")
    shutil.copytree(box.path("/root/wheelhouse"), other)
    (other / "PYTHON").write_text("3.99\n")
    r = install(box, "--wheelhouse", "/root/wheelhouse-other", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "built for Python 3.99" in r.stderr and "make wheelhouse PYTHON=python3." in r.stderr
    assert not box.path(f"/opt/{NAME}").exists()  # nothing was installed


@needs_root
def test_install_says_what_is_missing_then_starts_and_a_second_run_changes_nothing(box, cluster):
    t0 = time.monotonic()
    r = install(box)
    print(
        f"first install (venv from the wheelhouse): {time.monotonic() - t0:.1f}s", file=sys.stderr
    )
    assert "not started; it needs:" in r.stdout, r.stdout
    assert f"/etc/{NAME}/ssh_key" in r.stdout and "unedited example" in r.stdout
    assert show(box, "UnitFileState") == "enabled" and show(box, "ActiveState") == "inactive"
    assert box.run(["getent", "passwd", NAME]).stdout.startswith(f"{NAME}:")
    assert box.run([f"/usr/local/bin/{NAME}", "--version"]).stdout.startswith(f"{NAME} ")
    unit = box.path(f"/etc/systemd/system/{NAME}.service").read_text()
    assert f"ExecStart=/opt/{NAME}/current/bin/{NAME} serve " in unit

    # what an operator sees when starting it without the key
    r = box.run(["systemctl", "start", NAME], check=False)
    assert r.returncode != 0
    assert f"Assertion failed on job for {NAME}.service." in r.stderr, r.stderr
    assert show(box, "ActiveState") == "inactive" and show(box, "NRestarts") == "0"

    # key, known_hosts and config in place: the same install starts it
    box.path(f"/etc/{NAME}/ssh_key").write_bytes(cluster.client_key.read_bytes())
    box.path(f"/etc/{NAME}/ssh_key").chmod(0o600)
    box.path(f"/etc/{NAME}/known_hosts").write_bytes(cluster.known_hosts.read_bytes())
    write_config(box, cluster)
    box.run(["chmod", "0600", CONF])  # copied in by hand, unreadable for the daemon's user
    r = install(box)
    assert "not started" in r.stdout and f"readable by the user {NAME}" in r.stdout, r.stdout
    assert "ssh_key" not in r.stdout and "unedited" not in r.stdout
    box.run(["chmod", "0640", CONF])
    r = install(box)
    assert f"started {NAME}" in r.stdout, r.stdout
    # `systemctl start` returned after READY: the status line is there and the API answers
    assert re.fullmatch(
        rf"3/3 nodes Running, 0 jobs running; API on http://127.0.0.1:{box.port}",
        show(box, "StatusText"),
    ), show(box, "StatusText")
    assert api(box, "GET", "/api/nodes/")[0] == 200
    assert show(box, "User") == NAME

    before, pid, invocation = snapshot(box), show(box, "MainPID"), show(box, "InvocationID")
    t0 = time.monotonic()
    r = install(box)
    print(f"install again (nothing to do): {time.monotonic() - t0:.1f}s", file=sys.stderr)
    assert "nothing to change" in r.stdout, r.stdout
    assert snapshot(box) == before
    assert (show(box, "MainPID"), show(box, "InvocationID")) == (pid, invocation)


@needs_root
def test_the_api_answers_on_the_cluster_and_a_job_succeeds(box, cluster):
    status, nodes = api(box, "GET", "/api/nodes/")
    assert status == 200 and len(nodes) == 3
    assert all(n["phase"] == "Running" for n in nodes), nodes
    status, job = api(box, "POST", "/api/mpi_jobs/", {})
    assert status == 200 and job["state"] == "succeeded", job
    assert "allreduce ok 3" in job["response"]
    # the CLI through /usr/local/bin
    r = box.run([NAME, "--url", f"http://127.0.0.1:{box.port}", "jobs"])
    assert job["id"] in r.stdout
    # the status page and its files, package data of the installed wheel
    status, page = api(box, "GET", "/")
    assert status == 200 and "<title>mlbench-daemon</title>" in page, page[:200]
    for name in ("app.js", "api.js", "log.js", "style.css"):
        assert api(box, "GET", f"/static/{name}")[0] == 200, name


@needs_root
def test_stop_leaves_a_running_job_running_and_the_next_start_reattaches(box, cluster):
    job_id = start_job(box, cluster, 6)
    box.run(["systemctl", "stop", NAME])
    assert show(box, "ActiveState") == "inactive"
    assert mpi_processes(cluster), "stopping the service killed the job"
    box.run(["systemctl", "start", NAME])
    assert show(box, "StatusText").startswith("3/3 nodes Running")
    rec, log = finish(box, job_id)
    assert_complete(rec, log)


@needs_root
def test_the_watchdog_restarts_a_stopped_daemon(box, cluster):
    pid = show(box, "MainPID")
    t0 = time.monotonic()
    box.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", NAME])
    bound = WATCHDOG_S + RESTART_S + 30
    wait_for(
        lambda: show(box, "MainPID") not in (pid, "0") and show(box, "ActiveState") == "active",
        bound,
        "the watchdog restart",
        interval=1,
    )
    print(f"watchdog restart after SIGSTOP: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    assert any("Watchdog timeout" in e["MESSAGE"] for e in journal(box))
    assert api(box, "GET", "/api/nodes/")[0] == 200


@needs_root
def test_the_journal_has_the_daemon_lines_with_their_priorities(box, cluster):
    cluster.stop_dns()  # the daemon warns that discovery failed and keeps the last list
    try:
        wait_for(
            lambda: any("discovery failed" in e["MESSAGE"] for e in daemon_lines(box)),
            30,
            "a discovery warning",
        )
    finally:
        cluster.start_dns()
    warning = [e for e in daemon_lines(box) if "discovery failed" in e["MESSAGE"]]
    assert warning[0]["PRIORITY"] == "4", warning[0]
    assert warning[0]["MESSAGE"].startswith("mlbench_daemon.nodes: discovery failed")
    serving = [e for e in daemon_lines(box) if "serving on" in e["MESSAGE"]]
    assert serving and all(e["PRIORITY"] == "6" for e in serving)
    assert not any(e["MESSAGE"].startswith("<") for e in daemon_lines(box))


@needs_root
def test_a_bad_config_fails_the_unit_with_its_one_line_message(box, cluster):
    write_config(box, cluster, ssh={"port": "abc"})
    r = box.run(["systemctl", "restart", NAME], check=False)
    assert r.returncode != 0
    try:
        expected = f"{NAME}: ssh.port: must be an integer from 1 to 65535, got 'abc'"
        lines = [e for e in daemon_lines(box) if e["MESSAGE"] == expected]
        assert lines and lines[-1]["PRIORITY"] == "3", daemon_lines(box)[-3:]
        assert show(box, "ActiveState") == "failed" and show(box, "ExecMainStatus") == "2"
        time.sleep(RESTART_S + 1)  # exit status 2 is not retried
        assert show(box, "ActiveState") == "failed" and show(box, "NRestarts") == "0"
    finally:
        write_config(box, cluster)
        box.run(["systemctl", "reset-failed", NAME])
        box.run(["systemctl", "start", NAME])
    assert show(box, "ActiveState") == "active"


@needs_root
def test_the_hardening_stays_on(box):
    r = box.run(["systemd-analyze", "security", "--no-pager", f"{NAME}.service"], check=False)
    m = re.search(rf"Overall exposure level for {NAME}\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"systemd-analyze security in the container: {m.group(1)}", file=sys.stderr)
    assert float(m.group(1)) <= 2.0, r.stdout


@needs_root
def test_an_upgrade_from_the_source_tree_while_a_job_runs_and_the_job_survives(box, cluster):
    """`git pull && make install`: a new venv, the switch, a restart; the job goes on."""
    src = box.path("/root/src")  # the next release: this tree with a higher version
    shutil.copytree(
        ROOT,
        src,
        ignore=lambda d, names: [
            n
            for n in names
            if n in ("__pycache__", ".git", "build", "dist", ".pytest_cache", ".hypothesis")
            or n.endswith(".egg-info")
        ],
    )
    init = src / "mlbench_daemon" / "__init__.py"
    init.write_text(
        re.sub(r'__version__ = "([^"]+)"', r'__version__ = "\1+next"', init.read_text())
    )
    # pip in the container has no index: what it builds the source with comes from here
    build = box.path("/root/build-wheels")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:"]
    subprocess.run(
        [*pip, "-d", str(build), "setuptools>=64", "wheel"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/root/wheelhouse /root/build-wheels"}
    old_venv = box.run(["readlink", f"/opt/{NAME}/current"]).stdout.strip()
    pid = show(box, "MainPID")

    job_id = start_job(box, cluster, 8)
    t0 = time.monotonic()
    r = box.run(["make", "-C", "/root/src", "install"], env=offline, check=False, timeout=300)
    print(f"upgrade (new venv, switch, restart): {time.monotonic() - t0:.1f}s", file=sys.stderr)
    assert r.returncode == 0 and f"restarted {NAME}" in r.stdout, r.stdout + r.stderr
    assert "+next" in box.run([NAME, "--version"]).stdout
    new_venv = box.run(["readlink", f"/opt/{NAME}/current"]).stdout.strip()
    assert new_venv != old_venv and box.path(f"/opt/{NAME}/{old_venv}").is_dir()
    assert show(box, "MainPID") != pid and show(box, "ActiveState") == "active"
    rec, log = finish(box, job_id)
    assert_complete(rec, log)
    r = box.run(["make", "-C", "/root/src", "install"], env=offline)
    assert "nothing to change" in r.stdout, r.stdout


@needs_root
def test_uninstall_removes_the_program_and_unit_and_keeps_config_and_state(box, cluster):
    kept = {p: box.path(p).read_bytes() for p in (CONF, f"/etc/{NAME}/ssh_key")}
    box.jobs = [j["id"] for j in api(box, "GET", "/api/mpi_jobs/")[1]]
    assert len(box.jobs) == 3  # from the tests above
    r = install(box, "--uninstall")
    assert "Kept:" in r.stdout, r.stdout
    for gone in (f"/opt/{NAME}", f"/etc/systemd/system/{NAME}.service", f"/usr/local/bin/{NAME}"):
        assert not box.path(gone).exists() and not box.path(gone).is_symlink(), gone
    assert box.run(["systemctl", "cat", NAME], check=False).returncode != 0
    assert {p: box.path(p).read_bytes() for p in kept} == kept
    state = box.path(f"/var/lib/{NAME}")
    assert (state / "jobs.sqlite3").is_file() and list((state / "logs").glob("*.log"))
    with pytest.raises(ConnectionRefusedError):
        api(box, "GET", "/api/nodes/")


@needs_root
def test_reinstall_without_python3_venv_takes_pip_from_the_wheelhouse(box, cluster):
    ver = box.run(["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout
    box.run(["dpkg", "--purge", "python3-venv", f"python{ver.strip()}-venv"])
    r = install(box, "--wheelhouse", "/root/wheelhouse")
    assert "pip came from the wheelhouse" in r.stdout and f"started {NAME}" in r.stdout, r.stdout
    status, jobs = api(box, "GET", "/api/mpi_jobs/")
    assert status == 200 and [j["id"] for j in jobs] == box.jobs  # the history was kept
    assert all(j["state"] == "succeeded" for j in jobs)
