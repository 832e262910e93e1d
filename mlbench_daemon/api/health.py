"""GET /healthz, GET /metrics and GET /api/openapi.json: the daemon about itself."""

from __future__ import annotations

import bottle

from mlbench_daemon import metrics
from mlbench_daemon.api.common import JSON, Deps, as_json
from mlbench_daemon.api.plugin import register
from mlbench_daemon.openapi import Answer, Auth, Route, answer, ref
from mlbench_daemon.vocabulary import Phase


def healthz(deps: Deps) -> str:
    nodes = deps.registry.nodes()
    fault = deps.jobs.store.fault  # only the reason: no path or error text without a token
    return as_json(
        {
            "status": "degraded" if fault else "ok",
            **({"reason": fault.reason} if fault else {}),
            "nodes": len(nodes),
            "running": sum(1 for n in nodes if n.phase == Phase.RUNNING),
            "discovery_stale": deps.registry.stale,
            "discovery_age_s": deps.registry.discovery_age_s(),
        }
    )


def prometheus(deps: Deps) -> bytes:
    fault = deps.jobs.store.fault
    metrics.set_state_fault(fault.reason if fault else None)
    metrics.set_gauges(deps.registry.nodes(), deps.jobs.counts())
    metrics.jobs_stalled.set(deps.jobs.stalled_count())
    metrics.webhook_outbox.set(deps.jobs.store.outbox_depth())
    text, content_type = metrics.render()
    bottle.response.content_type = content_type
    return text


def openapi_document(deps: Deps) -> str:
    bottle.response.content_type = JSON
    return deps.document


ROUTES = [
    Route(
        "GET",
        "/api/openapi.json",
        openapi_document,
        "getOpenApi",
        "This document",
        "meta",
        {
            200: answer(
                "The OpenAPI 3.1 document.",
                {"type": "object", "required": ["openapi", "info", "paths"]},
            )
        },
    ),
    Route(
        "GET",
        "/healthz",
        healthz,
        "health",
        "Liveness and a node count (no authentication)",
        "meta",
        {200: answer("The daemon serves.", ref("Health"))},
        auth=Auth.PUBLIC,
    ),
    Route(
        "GET",
        "/metrics",
        prometheus,
        "metrics",
        "Prometheus metrics (the token, when set, unless `server.public_metrics`)",
        "meta",
        {
            200: Answer(
                "The Prometheus text exposition format.",
                {"text/plain": {"schema": {"type": "string"}}},
            )
        },
        auth=Auth.METRICS,
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
