"""Helpers shared by the tests (and benches): waiting with a bound, a free port, HTTP calls."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from http.client import HTTPConnection

from tests.cluster import free_port  # one definition, where the cluster needs it too

__all__ = [
    "HANG",
    "append_log",
    "call_json",
    "call_port",
    "free_port",
    "http",
    "serve_argv",
    "wait_for",
    "wait_hosts_running",
]

HANG = 120  # generous upper bound: catches hangs, asserts nothing about speed


def wait_for(
    predicate: Callable[[], object],
    timeout: float = HANG,
    what: str = "condition",
    interval: float = 0.1,
) -> bool:
    """Poll `predicate` until it is true (-> True); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
    return True


def append_log(store, job_id: str, data: bytes) -> int:
    """Append to a job's log as the follower does (``Store.log_writer``) -> the new size."""
    with store.log_writer(job_id) as f:
        f.write(data)
        return f.tell()


def http(
    url: str,
    method: str = "GET",
    body: object = None,
    timeout: float = 30,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """One HTTP call -> (status, body); raises urllib's HTTPError on an error status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def serve_argv(config: object, *extra: str) -> list[str]:
    """The command that runs this checkout's daemon on `config` (then any `extra` options)."""
    return [sys.executable, "-m", "mlbench_daemon", "serve", "--config", str(config), *extra]


def call_json(url: str, method: str = "GET", body: object = None, timeout: float = 60) -> object:
    """One JSON call over urllib -> the decoded answer; raises HTTPError on an error status."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:  # loopback only
        return json.loads(r.read())


def call_port(
    port: int, method: str, path: str, body: object = None, timeout: float = 600
) -> tuple[int, object]:
    """One JSON call to 127.0.0.1:`port` -> (status, decoded answer), whatever the status."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def wait_hosts_running(port: int, count: int, timeout: float = 30) -> None:
    """Refresh the daemon's nodes until `count` are Running; exit the bench after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, nodes = call_port(port, "GET", "/api/nodes/?refresh=1", timeout=30)
            if sum(n["phase"] == "Running" for n in nodes) == count:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"daemon did not see {count} Running hosts")
        time.sleep(0.2)
