"""Helpers shared by the tests (and benches): waiting with a bound, a free port, HTTP calls,
the daemon served as a subprocess on a test cluster."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import wsgiref.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import jsonschema_rs

from mlbench_daemon.client import Client, ClientError, ExitStatus
from tests.cluster import Cluster, free_port, stop_process  # free_port: the cluster needs it too

__all__ = [
    "HANG",
    "Served",
    "append_log",
    "call_json",
    "call_port",
    "cancel_job",
    "check_answer",
    "free_port",
    "http",
    "serve_argv",
    "served",
    "serves",
    "wait_for",
    "wait_hosts_running",
    "wsgi",
]

ROOT = Path(__file__).resolve().parent.parent

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


def serves(url: str) -> bool:
    """Whether a daemon answers /healthz at `url` (a kill -9 test waits for it to stop)."""
    try:
        return Client(url).call("GET", "/healthz", timeout=2).status == 200
    except OSError:
        return False


def wsgi(
    app: Callable[..., Iterator[bytes]],
    method: str,
    path: str,
    raw: bytes = b"",
    content_type: str = "",
    **environ: object,
) -> tuple[int, dict[str, str], bytes]:
    """Call the WSGI `app` in this process (`environ`: more of the request, e.g.
    REMOTE_ADDR) -> (status, headers by lower-case name, body)."""
    env: dict[str, object] = {}
    wsgiref.util.setup_testing_defaults(env)
    path, _, query = path.partition("?")
    env.update(
        PATH_INFO=path,
        QUERY_STRING=query,
        REQUEST_METHOD=method,
        CONTENT_TYPE=content_type,
        CONTENT_LENGTH=str(len(raw)),
    )
    env["wsgi.input"] = io.BytesIO(raw)
    env.update(environ)
    seen: dict[str, object] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc: object = None) -> None:
        seen.update(status=int(status.split()[0]), headers={k.lower(): v for k, v in headers})

    out = b"".join(app(env, start_response))
    return seen["status"], seen["headers"], out  # type: ignore[return-value]


# --- every answer checked against the served OpenAPI document ---------------------------

_DOCS: dict[str, dict] = {}  # daemon base URL -> its served /api/openapi.json
_DOCS_LOCK = threading.Lock()


def served_document(base: str, headers: dict | None = None) -> dict:
    """The OpenAPI document the daemon at `base` serves (fetched once per daemon)."""
    with _DOCS_LOCK:
        if base not in _DOCS:
            req = urllib.request.Request(base + "/api/openapi.json", headers=headers or {})
            with urllib.request.urlopen(req, timeout=HANG) as r:  # loopback only
                _DOCS[base] = json.loads(r.read())
        return _DOCS[base]


def _operation(doc: dict, method: str, path: str) -> dict | None:
    """The document's operation for `method` `path` (either slash spelling), or None."""
    path = path.split("?", 1)[0]
    bare = path.rstrip("/") or "/"
    # a concrete path before a templated one that also matches (OpenAPI's rule)
    for template, item in sorted(doc["paths"].items(), key=lambda kv: "{" in kv[0]):
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template.rstrip("/") or "/"))
        if re.fullmatch(pattern, bare) and method.lower() in item:
            return item[method.lower()]
    return None


def _check_url(
    url: str, method: str, status: int, ctype: str | None, body: bytes, headers: dict | None = None
) -> None:
    parts = urllib.parse.urlsplit(url)
    auth = {k: v for k, v in (headers or {}).items() if k.lower() == "authorization"}
    doc = served_document(f"{parts.scheme}://{parts.netloc}", auth)
    check_answer(doc, method, parts.path, status, ctype, body)


def check_answer(
    doc: dict, method: str, path: str, status: int, content_type: str | None, body: bytes
) -> None:
    """Fail unless the answer is one the document declares: its status among the
    operation's responses, its content type among that response's, and a JSON body
    valid against that response's schema.  Paths the document does not name (a 404 or
    405 for an unknown endpoint) must answer the Error schema."""
    op = _operation(doc, method, path)
    where = f"{method} {path} -> {status}"
    if op is None:
        # refused before routing (Host, Origin, Content-Type) or no such endpoint
        assert status in (403, 404, 405, 415), f"{where}: the document has no such operation"
        response = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
    else:
        response = op["responses"].get(str(status))
        assert response is not None, (
            f"{where}: status not in the document ({sorted(op['responses'])})"
        )
    if "content" not in response:  # an answer declared with no body (a 204)
        assert body == b"", f"{where}: a body where the document declares none"
        return
    media = (content_type or "").split(";", 1)[0].strip()
    content = response.get("content", {})
    assert media in content, f"{where}: Content-Type {content_type!r} not in {sorted(content)}"
    schema = content[media].get("schema")
    if media != "application/json" or schema is None:
        return
    try:
        value = json.loads(body)
    except ValueError:
        raise AssertionError(f"{where}: not JSON: {body[:200]!r}") from None
    bundle = {**schema, "components": doc["components"]}
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in jsonschema_rs.validator_for(bundle).iter_errors(value)
    ]
    assert not errors, f"{where}: the answer does not match the document: {errors[:5]}"


def append_log(store, job_id: str, data: bytes) -> int:
    """Append to a job's log as the follower does (``Store.log_writer``) -> the new size."""
    with store.log_writer(job_id) as f:
        f.write(data)
        return f.tell()


def _split(url: str) -> tuple[Client, str]:
    """A client for `url`'s scheme and host, and the rest of it (path and query)."""
    u = urllib.parse.urlsplit(url)
    rest = urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
    return Client(f"{u.scheme}://{u.netloc}"), rest


def http(
    url: str,
    method: str = "GET",
    body: object = None,
    timeout: float = 30,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """One HTTP call -> (status, body), the answer checked against the served document;
    raises ClientError on an error status, OSError when no answer comes."""
    client, path = _split(url)
    answer = client.call(method, path, body, timeout, headers)
    _check_url(url, method, answer.status, answer.headers.get("Content-Type"), answer.body, headers)
    if answer.status >= 400:
        raise ClientError(f"HTTP {answer.status}: {answer.body[:200]!r}", ExitStatus.FAILED)
    return answer.status, answer.body


def serve_argv(config: object, *extra: str) -> list[str]:
    """The command that runs this checkout's daemon on `config` (then any `extra` options)."""
    return [sys.executable, "-m", "mlbench_daemon", "serve", "--config", str(config), *extra]


def call_json(url: str, method: str = "GET", body: object = None, timeout: float = 60) -> object:
    """One JSON call -> the decoded answer; raises ClientError on an error status, OSError
    when no answer comes."""
    return json.loads(http(url, method, body, timeout)[1])


def call_port(
    port: int, method: str, path: str, body: object = None, timeout: float = 600
) -> tuple[int, object]:
    """One JSON call to 127.0.0.1:`port` -> (status, decoded answer), whatever the status."""
    answer = Client(f"http://127.0.0.1:{port}").call(method, path, body, timeout)
    doc = served_document(f"http://127.0.0.1:{port}")
    check_answer(doc, method, path, answer.status, answer.headers.get("Content-Type"), answer.body)
    return answer.status, answer.json()


def wait_hosts_running(
    port: int, count: int, timeout: float = HANG, process: subprocess.Popen | None = None
) -> None:
    """Poll the daemon's nodes (no forced probe round) until `count` are Running; exit the
    bench after `timeout` s, or as soon as `process` (the daemon) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the daemon exited with {process.returncode}")
        try:
            _, nodes = call_port(port, "GET", "/api/nodes/", timeout=30)
            if sum(n["phase"] == "Running" for n in nodes) == count:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"daemon did not see {count} Running hosts")
        time.sleep(0.2)


def _serves(url: str) -> bool:
    try:
        return http(url + "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


STDERR_DIR = "MLBENCH_TEST_STDERR_DIR"  # set by tests/conftest.py for the session


def stderr_file(config: Path) -> IO | None:
    """A new file in $MLBENCH_TEST_STDERR_DIR named after the running test, for a daemon's
    stderr; None outside pytest or for a daemon configured to log at debug (tracebacks
    belong there)."""
    where = os.environ.get(STDERR_DIR)
    if not where or re.search(r'^level\s*=\s*"debug"', Path(config).read_text(), re.M):
        return None
    test = os.environ.get("PYTEST_CURRENT_TEST", "daemon").rpartition(" (")[0] or "daemon"
    name = re.sub(r"[^\w.\[\]-]+", "_", test)[:150]
    return open(Path(where) / f"{name}.{time.monotonic_ns()}.stderr", "wb")


class Served:
    """`mlbench-daemon serve` as a subprocess: its config, state dir, port, URL and process."""

    def __init__(self, config: Path, state: Path, port: int, stderr: int | IO | None) -> None:
        self.config, self.state, self.port = config, state, port
        self.url = f"http://127.0.0.1:{port}"
        self.stderr = stderr
        self.process: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        """Start the daemon (again, e.g. after a kill -9) on the same config -> the process;
        does not wait for it.  Under pytest, a daemon whose stderr is not taken goes to a
        file that tests/conftest.py checks for tracebacks at the session's end."""
        stderr = self.stderr if self.stderr is not None else stderr_file(self.config)
        try:
            self.process = subprocess.Popen(serve_argv(self.config), cwd=ROOT, stderr=stderr)
        finally:
            if stderr is not self.stderr and stderr is not None:
                stderr.close()  # the daemon has its own copy
        return self.process

    def kill_and_restart(self) -> subprocess.Popen:
        """SIGKILL the daemon (mid-job), start it again on the same config, wait until it
        serves -> the new process."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(HANG)
        self.start()
        wait_for(lambda: _serves(self.url), what="the daemon to serve again")
        return self.process


@contextlib.contextmanager
def served(
    cluster: Cluster,
    work: Path | None = None,
    *,
    stderr: int | IO | None = None,
    **sections: dict,
) -> Iterator[Served]:
    """The daemon serving `cluster` on a free loopback port, with the cluster's config plus
    `sections` (e.g. ``ssh={...}``, ``log={"level": "warning"}``), its config and state in
    `work` (default: a temporary directory, removed afterwards).  Yields once every worker
    is Running; always stops the daemon (the process last started) on the way out."""
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbench-")))
        port = free_port()
        sections["server"] = {**sections.get("server", {}), "port": port}
        config = cluster.write_config(work / "daemon.toml", work / "state", **sections)
        d = Served(config, work / "state", port, stderr)
        d.start()
        stack.callback(lambda: stop_process(d.process))  # the process last started
        wait_hosts_running(port, len(cluster.workers), process=d.process)
        yield d


def cancel_job(jobs, job_id):
    """Jobs.cancel, then the job once final: a 202 means the sweep goes on in the job's
    own thread (server.cancel_answer_s may pass first on a loaded machine)."""
    status, job = jobs.cancel(job_id)
    return job if status == 200 else jobs.wait(job_id, HANG)
