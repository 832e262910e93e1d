"""The one Bottle plugin around the whole API, and ``register``, which routes a table.

``ApiPlugin`` owns everything that is the same for every route: on install (``setup``)
the request hooks (trailing slash, browser checks, Cache-Control, request counting) and
the JSON error pages (404, 405, 413, 500); around each route (``apply``) the token and
role check its table entry asks for, ``ApiError`` -> JSON, and the audit line of every
write and every refusal (written before the answer is sent).  A route that did not come
from the table (``register``) has no entry and is refused when it is first called.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import bottle

from mlbench_daemon import capability, metrics
from mlbench_daemon.api.common import AUDIT_NOTES, CALLER, JSON, Deps
from mlbench_daemon.browser import Policy, body_type_ok
from mlbench_daemon.errors import ApiError, Forbidden, Unauthorized, cut, echo
from mlbench_daemon.openapi import Auth, Route
from mlbench_daemon.tokens import NOBODY, Caller, Tokens
from mlbench_daemon.vocabulary import Refusal, Role

if TYPE_CHECKING:  # the API is given the audit log; it imports none of it
    from mlbench_daemon.audit import AuditLog
    from mlbench_daemon.capability import Capabilities

log = logging.getLogger("mlbench_daemon.api")

DECLARED = "mlbench.route"  # a Bottle route's config key holding its table entry
NO_STORE = "no-store"  # on every answer but the page's static files
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


def register(app: bottle.Bottle, routes: Iterable[Route], deps: Deps) -> None:
    """Route every entry of *routes* (each of its rules), its handler given *deps*."""
    for route in routes:
        for rule in route.rules():
            app.route(rule, route.method, _bind(route, deps), **{DECLARED: route})


def _bind(route: Route, deps: Deps) -> Callable[..., Any]:
    def callback(**url_args: Any) -> Any:
        return route.handler(deps, **url_args)

    return callback


def _error_body(status: int, error: str, message: str) -> str:
    bottle.response.status = status
    bottle.response.content_type = JSON
    bottle.response.set_header("Cache-Control", NO_STORE)
    return json.dumps({"error": error, "message": message})


READS = ("GET", "HEAD", "OPTIONS")  # every other method is a write: audited
REFUSALS = frozenset(Refusal)  # outcomes audited whatever the method
UNAUTHORIZED = {
    Refusal.NO_TOKEN: "missing or wrong bearer token: none was given",
    Refusal.BAD_TOKEN: "missing or wrong bearer token",
    Refusal.REVOKED: "this token was revoked",
}
CAPABILITY_ROUTE = ("POST", "/api/metrics")  # the one route a run's capability URL reaches
RUN_RANK = Caller(None, Role.VIEWER)  # who a capability request is: no token, no more rights


def _refuse(status: int, message: str, why: Refusal) -> NoReturn:
    """Leave before any route runs: JSON, with the status's error name."""
    metrics.refused_requests_total.labels(why).inc()
    bottle.request.environ[AUDIT_NOTES] = {"outcome": why}
    raise bottle.HTTPResponse(
        json.dumps({"error": STATUS_TEXT[status], "message": message}),
        status=status,
        headers={"Content-Type": JSON},
    )


def _browser_checks(policy: Policy, route: Route | None) -> None:
    """Host, Origin and body type (see browser.py), for every request, before routing;
    *route*: the table entry the request would reach (a form body only for ``form=True``)."""
    env = bottle.request.environ
    host = env.get("HTTP_HOST")
    if not policy.host_allowed(host, int(env.get("SERVER_PORT") or 0)):
        _refuse(
            403,
            f"Host {echo(host)} is not a name of this daemon; see server.allowed_hosts",
            Refusal.HOST,
        )
    origin = env.get("HTTP_ORIGIN")
    if not policy.origin_allowed(origin, host):
        _refuse(
            403,
            f"Origin {echo(origin)} may not use this API; see server.allowed_origins",
            Refusal.ORIGIN,
        )
    form = route is not None and route.form
    if bottle.request.content_length > 0 and not body_type_ok(env.get("CONTENT_TYPE", ""), form):
        _refuse(
            415,
            "a request body must have Content-Type: application/json"
            + (" or application/x-www-form-urlencoded (or multipart/form-data)" if form else ""),
            Refusal.MEDIA_TYPE,
        )


class ApiPlugin:
    """Authentication, roles, errors as JSON, the audit log and request counting, for every
    route (Bottle's plugin API, version 2)."""

    name = "mlbench-api"
    api = 2

    def __init__(
        self,
        tokens: Tokens,
        policy: Policy,
        audit: AuditLog | None = None,
        caps: Capabilities | None = None,
    ) -> None:
        self.tokens, self.policy, self.audit, self.caps = tokens, policy, audit, caps
        self.app: bottle.Bottle | None = None

    def setup(self, app: bottle.Bottle) -> None:
        self.app = app
        app.add_hook("before_request", self._before)
        app.add_hook("after_request", self._after)
        for status in (404, 405, 413, 500):
            app.error_handler[status] = self._http_error

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        declared = route.config.get(DECLARED)
        if not isinstance(declared, Route):
            raise RuntimeError(
                f"{route.method} {route.rule} is not in the route table (api.ROUTES); "
                f"add it there so that it is documented"
            )
        checked = self.tokens.enabled and self._needs_token(declared.auth)
        audited = route.method not in READS

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            env = bottle.request.environ
            env[AUDIT_NOTES] = notes = {"job": kwargs.get("job_id")}
            try:
                if capability.SCOPE in env:  # _before let only its one route through
                    env[CALLER] = RUN_RANK
                    metrics.capability_requests_total.inc()
                else:
                    env[CALLER] = self._caller(declared) if checked else NOBODY
                result = callback(*args, **kwargs)
                notes.setdefault("outcome", "ok")
                return result
            except ApiError as e:
                notes.setdefault("outcome", e.error)
                if isinstance(e, Forbidden) and e.error in REFUSALS:
                    metrics.refused_requests_total.labels(e.error).inc()
                bottle.response.status = e.status
                bottle.response.content_type = JSON
                return json.dumps(e.body())
            except bottle.HTTPResponse as r:  # Bottle's own answer (e.g. a redirect or abort)
                bottle.response.status = r.status_code
                notes.setdefault("outcome", STATUS_TEXT.get(r.status_code, "ok"))
                raise
            except Exception:
                notes.setdefault("outcome", "internal")
                bottle.response.status = 500
                raise
            finally:
                if audited or notes.get("outcome") in REFUSALS:
                    self._audit(route.rule)

        return wrapper

    def _needs_token(self, auth: Auth) -> bool:
        return auth is Auth.TOKEN or (auth is Auth.METRICS and not self.policy.public_metrics)

    def _caller(self, route: Route) -> Caller:
        """The token's caller, whose role may call *route*; else 401 or 403 (counted)."""
        got = self.tokens.check(bottle.request.get_header("Authorization", ""))
        notes = bottle.request.environ[AUDIT_NOTES]
        if isinstance(got, Refusal):
            metrics.refused_requests_total.labels(got).inc()
            notes["outcome"] = got
            bottle.response.set_header("WWW-Authenticate", 'Bearer realm="mlbench-daemon"')
            raise Unauthorized(UNAUTHORIZED[got])
        bottle.request.environ[CALLER] = got
        if route.auth is Auth.TOKEN and not got.role.allows(route.role):
            raise Forbidden(
                f"token {got.name!r} is a {got.role}; {route.method} {route.path} needs a "
                f"{route.role} or above",
                error=Refusal.ROLE,
            )
        return got

    def _audit(self, rule: str) -> None:
        """One audit line for this request, as its answer stands now."""
        if self.audit is None:
            return
        env = bottle.request.environ
        caller = env.get(CALLER) or NOBODY
        notes = env.get(AUDIT_NOTES) or {}
        self.audit.record(
            token=caller.name,
            role=caller.role if caller.name else None,
            source=env.get("REMOTE_ADDR"),
            method=bottle.request.method,
            path=rule,
            job=notes.get("job"),
            outcome=notes.get("outcome") or "ok",
            status=bottle.response.status_code,
            **({"owner": notes["owner"]} if notes.get("owner") else {}),
            **({"run_capability": env[capability.SCOPE]} if capability.SCOPE in env else {}),
        )

    def _before(self) -> None:
        env = bottle.request.environ
        path = env.get("PATH_INFO", "/")
        if len(path) > 1 and path.endswith("/"):
            env["PATH_INFO"] = path = path.rstrip("/") or "/"
        try:
            if path.startswith(capability.PREFIX):
                self._capability(env, path)
            _browser_checks(self.policy, self._declared())
        except bottle.HTTPResponse as refused:
            bottle.response.status = refused.status_code
            self._audit(self._rule())
            raise

    def _declared(self) -> Route | None:
        """The table entry of the route this request would reach, if any."""
        try:
            route, _ = self.app.router.match(bottle.request.environ) if self.app else (None, None)
        except bottle.HTTPError:
            return None
        declared = route.config.get(DECLARED) if route is not None else None
        return declared if isinstance(declared, Route) else None

    def _capability(self, env: dict[str, Any], path: str) -> None:
        """A run's capability URL: the secret leaves the path (and the request line
        waitress keeps) before anything reads it; the run it names becomes the request's
        scope (capability.SCOPE), for its one route; else 404 or 403."""
        secret, _, rest = path[len(capability.PREFIX) :].partition("/")
        env["PATH_INFO"] = "/" + rest
        env.pop("REQUEST_URI", None)
        env.pop("RAW_URI", None)
        run_id = self.caps.check(secret) if self.caps is not None else None
        if run_id is None:
            _refuse(
                404,
                "no such run capability: its run has ended, or the URL is not one this daemon "
                "gave out",
                Refusal.CAPABILITY,
            )
        env[capability.SCOPE] = run_id
        if (bottle.request.method, env["PATH_INFO"]) != CAPABILITY_ROUTE:
            _refuse(
                403,
                "a run's capability URL allows only POST /api/metrics/ (that run's metrics)",
                Refusal.CAPABILITY,
            )

    def _rule(self) -> str:
        """The pattern of the route this request would reach (never the path as sent)."""
        try:
            route, _ = self.app.router.match(bottle.request.environ) if self.app else (None, None)
        except bottle.HTTPError:
            return "unmatched"
        return route.rule if route is not None else "unmatched"

    @staticmethod
    def _after() -> None:
        if not bottle.request.path.startswith("/static/") and bottle.request.path != "/":
            bottle.response.set_header("Cache-Control", NO_STORE)
        route = (
            bottle.request.route.rule if "bottle.route" in bottle.request.environ else "unmatched"
        )
        metrics.http_requests_total.labels(
            route, bottle.request.method, str(bottle.response.status_code)
        ).inc()

    @staticmethod
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
