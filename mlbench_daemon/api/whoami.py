"""GET /api/whoami: the request's token, its role and what it may do (the page hides
the actions the role cannot take; the API refuses them anyway)."""

from __future__ import annotations

import bottle

from mlbench_daemon.api.common import Deps, as_json, caller
from mlbench_daemon.api.plugin import register
from mlbench_daemon.openapi import Route, answer, ref
from mlbench_daemon.vocabulary import Role


def whoami(deps: Deps) -> str:
    who = caller()
    can_cancel = "none"
    if who.role.allows(Role.ADMIN):
        can_cancel = "all"
    elif who.role.allows(Role.SUBMITTER):
        can_cancel = "own"
    return as_json(
        {
            "name": who.name,
            "role": who.role,
            "auth": deps.tokens_enabled,
            "can_submit": who.role.allows(Role.SUBMITTER),
            "can_cancel": can_cancel,
        }
    )


ROUTES = [
    Route(
        "GET",
        "/api/whoami",
        whoami,
        "whoami",
        "The request's token: its name, its role and what it may do",
        "meta",
        {200: answer("Who you are.", ref("Whoami"))},
        description="Without tokens on the daemon: no name, and the role `admin` (anyone may "
        "do anything, as before tokens).",
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
