"""MLBench's metrics: POST /api/metrics, GET /api/metrics, GET /api/metrics/<pk>.

The shapes are mlbench-dashboard's (its ``KubeMetricsView``), which mlbench-core's
``ApiClient`` posts and reads: a point is ``{"date", "value", "cumulative"}`` with
``value`` a string; ``<pk>`` is a run's id (``metric_type=run``) or a node's name
(``metric_type=pod``, MLBench's default).  The points live in ``metricstore.py``; the
runs they belong to come from the daemon's ``RunLookup``.

A request that carries a run's capability (``mlbench.run_scope`` in the environ, set
where the capability path is recognised) may post points of that run only.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from typing import Any

import bottle

from mlbench_daemon.api.common import Deps, as_json, body, int_param, note
from mlbench_daemon.api.plugin import register
from mlbench_daemon.capability import SCOPE
from mlbench_daemon.errors import (
    BadRequest,
    Forbidden,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    echo,
)
from mlbench_daemon.metricstore import (
    RETRY_AFTER_S,
    Busy,
    CapReached,
    MetricStore,
    Point,
    Query,
    RunLike,
    format_date,
    parse_date,
)
from mlbench_daemon.openapi import Answer, Param, Route, answer, error, ref
from mlbench_daemon.shapes import METRIC_METADATA_MAX, METRIC_NAME_MAX, METRIC_VALUE_MAX
from mlbench_daemon.store import StoreError
from mlbench_daemon.vocabulary import Role, StoreReason

RUN_SCOPE = SCOPE  # environ: the run a capability lets this request post for
OFFICIAL = "TaskResult @ 0"  # the metric whose value is a run's official result (MLBench)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
FIELDS = ("run_id", "pod_name", "name", "value", "date", "metadata", "cumulative")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
MAX_SUMMARIZE = 9_999_999  # the document's pattern: up to 7 digits


def _store(deps: Deps) -> MetricStore:
    if deps.metric_store is None:
        raise NotFound("metrics are not available")
    return deps.metric_store


def _fields(deps: Deps) -> dict[str, Any]:
    """The POST's fields: a form's values (strings), or the JSON object's."""
    ctype = bottle.request.content_type.split(";", 1)[0].strip().lower()
    if ctype in FORM_TYPES:
        if bottle.request.content_length > deps.max_body_bytes:
            raise PayloadTooLarge(
                f"request body is {bottle.request.content_length} bytes; the limit is "
                f"{deps.max_body_bytes}"
            )
        forms = bottle.request.forms
        return {k: forms.getunicode(k) for k in forms}
    return body(deps.max_body_bytes) or {}


def _text(fields: dict[str, Any], name: str, limit: int, *, numbers: bool = False) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        value = repr(value) if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string, got {echo(value)}", field=name)
    if len(value) > limit or "\x00" in value:
        raise BadRequest(f"{name}: at most {limit} characters, no NUL", field=name)
    return value


def _cumulative(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise BadRequest(f"cumulative: must be true or false, got {echo(value)}", field="cumulative")


def _run_of(deps: Deps, fields: dict[str, Any]) -> tuple[RunLike, str | None]:
    """(the run the point belongs to, the node's name for a node's point); 404 if none."""
    run_id, pod = fields.get("run_id"), _text(fields, "pod_name", METRIC_NAME_MAX)
    if (run_id is None or run_id == "") == (pod is None or pod == ""):
        raise BadRequest("give run_id (a run's metric) or pod_name (a node's), one of them")
    if pod:
        run = deps.run_lookup.by_pod(pod)
        if run is None:
            raise NotFound(f"no run holds a node named {echo(pod)}")
        return run, pod
    if isinstance(run_id, str) and re.fullmatch(r"\s*[0-9]{1,18}\s*", run_id):
        run_id = int(run_id)
    if isinstance(run_id, bool) or not isinstance(run_id, int):
        raise BadRequest(f"run_id: must be a run's id, got {echo(run_id)}", field="run_id")
    found = deps.run_lookup.get_run(run_id)
    if found is None:
        raise NotFound(f"no run {run_id}")
    return found, None


def post_metric(deps: Deps) -> str:
    store = _store(deps)
    fields = _fields(deps)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {echo(unknown[0])}", field=unknown[0])
    name = _text(fields, "name", METRIC_NAME_MAX)
    if not name:
        raise BadRequest("name: required", field="name")
    value = _text(fields, "value", METRIC_VALUE_MAX, numbers=True)
    if value is None:
        raise BadRequest("value: required", field="value")
    metadata = fields.get("metadata")
    if isinstance(metadata, dict):
        metadata = json.dumps(metadata)
        fields["metadata"] = metadata
    metadata = _text(fields, "metadata", METRIC_METADATA_MAX) or ""
    raw_date = _text(fields, "date", 64)
    try:
        date = parse_date(raw_date) if raw_date else format_date(time.time())
    except ValueError:
        raise BadRequest(
            f"date: ISO 8601 or Python's str(datetime), got {echo(raw_date)}", field="date"
        ) from None
    cumulative = _cumulative(fields.get("cumulative"))
    run, pod = _run_of(deps, fields)
    scope = bottle.request.environ.get(RUN_SCOPE)
    if isinstance(scope, int) and run.id != scope:
        raise Forbidden(f"this capability posts metrics of run {scope} only, not of run {run.id}")
    note(run=run.id)
    point = Point(run.id, name, value, date, cumulative, metadata, pod)
    try:
        store.add(point)
    except StoreError as e:
        cls = InsufficientStorage if e.reason == StoreReason.DISK_FULL else Unavailable
        raise cls(f"the metrics store cannot be written ({e.reason})", error=e.reason) from None
    except CapReached as e:
        raise PayloadTooLarge(str(e), error="metrics-cap") from None
    except Busy as e:
        bottle.response.set_header("Retry-After", str(RETRY_AFTER_S))
        raise QueueFull(f"{e}; try again in {RETRY_AFTER_S} s", error="metrics-busy") from None
    return as_json(point.answer(), 201)


def all_metrics(deps: Deps) -> str:
    store = _store(deps)
    names = {}
    for run_id in store.run_ids():
        run = deps.run_lookup.get_run(run_id)
        if run is not None:
            names[run_id] = run.name
    return as_json(store.everything(names))


def _query() -> Query:
    q = bottle.request.query
    since = q.get("since") or None
    if since is not None:
        try:
            since = parse_date(since)
        except ValueError:
            raise BadRequest(
                f"since: ISO 8601 or Python's str(datetime), got {echo(since)}", field="since"
            ) from None
    name = q.getunicode("metric_filter") or None
    return Query(
        since=since,
        summarize=int_param("summarize", 0, 0, MAX_SUMMARIZE) or None,
        name=name,
        last_n=int_param("last_n", 0, 0, MAX_SUMMARIZE) or None,
    )


def _safe(name: str) -> str:
    """A metric's or node's name as part of a file name in the zip (no directories)."""
    return re.sub(r"[^A-Za-z0-9 _.@+=-]", "_", name).lstrip(".") or "_"


def _zip(store: MetricStore, run: RunLike | None, pod: str | None, q: Query) -> bytes:
    """MLBench's download: ``result_<name>.json`` per metric, and for a run
    ``official_result.txt`` (its ``TaskResult @ 0``) and ``<node>_<name>.json`` per
    node metric, all within the run's lifetime (``TaskResult`` metrics only in the
    text file)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:

        def write(prefix: str, series: dict[str, list[dict[str, Any]]]) -> None:
            for name, points in series.items():
                if "TaskResult" not in name:
                    zf.writestr(f"{_safe(prefix)}_{_safe(name)}.json", json.dumps(points, indent=4))

        if run is not None:
            start = format_date(run.created_at)
            end = format_date(run.finished_at) if run.finished_at else None
            q = Query(max(q.since or start, start), end, q.summarize, q.name, q.last_n)
            write("result", store.run_series(run.id, q))
            official = store.value(run.id, OFFICIAL)
            if official is not None:
                zf.writestr("official_result.txt", official)
            for node in run.nodes:
                write(node, store.pod_series(node, q))
        elif pod is not None:
            write("result", store.pod_series(pod, q))
    return out.getvalue()


def metrics_of(deps: Deps, pk: str) -> str | bytes:
    store = _store(deps)
    q = bottle.request.query
    kind = q.get("metric_type") or "pod"
    if kind not in ("run", "pod"):
        raise BadRequest(f"metric_type: run or pod, got {echo(kind)}", field="metric_type")
    fmt = q.get("format") or "json"
    if fmt not in ("json", "zip"):
        raise BadRequest(f"format: json or zip, got {echo(fmt)}", field="format")
    query = _query()
    run: RunLike | None = None
    pod: str | None = None
    if kind == "run":
        run = deps.run_lookup.get_run(int(pk)) if re.fullmatch(r"[0-9]{1,18}", pk) else None
        if run is None:
            raise NotFound(f"no run {echo(pk)}")
    else:
        if not store.has_pod(pk) and deps.run_lookup.by_pod(pk) is None:
            raise NotFound(f"no node {echo(pk)} has metrics")
        pod = pk
    if fmt == "zip":
        data = _zip(store, run, pod, query)
        bottle.response.content_type = "application/zip"
        name = _safe(run.name if run is not None else pk).replace(" ", "_")
        bottle.response.set_header(
            "Content-Disposition", f"attachment; filename=metrics_{name}.zip"
        )
        return data
    series = store.run_series(run.id, query) if run is not None else store.pod_series(pk, query)
    return as_json(series)


SERIES = {
    "type": "object",
    "description": "Metric name -> points, oldest first.",
    "additionalProperties": {"type": "array", "items": ref("MetricPoint")},
}
FORM = {"application/x-www-form-urlencoded": {"schema": ref("MetricRequest")}}
STORE_ANSWERS = {
    503: error("The metrics store cannot be written (`error` is `state-read-only` or "
               "`state-write-failed`); nothing is stored."),
    507: error("The disk of the metrics store is full (`error` is `state-disk-full`)."),
}  # fmt: skip

ROUTES = [
    Route(
        "POST",
        "/api/metrics/",
        post_metric,
        "postMetric",
        "Store a metric point of a run or of one of its nodes (MLBench)",
        "metrics",
        {
            201: answer("The point stored.", ref("MetricPosted")),
            400: error(
                "A bad field (`field` names it), or neither or both of `run_id` and `pod_name`."
            ),
            403: error("A run's capability posting for another run; or the shared refusals."),
            404: error("No such run, or no run holds that node; nothing is stored."),
            413: error(
                "A cap is reached (`error` is `metrics-cap`; the message names "
                "`metrics.max_points_per_series` or `metrics.max_points_per_run`); or "
                "the body is over `server.max_body_bytes`."
            ),
            429: Answer(
                "Too many points wait to be written (`metrics.queue_size`; `error` is "
                "`metrics-busy`).",
                {"application/json": {"schema": ref("Error")}},
                {"Retry-After": {"description": "Seconds.", "schema": {"type": "string"}}},
            ),
            **STORE_ANSWERS,
        },
        description=(
            "Takes JSON, or a form as mlbench-core's `post_metric` sends it (every value a "
            "string, `cumulative` `True`/`False`, `date` as Python's `str(datetime)`).  The "
            "point is queued and committed with others within 0.1 s; a later read sees it."
        ),
        body=ref("MetricRequest"),
        form=True,
        role=Role.SUBMITTER,
    ),
    Route(
        "GET",
        "/api/metrics/",
        all_metrics,
        "listMetrics",
        "Every node's and every run's metrics (MLBench)",
        "metrics",
        {200: answer("All points, by node and by run name.", ref("AllMetrics"))},
    ),
    Route(
        "GET",
        "/api/metrics/{pk}",
        metrics_of,
        "getMetrics",
        "One run's or one node's metrics, filtered, summarised, or as a zip (MLBench)",
        "metrics",
        {
            200: Answer(
                "The series (JSON), or with `format=zip` MLBench's download: "
                "`result_<name>.json` per metric, and for a run `official_result.txt` (its "
                "`TaskResult @ 0`) and `<node>_<name>.json` per node metric within the run's "
                "lifetime.",
                {
                    "application/json": {"schema": SERIES},
                    "application/zip": {"schema": {"type": "string", "format": "binary"}},
                },
            ),
            400: error("A bad query parameter (`field` names it)."),
            404: error("No such run, or no metrics of that node."),
        },
        query=(
            Param(
                "metric_type",
                {"type": "string", "enum": ["", "run", "pod"]},
                "`run`: `pk` is a run's id; `pod` (the default): a node's name.",
            ),
            Param(
                "since",
                {"type": "string"},
                "Points at or after this date (ISO 8601, or Python's `str(datetime)`: UTC).",
            ),
            Param(
                "summarize",
                {"type": "string", "pattern": "^[0-9]{0,7}$"},
                "At most this many points per metric: consecutive groups of "
                "ceil(count / N) averaged, each at its first point's date.",
            ),
            Param("metric_filter", {"type": "string"}, "One metric only, by name."),
            Param(
                "last_n",
                {"type": "string", "pattern": "^[0-9]{0,7}$"},
                "The last N points of each metric (after `summarize`).",
            ),
            Param("format", {"type": "string", "enum": ["", "json", "zip"]}, "`zip`: a download."),
        ),
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
