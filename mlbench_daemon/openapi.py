"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /api/openapi.json``.

``DOCUMENT`` is a plain dict, kept in step with ``api.py`` (routes, query
parameters, status codes, headers), ``nodes.NodeStatus.to_json`` (node items)
and ``jobs.Jobs.to_json``/``jobs.validate`` (job dicts and the request body).
``tests/test_openapi.py`` checks that it is a valid OpenAPI 3.1 document, that
it names exactly the routes of ``api.make_app``, and runs schemathesis against
a live daemon on the test cluster with it.

Every path also works with a trailing slash (or without one).  The seed's two
endpoints are described under both spellings, so that generated tests exercise
both; the others under one.
"""

import json
from typing import Any

from mlbench_daemon import __version__, shapes

_REF = "#/components/schemas/"
Schema = dict[str, Any]  # a piece of the OpenAPI document


def _ref(name: str) -> Schema:
    return {"$ref": _REF + name}


def _json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> Schema:
    return {"description": description, "content": _json_content(_ref("Error"))}


# Error responses shared by the /api/ operations.
_UNAUTHORIZED = {
    "description": "The daemon has a token (`server.token_file`) and the request did not carry "
    "`Authorization: Bearer <token>`.",
    "headers": {
        "WWW-Authenticate": {
            "description": 'Always `Bearer realm="mlbench-daemon"`.',
            "schema": {"type": "string"},
        }
    },
    "content": _json_content(_ref("Error")),
}
_INTERNAL = _error("A bug in the daemon; the message points to its log (never a stack trace).")
_FORBIDDEN = _error(
    "Browser safety: `Host` is not a name of this daemon (`server.allowed_hosts`), or `Origin` "
    "is present and is neither the daemon's own origin nor in `server.allowed_origins`."
)
_UNSUPPORTED = _error("A non-empty body whose `Content-Type` is not `application/json`.")


def _api_responses(**responses: Schema) -> Schema:
    """The given responses plus 401, 403, 415 and 500, as every /api/ operation can answer them."""
    out = dict(responses)
    out.setdefault("401", _UNAUTHORIZED)
    out.setdefault("403", _FORBIDDEN)
    out.setdefault("415", _UNSUPPORTED)
    out.setdefault("500", _INTERNAL)
    return out


# A query flag as api._flag reads it: 1/true/yes or 0/false/no (any case); empty = off.
_FLAG = {
    "type": "string",
    "pattern": "^(?:[01]|[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[Yy][Ee][Ss]|[Nn][Oo])?$",
}

_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "The job's id (hex digits: creation time in milliseconds, then random bits).",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{20,}$"},
}

_NODES_OP: Schema = {
    "summary": "All worker nodes and their status (the seed's endpoint)",
    "description": (
        "A JSON array in natural name order.  Each item starts with the seed's four keys "
        "(`name`, `labels`, `phase`, `ip`), then extras.  Reachability comes from background "
        "SSH probes; the request never waits on DNS or SSH unless `refresh=1` is given.  "
        "When the last DNS refresh failed, the last good list is returned with an "
        "`X-Discovery-Stale` header giving the reason."
    ),
    "tags": ["nodes"],
    "parameters": [
        {
            "name": "refresh",
            "in": "query",
            "required": False,
            "allowEmptyValue": True,
            "description": "`1` (or `true`, `yes`) runs one probe round now and waits for it "
            "(at most 10 s) before answering: every node's session and listener are checked "
            "again (full fresh logins only for nodes whose last one failed); `0`, `false`, "
            "`no` or empty: do not.",
            "schema": _FLAG,
        }
    ],
    "responses": _api_responses(
        **{
            "200": {
                "description": "The nodes.",
                "headers": {
                    "X-Discovery-Stale": {
                        "description": "Present when the node list is stale: why DNS "
                        "discovery failed "
                        "(e.g. `dns-timeout`, `nxdomain`, `not-discovered-yet`).",
                        "schema": {"type": "string"},
                    }
                },
                "content": _json_content({"type": "array", "items": _ref("Node")}),
            },
            "400": _error("Bad query parameter (`field` names it)."),
        }
    ),
}


def _nodes_op(operation_id: str, summary: str | None = None, extra: str = "") -> Schema:
    op = dict(_NODES_OP, operationId=operation_id)
    if summary:
        op["summary"] = summary
    if extra:
        op["description"] = _NODES_OP["description"] + "  " + extra
    return op


_SUBMIT_OP: Schema = {
    "summary": "Start an MPI job (the seed's endpoint)",
    "description": (
        "The body is optional: an empty body runs `mpi.program` on every selected `Running` "
        "node.  With `wait` true (the default) the answer comes when the job is over: the "
        "seed's keys `nodes`, `command`, `master_name`, `response` (the whole output), plus "
        "`id`, `state`, `exit_code` and the rest of the job.  With `wait` false the answer is "
        "202 at once, with the job and a `Location` header.  Program and env together must "
        "stay under 256 KiB.  A request with `wait` true holds a server thread until the job "
        "ends: it counts against `server.max_streams` (with log follows)."
    ),
    "tags": ["jobs"],
    "requestBody": {
        "required": False,
        "content": _json_content(_ref("JobRequest")),
    },
    "responses": _api_responses(
        **{
            "200": {
                "description": "`wait` true: the job has ended (in any final state).",
                "content": _json_content(_ref("JobResult")),
            },
            "202": {
                "description": "`wait` false: the job is accepted (pending or running).",
                "headers": {
                    "Location": {
                        "description": "`/api/mpi_jobs/<id>`",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                },
                "content": _json_content(_ref("Job")),
            },
            "400": _error(
                "Bad request body; `field` names the field (`body` for the body as a whole)."
            ),
            "409": _error(
                "A requested node or master is unknown, not matching the selector, "
                "or not `Running`."
            ),
            "413": _error("The body is over `server.max_body_bytes`."),
            "429": _error(
                "`mpi.max_concurrent_jobs` are running and `mpi.queue_size` more are queued."
            ),
            "503": _error(
                "No `Running` node matches the selector (`unavailable`); or, with `wait` true, "
                "`server.max_streams` long requests are open already (`too-many-streams`, and no "
                "job is made); or the state dir is read-only (`error` is `state-read-only` or "
                "`state-write-failed`)."
            ),
            "507": _error("The state dir is full (`error` is `state-disk-full`); no job is made."),
        }
    ),
}


def _submit_op(operation_id: str, summary: str | None = None) -> Schema:
    op = dict(_SUBMIT_OP, operationId=operation_id)
    if summary:
        op["summary"] = summary
    return op


_LIST_JOBS_OP = {
    "operationId": "listJobs",
    "summary": "Jobs, newest first",
    "tags": ["jobs"],
    "parameters": [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "allowEmptyValue": True,
            "description": "At most this many jobs.",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
        },
        {
            "name": "offset",
            "in": "query",
            "required": False,
            "allowEmptyValue": True,
            "description": "Skip this many of the newest.",
            "schema": {"type": "integer", "minimum": 0, "maximum": 2**31, "default": 0},
        },
    ],
    "responses": _api_responses(
        **{
            "200": {
                "description": "The jobs.",
                "content": _json_content({"type": "array", "items": _ref("Job")}),
            },
            "400": _error("Bad `limit` or `offset` (`field` names it)."),
        }
    ),
}

# The answers' and requests' schemas come from their declarations (shapes.py); the sync
# answer (a Job plus its output) is written here.
SCHEMAS: dict[str, Any] = {
    **shapes.components(),
    "JobResult": {
        "description": "A finished job with its whole output (`POST` with `wait` true).",
        "allOf": [
            _ref("Job"),
            {
                "type": "object",
                "required": ["response"],
                "properties": {
                    "response": {
                        "type": "string",
                        "description": "stdout and stderr interleaved as produced "
                        "(invalid UTF-8 replaced).",
                    }
                },
            },
        ],
    },
}

_PAGE_RESPONSES = {
    "403": _FORBIDDEN,
    "415": _UNSUPPORTED,
    "500": _INTERNAL,
}

_PREFLIGHT_OP = {
    "summary": "Check that a job with these fields can launch, from the master",
    "description": (
        "Runs from the master, as the launcher will: ssh to each worker in batch mode with "
        "strict host keys, the launcher's remote daemon found the way the launcher looks "
        "for it, the same MPI version, the program, writable directories, TCP between "
        "nodes where python3 is there to test it, np against the slots.  One at a time; "
        "the whole run is bounded by `mpi.preflight_timeout_s`.  Leaves nothing behind."
    ),
    "tags": ["jobs"],
    "requestBody": {
        "required": False,
        "content": _json_content(_ref("PreflightRequest")),
    },
    "responses": _api_responses(
        **{
            "200": {
                "description": "The checks (`ok` false when one failed).",
                "content": _json_content(_ref("PreflightResult")),
            },
            "400": _error("Bad request body; `field` names the field."),
            "409": _error("A requested node or master is unknown or not `Running`."),
            "413": _error("The body is over `server.max_body_bytes`."),
            "429": _error("Another preflight is running."),
            "503": _error("No `Running` node matches the selector."),
        }
    ),
}

PATHS = {
    "/": {
        "get": {
            "operationId": "statusPage",
            "summary": "The status page (public; it asks for the token when the API needs one)",
            "tags": ["page"],
            "security": [],
            "responses": {
                "200": {
                    "description": "The page's HTML, with a strict Content-Security-Policy.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                **_PAGE_RESPONSES,
            },
        },
    },
    "/static/{name}": {
        "get": {
            "operationId": "statusPageFile",
            "summary": "One of the status page's files (its HTML, ES modules, CSS, icon)",
            "tags": ["page"],
            "security": [],
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "The file.",
                    "content": {
                        "text/html": {"schema": {"type": "string"}},
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                        "image/svg+xml": {"schema": {"type": "string"}},
                    },
                },
                "404": _error("No such file."),
                **_PAGE_RESPONSES,
            },
        },
    },
    "/api/preflight/": {"post": dict(_PREFLIGHT_OP, operationId="runPreflight")},
    "/api/preflight": {"post": dict(_PREFLIGHT_OP, operationId="runPreflightNoSlash")},
    "/api/nodes/": {"get": _nodes_op("listNodes")},
    "/api/nodes": {
        "get": _nodes_op("listNodesNoSlash", "All worker nodes (same as `/api/nodes/`)")
    },
    "/api/pods/": {
        "get": _nodes_op("listPods", "Alias of `/api/nodes/` (what mlbench-core's client calls)")
    },
    "/api/mpi_jobs/": {
        "post": _submit_op("submitJob"),
        "get": _LIST_JOBS_OP,
    },
    "/api/mpi_jobs": {
        "post": _submit_op("submitJobNoSlash", "Start an MPI job (same as `/api/mpi_jobs/`)"),
        "get": dict(
            _LIST_JOBS_OP, operationId="listJobsNoSlash", summary="Jobs (same as `/api/mpi_jobs/`)"
        ),
    },
    "/api/mpi_jobs/{job_id}": {
        "parameters": [_JOB_ID],
        "get": {
            "operationId": "getJob",
            "summary": "One job",
            "tags": ["jobs"],
            "responses": _api_responses(
                **{
                    "200": {"description": "The job.", "content": _json_content(_ref("Job"))},
                    "404": _error("No such job."),
                }
            ),
        },
        "delete": {
            "operationId": "cancelJob",
            "summary": "Cancel a job",
            "description": "TERM to the job's process group on the master, "
            "`mpi.cancel_grace_s`, then "
            "KILL; then every host of the job is swept for its processes (the result is "
            "in `error`).  The kill and sweep run in the job's own thread: the answer "
            "comes within `server.cancel_answer_s`, 200 once the job is final, else 202 "
            "with the job as it is (the cancel goes on; a second DELETE starts nothing). "
            "A master that cannot be reached is tried again every 5 s (`error` says so).",
            "tags": ["jobs"],
            "responses": _api_responses(
                **{
                    "200": {
                        "description": "The job, final: normally `cancelled`.",
                        "content": _json_content(_ref("Job")),
                    },
                    "202": {
                        "description": "The job, not final yet: the kill and sweep go on.",
                        "content": _json_content(_ref("Job")),
                    },
                    "404": _error("No such job."),
                    "409": _error("The job is already final, or not followed by this daemon."),
                    "503": _error(
                        "The state dir cannot be written (`error` is `state-read-only` or "
                        "`state-write-failed`): the cancel goes on."
                    ),
                    "507": _error(
                        "The state dir is full (`error` is `state-disk-full`): the cancel goes on, "
                        "and the job is recorded once the disk takes writes again."
                    ),
                }
            ),
        },
    },
    "/api/mpi_jobs/{job_id}/ranks": {
        "parameters": [_JOB_ID],
        "get": {
            "operationId": "getJobRanks",
            "summary": "Roll-call: every rank of a running job with its stack",
            "description": "For every rank: its node, pid, process state, CPU time and CPU % "
            "over a short sample, RSS, and a stack (`py-spy dump --nonblocking` for a Python "
            "rank where the node has py-spy, else `gdb -batch` where installed, else the "
            "kernel's `wchan`; `stack_source`, and `stack_error` names what was missing or "
            "denied).  Ranks are grouped by normalised stack; `suspects` are the ranks "
            "outside the majority.  One script per node, all nodes at once, each bounded by "
            "`mpi.roll_call_timeout_s`.  Concurrent requests for one job share one "
            "roll-call; each holds a server thread and counts against `server.max_streams`.",
            "tags": ["jobs"],
            "responses": _api_responses(
                **{
                    "200": {
                        "description": "The roll-call.",
                        "content": _json_content(_ref("RollCall")),
                    },
                    "404": _error("No such job."),
                    "409": _error("The job is not running (pending or final)."),
                    "503": _error(
                        "`server.max_streams` long requests are open already (`too-many-streams`)."
                    ),
                }
            ),
        },
    },
    "/api/mpi_jobs/{job_id}/logs": {
        "parameters": [_JOB_ID],
        "get": {
            "operationId": "getJobLogs",
            "summary": "A chunk of a job's output, or all of it as it comes",
            "description": "Raw bytes (stdout and stderr interleaved) from `offset`: at most "
            "`limit` bytes, with the offset to ask for next in `X-Next-Offset`.  `tail=N` "
            "starts at the last min(N, size) bytes instead (`X-Log-Start` says where; not "
            "with `offset`).  "
            "With `follow=1` the answer streams from `offset` (or from size - N with `tail`) "
            "until the job is final (no `X-Next-Offset`; `limit` is ignored); it holds a "
            "server thread, and counts against `server.max_streams`.",
            "tags": ["jobs"],
            "parameters": [
                {
                    "name": "offset",
                    "in": "query",
                    "required": False,
                    "allowEmptyValue": True,
                    "schema": {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "allowEmptyValue": True,
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 1 << 20,
                        "default": 1 << 20,
                    },
                },
                {
                    "name": "tail",
                    "in": "query",
                    "required": False,
                    "allowEmptyValue": True,
                    "description": "Start at the last min(`tail`, size) bytes; not with `offset`.",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 2**62},
                },
                {
                    "name": "follow",
                    "in": "query",
                    "required": False,
                    "allowEmptyValue": True,
                    "description": "`1` (or `true`, `yes`) streams until the job is final; "
                    "`0`, `false`, `no` or empty: one chunk.",
                    "schema": _FLAG,
                },
            ],
            "responses": _api_responses(
                **{
                    "200": {
                        "description": "Output bytes (possibly none).",
                        "headers": {
                            "X-Next-Offset": {
                                "description": "`offset` plus the bytes returned "
                                "(not with `follow=1`).",
                                "schema": {"type": "integer", "minimum": 0},
                            },
                            "X-Log-Start": {
                                "description": "With `tail`: the offset of the first byte "
                                "returned (size - `tail`, or 0).",
                                "schema": {"type": "integer", "minimum": 0},
                            },
                        },
                        "content": {"application/octet-stream": {}},
                    },
                    "400": _error(
                        "Bad `offset`, `limit`, `tail` or `follow`, or `tail` with `offset` "
                        "(`field` names it)."
                    ),
                    "404": _error("No such job."),
                    "503": _error(
                        "`follow=1`, and `server.max_streams` long requests are open already "
                        "(`too-many-streams`)."
                    ),
                }
            ),
        },
    },
    "/api/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "tags": ["meta"],
            "responses": _api_responses(
                **{
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": _json_content(
                            {"type": "object", "required": ["openapi", "info", "paths"]}
                        ),
                    },
                }
            ),
        },
    },
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "Liveness and a node count (no authentication)",
            "tags": ["meta"],
            "security": [],
            "responses": {
                "200": {
                    "description": "The daemon serves.",
                    "content": _json_content(_ref("Health")),
                },
                "403": _FORBIDDEN,
                "415": _UNSUPPORTED,
                "500": _INTERNAL,
            },
        },
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (the token, when set, unless `server.public_metrics`)",
            "tags": ["meta"],
            "responses": _api_responses(
                **{
                    "200": {
                        "description": "The Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                }
            ),
        },
    },
}

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {
        "title": "mlbench-daemon",
        "version": __version__,
        "summary": "SSH-native launcher for MPI jobs, serving the MLBench dashboard's REST API.",
        "description": (
            'JSON everywhere, including every error (`Error`: `{"error", "message"}`, plus '
            "`field` for bad input), with its 4xx/5xx status: unknown paths answer 404 and "
            "unsupported methods 405 (with `Allow`), both as `Error`.  Every path works with and "
            "without its trailing slash.  When the daemon has a token (`server.token_file`), "
            "every `/api/` call needs `Authorization: Bearer <token>` (and `/metrics` too, unless "
            "`server.public_metrics`); without one, none does.  Browser safety: a request whose "
            "`Host` is not a name of the daemon, or whose `Origin` is foreign, gets 403; a "
            "non-empty body that is not `application/json` gets 415.  No CORS headers are sent."
        ),
    },
    "tags": [
        {"name": "nodes", "description": "Discovered nodes and their SSH reachability."},
        {"name": "jobs", "description": "MPI jobs: start, list, inspect, follow output, cancel."},
        {"name": "meta", "description": "Health, metrics and this document."},
        {"name": "page", "description": "The status page and its static files."},
    ],
    "security": [{}, {"bearerAuth": []}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "The token in `server.token_file`; required only when "
                "the daemon has one.",
            },
        },
    },
}


def render() -> str:
    """The served document's bytes (api.py serves exactly this)."""
    return json.dumps(DOCUMENT)


if __name__ == "__main__":  # python3 -m mlbench_daemon.openapi > tests/data/openapi.json
    print(render())
