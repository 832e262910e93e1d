"""The HTTP API: one Bottle app, its routes declared once in a table.

Each module serves one resource family and declares its routes (``ROUTES``, a list of
``openapi.Route``: method, path, handler, operationId, summary, query parameters, body,
answers by status, who may call it); ``install(app, deps)`` registers them.  ``ROUTES``
here is the whole table, in the document's order: the same list registers the Bottle
routes (``plugin.register``) and generates the document's ``paths`` (``openapi``).
``plugin.ApiPlugin`` does what every route shares: browser checks, the token and its role,
the audit log,
``ApiError`` and ``HTTPError`` -> JSON ``{"error", "message"}``, request counting.
Every path works with and without its trailing slash.

    page       GET /, GET /static/<name>, GET /static/vendor/<name>
    preflight  POST /api/preflight
    nodes      GET /api/nodes, GET /api/pods
    jobs       POST/GET /api/mpi_jobs, GET/DELETE /api/mpi_jobs/<id>, GET .../logs
    runs       POST/GET /api/runs, GET/DELETE /api/runs/<id> (MLBench's runs)
               GET /api/runs/catalogue (the runs' benchmarks, for the page)
    whoami     GET /api/whoami
    metrics    POST/GET /api/metrics, GET /api/metrics/<pk> (MLBench's runs' metrics)
    health     GET /api/openapi.json, GET /healthz, GET /metrics
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import bottle

from mlbench_daemon import openapi
from mlbench_daemon.api import health, jobs, metrics, nodes, page, preflight, runs, whoami
from mlbench_daemon.api.common import MAX_JSON_DEPTH, Deps, json_depth
from mlbench_daemon.api.page import page_files
from mlbench_daemon.api.plugin import ApiPlugin
from mlbench_daemon.api.streams import Streams
from mlbench_daemon.browser import Policy
from mlbench_daemon.tokens import Tokens

if TYPE_CHECKING:  # the API is given these; it imports none of them
    from mlbench_daemon.audit import AuditLog
    from mlbench_daemon.capability import Capabilities
    from mlbench_daemon.jobs import Jobs
    from mlbench_daemon.jobs.preflight import Preflight
    from mlbench_daemon.jobs.runs import Runs
    from mlbench_daemon.metricstore import MetricStore, RunLookup
    from mlbench_daemon.nodes import Registry

__all__ = ["DOCUMENT", "MAX_JSON_DEPTH", "ROUTES", "json_depth", "make_app", "page_files", "render"]

MODULES = (page, preflight, nodes, jobs, runs, whoami, health, metrics)  # in the document's order
ROUTES: list[openapi.Route] = [route for module in MODULES for route in module.ROUTES]
DOCUMENT: dict[str, Any] = openapi.document(ROUTES)


def render() -> str:
    """The served document's bytes."""
    return openapi.render(ROUTES)


def make_app(
    registry: Registry,
    jobs: Jobs,
    token: str | None = None,
    max_body_bytes: int = 1 << 20,
    policy: Policy | None = None,
    max_streams: int = 4,
    preflight: Preflight | None = None,
    tokens: Tokens | None = None,
    audit: AuditLog | None = None,
    runs: Runs | None = None,
    metric_store: MetricStore | None = None,
    run_lookup: RunLookup | None = None,
    caps: Capabilities | None = None,
) -> bottle.Bottle:
    """The app; *tokens* (or the single *token*, an admin) are what requests must carry,
    none = no auth; *audit* gets a line per write and per refusal; *metric_store* holds
    the runs' metrics, *run_lookup* says which runs there are (none: no run); *caps*: the
    runs' capability URLs (capability.py), none = no such URL is valid."""
    policy = policy or Policy()
    tokens = tokens or Tokens(legacy=token)
    app = bottle.Bottle(catchall=True)
    streams = Streams(max_streams)
    deps = Deps(registry, jobs, preflight, max_body_bytes, streams, render(), tokens.enabled, runs)
    if metric_store is not None:
        deps = dataclasses.replace(deps, metric_store=metric_store)
    if run_lookup is not None:
        deps = dataclasses.replace(deps, run_lookup=run_lookup)
    app.install(ApiPlugin(tokens, policy, audit, caps))
    for module in MODULES:
        module.install(app, deps)
    return app
