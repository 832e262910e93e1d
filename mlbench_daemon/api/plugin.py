"""The one Bottle plugin around the whole API, and ``register``, which routes a table.

``ApiPlugin`` owns everything that is the same for every route: on install (``setup``)
the request hooks (trailing slash, browser checks, Cache-Control, request counting) and
the JSON error pages (404, 405, 413, 500); around each route (``apply``) the token check
its table entry asks for and ``ApiError`` -> JSON.  A route that did not come from the
table (``register``) has no entry and is refused when it is first called.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import bottle

from mlbench_daemon import metrics
from mlbench_daemon.api.common import JSON, Deps
from mlbench_daemon.browser import Policy, is_json
from mlbench_daemon.errors import ApiError, Unauthorized, cut, echo
from mlbench_daemon.openapi import Auth, Route

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


class ApiPlugin:
    """Authentication, errors as JSON and request counting, for every route (Bottle's
    plugin API, version 2)."""

    name = "mlbench-api"
    api = 2

    def __init__(self, token: str | None, policy: Policy) -> None:
        self.token, self.policy = token, policy

    def setup(self, app: bottle.Bottle) -> None:
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
        token = self.token if self._needs_token(declared.auth) else None

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if token:
                    self._check_token(token)
                return callback(*args, **kwargs)
            except ApiError as e:
                bottle.response.status = e.status
                bottle.response.content_type = JSON
                return json.dumps(e.body())

        return wrapper

    def _needs_token(self, auth: Auth) -> bool:
        return auth is Auth.TOKEN or (auth is Auth.METRICS and not self.policy.public_metrics)

    @staticmethod
    def _check_token(token: str) -> None:
        given = bottle.request.get_header("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            bottle.response.set_header("WWW-Authenticate", 'Bearer realm="mlbench-daemon"')
            raise Unauthorized("missing or wrong bearer token")

    def _before(self) -> None:
        env = bottle.request.environ
        path = env.get("PATH_INFO", "/")
        if len(path) > 1 and path.endswith("/"):
            env["PATH_INFO"] = path.rstrip("/") or "/"
        _browser_checks(self.policy)

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
