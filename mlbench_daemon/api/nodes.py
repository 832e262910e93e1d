"""GET /api/nodes (and /api/pods): the discovered nodes and their status."""

from __future__ import annotations

import bottle

from mlbench_daemon.api.common import JSON, Deps, flag
from mlbench_daemon.api.plugin import register
from mlbench_daemon.openapi import FLAG, Alias, Param, Route, answer, error, ref

REFRESH_TIMEOUT_S = 10.0


def nodes(deps: Deps) -> str:
    if flag("refresh"):
        deps.registry.refresh(REFRESH_TIMEOUT_S)
    if deps.registry.stale:
        bottle.response.set_header("X-Discovery-Stale", deps.registry.stale_reason or "stale")
    bottle.response.content_type = JSON
    return deps.registry.nodes_json()


ROUTES = [
    Route(
        "GET",
        "/api/nodes/",
        nodes,
        "listNodes",
        "All worker nodes and their status (the seed's endpoint)",
        "nodes",
        {
            200: answer(
                "The nodes.",
                {"type": "array", "items": ref("Node")},
                headers={
                    "X-Discovery-Stale": {
                        "description": "Present when the node list is stale: why DNS "
                        "discovery failed "
                        "(e.g. `dns-timeout`, `nxdomain`, `not-discovered-yet`).",
                        "schema": {"type": "string"},
                    }
                },
            ),
            400: error("Bad query parameter (`field` names it)."),
        },
        description=(
            "A JSON array in natural name order.  Each item starts with the seed's four keys "
            "(`name`, `labels`, `phase`, `ip`), then extras.  Reachability comes from "
            "background SSH probes; the request never waits on DNS or SSH unless `refresh=1` "
            "is given.  When the last DNS refresh failed, the last good list is returned with "
            "an `X-Discovery-Stale` header giving the reason."
        ),
        query=(
            Param(
                "refresh",
                FLAG,
                "`1` (or `true`, `yes`) runs one probe round now and waits for it "
                f"(at most {REFRESH_TIMEOUT_S:g} s) before answering: every node's session is "
                "checked again and its sshd's listening socket looked at (the node connects "
                "to its own sshd only when its last such check is older than "
                "`ssh.listener_interval_s`; full fresh logins only for nodes whose last one "
                "failed); `0`, `false`, `no` or empty: do not.",
            ),
        ),
        aliases=(
            Alias("/api/nodes", "listNodesNoSlash", "All worker nodes (same as `/api/nodes/`)"),
            Alias(
                "/api/pods/",
                "listPods",
                "Alias of `/api/nodes/` (what mlbench-core's client calls)",
            ),
        ),
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
