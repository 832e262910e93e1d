"""The HTTP API: Bottle routes only.

Each handler parses its input, calls the node registry or the jobs, and
shapes JSON. Every failure leaves as JSON ``{"error", "message"}`` with its
status, from exactly one place (``_error_body``); never an HTML page or a
stack trace. Every path works with and without its trailing slash.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import bottle
import msgspec

from mlbench_daemon import metrics, openapi
from mlbench_daemon.browser import Policy, is_json
from mlbench_daemon.errors import (
    ApiError,
    BadRequest,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    TooManyStreams,
    Unauthorized,
    Unavailable,
    cut,
    echo,
)
from mlbench_daemon.store import LOG_CHUNK_MAX, StoreError
from mlbench_daemon.vocabulary import Phase, StoreReason

if TYPE_CHECKING:  # api.py is given these; it imports none of them
    from mlbench_daemon.jobs import Jobs
    from mlbench_daemon.jobs.preflight import Preflight
    from mlbench_daemon.nodes import Registry

log = logging.getLogger(__name__)

JSON = "application/json"
# far deeper than any field needs; Python's parser recurses and fails near 1,000
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")
REFRESH_TIMEOUT_S = 10.0
NO_STORE = "no-store"  # on every answer but the page's static files
# The status page (mlbench_daemon/web/): public, same-origin only, no inline code.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated each time: a new daemon version is seen at once
}
PAGE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
STATUS_TEXT = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
    500: "internal",
}


def _json(value: Any, status: int = 200) -> str:
    bottle.response.status = status
    bottle.response.content_type = JSON
    return json.dumps(value)


def _int_param(name: str, default: int, lo: int, hi: int) -> int:
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw):
        raise BadRequest(f"{name}: must be a whole number, got {echo(raw)}", field=name)
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be from {lo} to {hi}, got {value}", field=name)
    return value


def _flag(name: str) -> bool:
    raw = bottle.request.query.get(name, "")
    if raw.lower() in ("", "0", "false", "no"):
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    raise BadRequest(f"{name}: must be 0 or 1, got {echo(raw)}", field=name)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in *raw*, brackets inside strings not counted.

    A cheap scan before parsing: json.loads recurses and raises RecursionError on deep input.
    Malformed input gets some number; the parser then says what is wrong with it.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return MAX_JSON_DEPTH  # (at most): no need to look closer
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', raw)):
        if m.group() in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _body(max_bytes: int) -> dict[str, Any] | None:
    """The request's JSON object, or None for an empty body."""
    length = bottle.request.content_length
    if length > max_bytes:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
    raw = bottle.request.body.read(max_bytes + 1) if length else b""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
    if not raw:  # whitespace is not JSON: only a truly empty body means "the default job"
        return None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequest(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body: not valid JSON: {e}", field="body") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object", field="body")
    return body


def _error_body(status: int, error: str, message: str) -> str:
    bottle.response.status = status
    bottle.response.content_type = JSON
    bottle.response.set_header("Cache-Control", NO_STORE)
    return json.dumps({"error": error, "message": message})


def page_files() -> dict[str, bytes]:
    """{name: bytes} of the status page's static files (package data)."""
    web = importlib.resources.files("mlbench_daemon") / "web"
    return {
        f.name: f.read_bytes()
        for f in web.iterdir()
        if f.is_file() and "." + f.name.rpartition(".")[2] in PAGE_TYPES
    }


class Streams:
    """Long answers in flight (log follows and sync POSTs still waiting), at most
    ``limit`` at once: each holds a server thread for as long as it lasts."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.held >= self.limit:
                raise TooManyStreams(
                    f"{self.held} long request(s) (log follows, waiting POSTs) are open, the "
                    f"most server.max_streams allows; try again later"
                )
            self.held += 1

    def give(self) -> None:
        with self._lock:
            self.held -= 1


class _Held:
    """An answer's chunks holding one stream slot until the body is done or closed
    (the WSGI server calls close(); Bottle drops an iterator that yields nothing)."""

    def __init__(self, chunks: Iterable[bytes], streams: Streams) -> None:
        self.chunks: Iterator[bytes] = iter(chunks)
        self.streams: Streams | None = streams

    def __iter__(self) -> _Held:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        streams, self.streams = self.streams, None
        if streams is not None:
            try:
                getattr(self.chunks, "close", lambda: None)()
            finally:
                streams.give()


def _refuse(status: int, message: str) -> NoReturn:
    """Leave before any route runs: JSON, with the status's error name."""
    raise bottle.HTTPResponse(
        json.dumps({"error": STATUS_TEXT[status], "message": message}),
        status=status,
        headers={"Content-Type": JSON},
    )


def _browser_checks(policy: Policy) -> None:
    """Host, Origin and body type (see browser.py), for every request, before routing."""
    env = bottle.request.environ
    host = env.get("HTTP_HOST")
    if not policy.host_allowed(host, int(env.get("SERVER_PORT") or 0)):
        _refuse(403, f"Host {echo(host)} is not a name of this daemon; see server.allowed_hosts")
    origin = env.get("HTTP_ORIGIN")
    if not policy.origin_allowed(origin, host):
        _refuse(403, f"Origin {echo(origin)} may not use this API; see server.allowed_origins")
    if bottle.request.content_length > 0 and not is_json(env.get("CONTENT_TYPE", "")):
        _refuse(415, "a request body must have Content-Type: application/json")


def make_app(
    registry: Registry,
    jobs: Jobs,
    token: str | None = None,
    max_body_bytes: int = 1 << 20,
    policy: Policy | None = None,
    max_streams: int = 4,
    preflight: Preflight | None = None,
) -> bottle.Bottle:
    policy = policy or Policy()
    app = bottle.Bottle(catchall=True)
    streams = Streams(max_streams)
    files = page_files()

    @app.hook("before_request")
    def _before() -> None:
        env = bottle.request.environ
        path = env.get("PATH_INFO", "/")
        if len(path) > 1 and path.endswith("/"):
            env["PATH_INFO"] = path.rstrip("/") or "/"
        _browser_checks(policy)

    def needs_token(path: str) -> bool:
        return path.startswith("/api/") or (path == "/metrics" and not policy.public_metrics)

    @app.hook("after_request")
    def _count() -> None:
        if not bottle.request.path.startswith("/static/") and bottle.request.path != "/":
            bottle.response.set_header("Cache-Control", NO_STORE)
        route = (
            bottle.request.route.rule if "bottle.route" in bottle.request.environ else "unmatched"
        )
        metrics.http_requests_total.labels(
            route, bottle.request.method, str(bottle.response.status_code)
        ).inc()

    def guard(callback: Callable[..., Any]) -> Callable[..., Any]:
        """Authentication and ApiError -> JSON, around every route."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if token and needs_token(bottle.request.path):
                    given = bottle.request.get_header("Authorization", "")
                    scheme, _, value = given.partition(" ")
                    if scheme.lower() != "bearer" or not hmac.compare_digest(
                        value.strip().encode(), token.encode()
                    ):
                        bottle.response.set_header(
                            "WWW-Authenticate", 'Bearer realm="mlbench-daemon"'
                        )
                        raise Unauthorized("missing or wrong bearer token")
                return callback(*args, **kwargs)
            except ApiError as e:
                bottle.response.status = e.status
                bottle.response.content_type = JSON
                return json.dumps(e.body())

        return wrapper

    app.install(guard)

    @app.error(404)
    @app.error(405)
    @app.error(413)
    @app.error(500)
    def _http_error(err: bottle.HTTPError) -> str:
        if err.status_code == 500:
            log.error(
                "internal error on %s %s: %r",
                bottle.request.method,
                bottle.request.path,
                err.exception,
                exc_info=err.exception,
            )
            message = "internal error; see the daemon's log"
        elif err.status_code == 405:
            message = f"{cut(bottle.request.method)} is not allowed on {cut(bottle.request.path)}"
        elif err.status_code == 404:
            message = f"no such endpoint: {cut(bottle.request.path)}"
        else:
            message = str(err.body)
        return _error_body(err.status_code, STATUS_TEXT.get(err.status_code, "error"), message)

    # ---- the status page ---------------------------------------------------------
    def _page_file(name: str) -> bytes:
        if name not in files:
            raise bottle.HTTPError(404)
        for k, v in PAGE_HEADERS.items():
            bottle.response.set_header(k, v)
        bottle.response.content_type = PAGE_TYPES["." + name.rpartition(".")[2]]
        return files[name]

    @app.get("/")
    def page() -> bytes:
        return _page_file("index.html")

    @app.get("/static/<name>")
    def static(name: str) -> bytes:
        return _page_file(name)

    # ---- nodes ---------------------------------------------------------------
    @app.get("/api/nodes")
    @app.get("/api/pods")
    def nodes() -> str:
        if _flag("refresh"):
            registry.refresh(REFRESH_TIMEOUT_S)
        if registry.stale:
            bottle.response.set_header("X-Discovery-Stale", registry.stale_reason or "stale")
        bottle.response.content_type = JSON
        return registry.nodes_json()

    def refuse_if_store_fault() -> None:
        """507 (disk full) or 503 (read-only, other) naming the reason: nothing new can be
        recorded."""
        fault = jobs.store.fault
        if fault is None:
            return
        cls = InsufficientStorage if fault.reason == StoreReason.DISK_FULL else Unavailable
        raise cls(f"the daemon's state dir cannot be written ({fault.reason})", error=fault.reason)

    @app.get("/healthz")
    def healthz() -> str:
        nodes = registry.nodes()
        fault = jobs.store.fault  # only the reason: no path or error text without a token
        return _json(
            {
                "status": "degraded" if fault else "ok",
                **({"reason": fault.reason} if fault else {}),
                "nodes": len(nodes),
                "running": sum(1 for n in nodes if n.phase == Phase.RUNNING),
                "discovery_stale": registry.stale,
                "discovery_age_s": registry.discovery_age_s(),
            }
        )

    @app.get("/metrics")
    def prometheus() -> bytes:
        fault = jobs.store.fault
        metrics.set_state_fault(fault.reason if fault else None)
        metrics.set_gauges(registry.nodes(), jobs.counts())
        body, content_type = metrics.render()
        bottle.response.content_type = content_type
        return body

    @app.get("/api/openapi.json")
    def openapi_document() -> str:
        bottle.response.content_type = JSON
        return openapi.render()

    # ---- jobs ----------------------------------------------------------------
    @app.post("/api/mpi_jobs")
    def submit() -> str | _Held:
        body = _body(max_body_bytes)
        refuse_if_store_fault()
        wait = (body or {}).get("wait", True)
        if wait is True:
            streams.take()  # before the job exists: a refused request leaves nothing behind
        try:
            try:
                job = jobs.submit(body)  # validates every field, `wait` included
            except StoreError:
                refuse_if_store_fault()  # the fault this write just met
                raise
            if wait is not True:
                bottle.response.set_header("Location", f"/api/mpi_jobs/{job['id']}")
                return _json(job, 202)
            answer = jobs.wait_json(job["id"])  # blocks here, before the 200 is sent
        except BaseException:
            if wait is True:
                streams.give()
            raise
        bottle.response.content_type = JSON
        return _Held(answer, streams)

    @app.post("/api/preflight")
    def run_preflight() -> str:
        if preflight is None:
            raise NotFound("preflight is not available")
        return _json(preflight.run(_body(max_body_bytes)))

    @app.get("/api/mpi_jobs")
    def list_jobs() -> str:
        return _json(
            jobs.list(
                limit=_int_param("limit", 50, 1, 1000), offset=_int_param("offset", 0, 0, 1 << 31)
            )
        )

    @app.get("/api/mpi_jobs/<job_id>")
    def get_job(job_id: str) -> str:
        return _json(jobs.get(job_id))

    @app.delete("/api/mpi_jobs/<job_id>")
    def cancel_job(job_id: str) -> str:
        status, job = jobs.cancel(job_id)  # bounded by server.cancel_answer_s
        return _json(job, status)

    @app.get("/api/mpi_jobs/<job_id>/ranks")
    def job_ranks(job_id: str) -> str:
        jobs.get(job_id)  # a 404 before a stream slot is taken
        streams.take()  # a roll-call holds a thread for up to mpi.roll_call_timeout_s
        try:
            return _json(msgspec.to_builtins(jobs.roll_call(job_id)))
        finally:
            streams.give()

    @app.get("/api/mpi_jobs/<job_id>/logs")
    def job_logs(job_id: str) -> bytes | _Held:
        offset = _int_param("offset", 0, 0, 1 << 62)
        limit = _int_param("limit", LOG_CHUNK_MAX, 1, LOG_CHUNK_MAX)
        tail = _int_param("tail", -1, 0, 1 << 62)  # -1: not given
        follow = _flag("follow")
        if tail >= 0 and bottle.request.query.get("offset") not in (None, ""):
            raise BadRequest("tail: give either tail or offset, not both", field="tail")
        job = jobs.get(job_id)  # a 404 must come before the stream starts
        if tail >= 0:
            offset = max(0, job["log_bytes"] - tail)
            bottle.response.set_header("X-Log-Start", str(offset))
        bottle.response.content_type = "application/octet-stream"
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        if follow:
            streams.take()
            gone = bottle.request.environ.get("waitress.client_disconnected")
            return _Held(jobs.follow_log(job_id, offset, gone=gone), streams)
        data, next_offset = jobs.read_log(job_id, offset, limit)
        bottle.response.set_header("X-Next-Offset", str(next_offset))
        return data

    return app
