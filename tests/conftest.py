"""Shared fixtures: the real namespace cluster (see tests/cluster/)."""

import http.client
import json
import os
import pathlib
import shutil
import tempfile
import threading
import time
import traceback
import urllib.parse

import pytest

from tests.cluster import Cluster
from tests.helpers import check_answer, served_document

NEEDS = ["ip", "sshd", "dnsmasq", "mpirun", "mpicc", "nft", "ssh-keygen"]


def cluster_unavailable():
    if os.geteuid() != 0:
        return "the test cluster needs root (network namespaces)"
    missing = [c for c in NEEDS if not shutil.which(c) and not os.path.exists(f"/usr/sbin/{c}")]
    return f"missing programs: {', '.join(missing)}" if missing else None


# Fixtures that start something real: the namespace cluster, a daemon, a server on a port, a
# DNS server, a container, a wheel build. A test using none of them, and not marked `cluster`
# or `system` (root or system services without a fixture), is marked `logic`: the fast stage.
HEAVY_FIXTURES = {
    "cluster_session",
    "cluster",
    "make_cluster",
    "start_daemon",
    "daemon",
    "standin",
    "unused_port",
    "dnsmasq",
    "wheelhouse",
    "box",
}
NOT_LOGIC_MARKS = ("cluster", "system")


def heavy(item):
    return bool(HEAVY_FIXTURES & set(item.fixturenames)) or any(
        item.get_closest_marker(m) for m in NOT_LOGIC_MARKS
    )


def mark_logic(items):
    """Mark every light test `logic`; a test marked `logic` by hand that is heavy is an error,
    so `-m logic` and `-m "not logic"` split the suite: no test in both, none in neither."""
    wrong = [i.nodeid for i in items if i.get_closest_marker("logic") and heavy(i)]
    if wrong:
        raise pytest.UsageError(f"marked logic but needs the cluster or a server: {wrong}")
    for item in items:
        if not heavy(item):
            item.add_marker(pytest.mark.logic)


def pytest_collection_modifyitems(config, items):
    mark_logic(items)
    why = cluster_unavailable()
    if why and os.environ.get("MLBENCH_REQUIRE_CLUSTER"):
        raise pytest.UsageError(f"cluster tests required but cannot run: {why}")
    if why:
        for item in items:
            if "cluster" in item.fixturenames or "make_cluster" in item.fixturenames:
                item.add_marker(pytest.mark.skip(reason=why))


# Every daemon started as a process (tests/helpers.py `Served`) writes its stderr into this
# directory, one file per start named after its test; at the session's end, a file holding a
# "Traceback" fails the run, naming the test: at the default log level the daemon writes one
# line per event (issue 19), so a traceback is a thread or a library printing on its own.
def pytest_configure(config):
    from tests.helpers import STDERR_DIR

    if STDERR_DIR not in os.environ:
        os.environ[STDERR_DIR] = tempfile.mkdtemp(prefix="mlbench-daemon-stderr-")
        config._mlbench_stderr_dir = os.environ[STDERR_DIR]  # ours: removed when clean


def tracebacks_in_daemon_stderr():
    from tests.helpers import STDERR_DIR

    where = pathlib.Path(os.environ[STDERR_DIR])
    return sorted(f.name for f in where.glob("*.stderr") if b"Traceback" in f.read_bytes())


def pytest_sessionfinish(session, exitstatus):
    found = tracebacks_in_daemon_stderr()
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        session.config._mlbench_tracebacks = found
    elif getattr(session.config, "_mlbench_stderr_dir", None):
        shutil.rmtree(session.config._mlbench_stderr_dir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.helpers import STDERR_DIR

    for name in getattr(config, "_mlbench_tracebacks", []):
        terminalreporter.write_line(
            f"FAILED a daemon's stderr holds a Traceback: {os.environ[STDERR_DIR]}/{name}",
            red=True,
        )


@pytest.fixture(scope="session")
def cluster_session():
    c = Cluster(workers=3, extra=1).build()
    try:
        yield c
    finally:
        c.teardown()


@pytest.fixture
def cluster(cluster_session):
    """The shared 3-worker (+1 dashboard host) cluster, healthy at the start of each test."""
    try:
        yield cluster_session
    finally:
        cluster_session.reset()


@pytest.fixture
def make_cluster():
    """Factory for a cluster of its own: make_cluster(workers=N, extra=0)."""
    made = []

    def make(workers=3, extra=0, **kw):
        c = Cluster(workers=workers, extra=extra, **kw).build()
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.teardown()


class LiveDaemon:
    """The real daemon (server.Daemon) serving on a loopback port, in a thread."""

    def __init__(self, cfg_path, runs=None):
        from mlbench_daemon import config, server

        self.daemon = server.Daemon(config.load(cfg_path), runs=runs)
        self.errors = []
        self.thread = threading.Thread(target=self._run, name="daemon", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.daemon.url is None and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.daemon.url, f"daemon did not bind: {self.errors}"
        self.url = self.daemon.url
        self.token = None

    def _run(self):
        try:
            self.daemon.run()
        except BaseException:  # surfaced by stop()
            self.errors.append(traceback.format_exc())

    def request(self, method, path, body=None, headers=None, timeout=120):
        """-> (status, headers, raw body); never raises on an HTTP error status."""
        u = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        headers = dict(headers or {})
        if self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            answer = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()
        # every answer is one the served document declares (tests.helpers.check_answer)
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        doc = served_document(self.url, auth)
        check_answer(doc, method, path, answer[0], answer[1].get("content-type"), answer[2])
        return answer

    def json(self, method, path, body=None, **kw):
        status, _, raw = self.request(method, path, body, **kw)
        return status, json.loads(raw)

    def wait_nodes(self, predicate, timeout=20):
        """Poll GET /api/nodes/ until predicate(nodes) holds; -> nodes."""
        deadline = time.monotonic() + timeout
        while True:
            status, nodes = self.json("GET", "/api/nodes/")
            if status == 200 and predicate(nodes):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes never matched: {nodes}")
            time.sleep(0.1)

    def wait_job(self, job_id, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            _status, job = self.json("GET", f"/api/mpi_jobs/{job_id}")
            if job.get("state") not in ("pending", "running"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job still {job.get('state')}: {job}")
            time.sleep(0.1)

    def stop(self):
        self.daemon.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "daemon did not stop"
        assert not self.errors, self.errors


@pytest.fixture
def start_daemon(cluster, tmp_path):
    """start_daemon(**config_overrides) -> LiveDaemon on the shared cluster, all workers Running."""
    started = []

    def start(wait_running=True, runs=None, **overrides):
        overrides.setdefault("server", {}).setdefault("port", 0)
        overrides.setdefault("log", {}).setdefault("level", "warning")
        n = len(started)
        path = cluster.write_config(
            tmp_path / f"daemon{n}.toml", tmp_path / f"state{n}", **overrides
        )
        d = LiveDaemon(path, runs=runs)
        started.append(d)
        token_file = overrides.get("server", {}).get("token_file")
        if token_file:
            d.token = open(token_file).read().strip()
        if wait_running:
            d.wait_nodes(
                lambda ns: (
                    len(ns) == len(cluster.workers) and all(x["phase"] == "Running" for x in ns)
                )
            )
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()
