"""The status page at `/`, in a real headless Chromium (Debian's package, driven by
Playwright) against the daemon on the test cluster; plus the HTTP pieces it needs:
the page's headers, `tail=N` on the logs API, `log_bytes`, and server.max_streams.
"""

import http.client
import http.server
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import wsgiref.util

import pytest

from mlbench_daemon import api, config, server
from tests.test_jobs import job_processes

CHROMIUM = "/usr/lib/chromium/chromium"
HANG = 60  # generous bound on anything that should take seconds
FEW_S = 15  # "within a few seconds" (probes every 1 s, the page polls every 2 s)

# Installed before any script of the page: CSP violations and long tasks, collected.
WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
    (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
window.__longtasks = [];
try {
  new PerformanceObserver((l) => l.getEntries().forEach((e) => window.__longtasks.push(e.duration)))
      .observe({type: 'longtask', buffered: true});
} catch (e) {}
"""


# --- the page's HTTP side (no cluster) ------------------------------------------------


def wsgi(app, path, method="GET", query=""):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD=method, QUERY_STRING=query)
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen.update(status=int(status.split()[0]), headers=dict(headers))

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_page_and_its_files_are_served_with_strict_headers():
    app = api.make_app(registry=None, jobs=None)
    status, headers, body = wsgi(app, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in csp
    assert "unsafe" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    # nothing from another origin, no inline script or style
    html = body.decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    types = {
        "app.js": "text/javascript",
        "api.js": "text/javascript",
        "log.js": "text/javascript",
        "style.css": "text/css",
        "icon.svg": "image/svg+xml",
    }
    for name, kind in types.items():
        status, headers, body = wsgi(app, f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), name
        assert headers["X-Content-Type-Options"] == "nosniff"
        body = body.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a name, not a load
        assert b"http://" not in body and b"https://" not in body, name
    # every file of the package's web/ directory is one of these, and ships as package data
    assert set(api.page_files()) == set(types) | {"index.html"}
    status, headers, body = wsgi(app, "/static/../api.py")
    assert status == 404 and json.loads(body)["error"] == "not-found"
    assert headers["Cache-Control"] == "no-store"


def test_package_data_covers_every_page_file():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["mlbench_daemon"]
    import fnmatch

    for name in api.page_files():
        assert any(fnmatch.fnmatch(f"web/{name}", p) for p in patterns), name


def test_api_answers_are_not_stored():
    app = api.make_app(registry=None, jobs=None)
    for path in ("/api/openapi.json", "/api/nope", "/healthz/nope"):
        status, headers, _ = wsgi(app, path)
        assert headers["Cache-Control"] == "no-store", path


def test_max_streams_must_leave_threads_for_short_requests(tmp_path):
    cfg = config.load(
        None,
        {
            "MLBENCH_DAEMON_DISCOVERY_SERVICE": "x.default.svc.cluster.local",
            "MLBENCH_DAEMON_SERVER_THREADS": "4",
            "MLBENCH_DAEMON_SERVER_MAX_STREAMS": "4",
            "MLBENCH_DAEMON_STATE_DIR": str(tmp_path),
        },
    )
    with pytest.raises(server.StartupError, match="server.max_streams"):
        server.Daemon(cfg)


# --- logs: tail=N, log_bytes; max_streams (the daemon on the cluster) -----------------


def get(daemon, path, **kw):
    return daemon.request("GET", path, **kw)


def submit(daemon, cluster, *args, **fields):
    status, job = daemon.json(
        "POST",
        "/api/mpi_jobs/",
        {"program": [str(cluster.mpi_program), *args], "wait": False, **fields},
    )
    assert status == 202, job
    return job


@pytest.mark.cluster
def test_logs_tail_and_log_bytes(daemon, cluster):
    job = daemon.wait_job(submit(daemon, cluster, "--bytes", "5000")["id"])
    assert job["state"] == "succeeded"
    base = f"/api/mpi_jobs/{job['id']}/logs"
    status, headers, whole = get(daemon, base)
    size = len(whole)
    assert status == 200 and size > 5000 and job["log_bytes"] == size
    assert daemon.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["log_bytes"] == size
    listed = daemon.json("GET", "/api/mpi_jobs/")[1]
    assert [j["log_bytes"] for j in listed if j["id"] == job["id"]] == [size]

    status, headers, body = get(daemon, f"{base}?tail=100")
    assert (status, body) == (200, whole[-100:])
    assert headers["x-log-start"] == str(size - 100) and headers["x-next-offset"] == str(size)
    status, headers, body = get(daemon, f"{base}?tail={size * 2}")
    assert (status, body, headers["x-log-start"]) == (200, whole, "0")
    status, headers, body = get(daemon, f"{base}?tail=0")
    assert (status, body, headers["x-log-start"], headers["x-next-offset"]) == (
        200,
        b"",
        str(size),
        str(size),
    )
    status, headers, body = get(daemon, f"{base}?tail=300&limit=100")
    assert body == whole[size - 300 : size - 200]
    assert headers["x-next-offset"] == str(size - 200)
    # tail with follow streams from size - N (to the end: the job is over)
    status, headers, body = get(daemon, f"{base}?tail=250&follow=1")
    assert (status, body, headers["x-log-start"]) == (200, whole[-250:], str(size - 250))

    for query in ("tail=10&offset=0", "tail=10&offset=5&follow=1", "tail=-1", "tail=x"):
        status, headers, body = get(daemon, f"{base}?{query}")
        assert status == 400 and json.loads(body)["field"] in ("tail", "offset"), query
    assert get(daemon, "/api/mpi_jobs/00000000000000000000/logs?tail=5")[0] == 404


class RawGet:
    """A GET whose answer is read only as far as asked, on its own connection."""

    def __init__(self, daemon, path):
        u = urllib.parse.urlsplit(daemon.url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=HANG)
        self.conn.request("GET", path)
        self.response = self.conn.getresponse()

    def close(self):
        if self.conn.sock:  # the answer's file holds the socket open: shut it down
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.response.close()
        self.conn.close()


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_max_streams_caps_follows_and_sync_posts(start_daemon, cluster):
    daemon = start_daemon(server={"max_streams": 2}, mpi={"cancel_grace_s": 1.0})
    job = submit(daemon, cluster, "--sleep", "120")
    deadline = time.monotonic() + HANG
    while b"allreduce ok" not in get(daemon, f"/api/mpi_jobs/{job['id']}/logs")[2]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    follow = f"/api/mpi_jobs/{job['id']}/logs?follow=1"
    first, second = RawGet(daemon, follow), RawGet(daemon, follow)
    assert first.response.status == second.response.status == 200
    # the job is silent now: both streams stay open, each holding a thread
    status, headers, body = get(daemon, follow)
    assert status == 503 and json.loads(body)["error"] == "too-many-streams"
    assert headers["cache-control"] == "no-store"
    jobs_before = daemon.json("GET", "/api/mpi_jobs/")[1]
    status, body = daemon.json("POST", "/api/mpi_jobs/", {"program": [str(cluster.mpi_program)]})
    assert (status, body["error"]) == (503, "too-many-streams")
    assert daemon.json("GET", "/api/mpi_jobs/")[1] == jobs_before  # refused: no job made
    # short requests still get through
    assert get(daemon, "/api/nodes/")[0] == 200
    # a client that goes away frees its thread although the job stays silent
    first.close()
    deadline = time.monotonic() + FEW_S
    while True:
        third = RawGet(daemon, follow)
        if third.response.status == 200:
            break
        assert third.response.status == 503
        third.close()
        assert time.monotonic() < deadline, "the closed follow never gave its slot back"
        time.sleep(0.2)
    assert daemon.json("DELETE", f"/api/mpi_jobs/{job['id']}")[1]["state"] == "cancelled"
    for raw in (second, third):  # the job's end ends the streams
        assert b"allreduce ok" in raw.response.read()
        raw.close()
    assert daemon.daemon.app is not None
    deadline = time.monotonic() + FEW_S
    while get(daemon, follow)[0] != 200:  # every slot free again
        assert time.monotonic() < deadline
        time.sleep(0.2)


# --- in the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """One page in a fresh context, with what it logged collected."""

    def __init__(self, browser, base_url):
        self.context = browser.new_context()
        self.context.add_init_script(WATCH)
        self.page = self.context.new_page()
        self.page.set_default_timeout(HANG * 1000)
        self.base = base_url
        self.console, self.errors, self.requests = [], [], []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append((r.method, r.url, r.headers)))

    def open(self, hash="#/"):
        self.page.goto(f"{self.base}/{hash}")
        return self.page

    def console_errors(self):
        return [t for kind, t in self.console if kind == "error"]

    def csp(self):
        return self.page.evaluate("window.__csp")

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser, daemon):
    t = Tab(browser, daemon.url)
    try:
        yield t
    finally:
        t.close()


def node_row(page, name):
    return page.locator(f'#nodes tbody tr[data-key="{name}"]')


def wait_text(locator, pattern, timeout=HANG):
    """Wait until the locator's text matches `pattern` (a regex)."""
    deadline = time.monotonic() + timeout
    while True:
        text = locator.inner_text() if locator.count() else ""
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"{pattern!r} never matched; last {text!r}"
        time.sleep(0.1)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_overview_nodes_running_then_unknown_then_running_in_place(tab, daemon, cluster):
    page = tab.open("#/")
    names = [n["name"] for n in daemon.json("GET", "/api/nodes/")[1]]
    assert len(names) == 3
    for name in names:
        wait_text(node_row(page, name), r"Running")
    assert page.locator("#nodes caption").inner_text()
    wait_text(page.locator("#counts-live"), r"3 nodes: 3 Running")
    row = node_row(page, names[0]).element_handle()
    victim = next(h for h in cluster.workers if h.ip == node_ip(daemon, names[0]))
    cluster.stop_sshd(victim)
    started = time.monotonic()
    text = wait_text(node_row(page, names[0]), r"Unknown", timeout=FEW_S)
    print(f"\nUnknown shown {time.monotonic() - started:.1f} s after sshd stopped: {text!r}")
    assert re.search(r"connection-refused|connect", text)
    # failing nodes first
    assert page.locator("#nodes tbody tr").first.get_attribute("data-key") == names[0]
    wait_text(page.locator("#counts-live"), r"2 Running, 0 Pending, 1 Unknown")
    cluster.start_sshd(victim)
    wait_text(node_row(page, names[0]), r"Running", timeout=FEW_S)
    # the same element throughout: updated in place, never rebuilt
    assert row.evaluate(
        "(el, name) => el.isConnected && el === document.querySelector("
        "`#nodes tbody tr[data-key='${name}']`)",
        names[0],
    )
    assert not tab.console_errors() and not tab.errors and not tab.csp()


def node_ip(daemon, name):
    return next(n["ip"] for n in daemon.json("GET", "/api/nodes/")[1] if n["name"] == name)
