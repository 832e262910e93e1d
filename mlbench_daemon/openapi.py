"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /api/openapi.json``.

The document is generated, not written: ``components`` from the answers' declarations
(``shapes.py``) plus the request body below, and ``paths`` from the route table
(``api.ROUTES``, a list of :class:`Route`), the same table that registers the Bottle
routes, so a route cannot be served without being described or described without being
served.  This module declares what a route is (:class:`Route`, :class:`Alias`,
:class:`Param`, :class:`Answer`, :class:`Auth`), the pieces routes share (the error
answers, the query flag) and :func:`document`, which turns a table into the document.

Every path also works with a trailing slash (or without one).  The seed's endpoints are
described under both spellings (a route's ``aliases``), so that generated tests exercise
both; the others under one.  ``tests/test_openapi.py`` pins the served bytes.
"""

import enum
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlbench_daemon import __version__, shapes
from mlbench_daemon.vocabulary import HOOK_SUBJECTS, Role

_REF = "#/components/schemas/"
Schema = dict[str, Any]  # a piece of the OpenAPI document


def ref(name: str) -> Schema:
    """A reference to the component schema *name*."""
    return {"$ref": _REF + name}


def json_content(schema: Schema) -> Schema:
    """An answer's or body's `content`: JSON of *schema*."""
    return {"application/json": {"schema": schema}}


class Auth(enum.Enum):
    """Who may call a route (the plugin checks it; the document says it)."""

    TOKEN = "token"  # a bearer token whose role allows the route's, when the daemon has tokens
    METRICS = "metrics"  # the token too, unless server.public_metrics
    PUBLIC = "public"  # never the token (documented with `security: []`)


@dataclass(frozen=True)
class Answer:
    """One status's answer: its description, `content` (media type -> schema) and headers."""

    description: str
    content: Schema
    headers: Schema | None = None

    def to_doc(self) -> Schema:
        out: Schema = {"description": self.description}
        if self.headers:
            out["headers"] = self.headers
        if self.content:  # none: an answer with no body (a 204)
            out["content"] = self.content
        return out


def answer(description: str, schema: Schema, headers: Schema | None = None) -> Answer:
    """A JSON answer of *schema*."""
    return Answer(description, json_content(schema), headers)


def error(description: str) -> Answer:
    """An error answer: always the `Error` component."""
    return answer(description, ref("Error"))


@dataclass(frozen=True)
class Param:
    """A query parameter: optional, empty allowed (it then means the default)."""

    name: str
    schema: Schema
    description: str | None = None

    def to_doc(self) -> Schema:
        out: Schema = {"name": self.name, "in": "query", "required": False}
        out["allowEmptyValue"] = True
        if self.description is not None:
            out["description"] = self.description
        out["schema"] = self.schema
        return out


@dataclass(frozen=True)
class Alias:
    """The same route under another documented path (e.g. without the trailing slash),
    with its own operationId and, if given, its own summary."""

    path: str
    operation_id: str
    summary: str | None = None


Handler = Callable[..., Any]  # (deps, **url arguments) -> the answer's body


@dataclass(frozen=True)
class Route:
    """One HTTP route, declared once: it is registered with Bottle (api/) and described
    in the document (:func:`document`) from this entry alone.

    ``path`` is the documented path, with ``{name}`` for a path argument; Bottle serves it
    (and every alias) without its trailing slash, as ``<name>``.  ``answers`` are the
    route's own answers by status; the ones every route shares (401 for ``Auth.TOKEN``
    and ``Auth.METRICS``, 403, 415, 500) are added after them.
    """

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    answers: dict[int, Answer]
    auth: Auth = Auth.TOKEN
    role: Role = Role.VIEWER  # the least role that may call it (with Auth.TOKEN)
    description: str | None = None
    query: tuple[Param, ...] = ()
    body: Schema | None = None  # the optional JSON request body's schema
    aliases: tuple[Alias, ...] = ()
    form: bool = False  # the body may also be a form (urlencoded or multipart): MLBench's POSTs

    def documented(self) -> Iterator[tuple[str, str, str]]:
        """(path, operationId, summary) of each documented spelling, the main one first."""
        yield self.path, self.operation_id, self.summary
        for alias in self.aliases:
            yield alias.path, alias.operation_id, alias.summary or self.summary

    def rules(self) -> list[str]:
        """The Bottle rules serving this route: each documented path without its trailing
        slash (the app strips it from every request), `{name}` as `<name>`."""
        out: list[str] = []
        for path, _, _ in self.documented():
            rule = re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", _rule_arg, path.rstrip("/") or "/")
            if rule not in out:
                out.append(rule)
        return out

    def operation(self, operation_id: str, summary: str) -> Schema:
        op: Schema = {"operationId": operation_id, "summary": summary}
        if self.description is not None:
            op["description"] = self.description
        op["tags"] = [self.tag]
        if self.auth is Auth.PUBLIC:
            op["security"] = []
        else:
            op["x-required-role"] = self.role if self.auth is Auth.TOKEN else Role.VIEWER
        if self.query:
            op["parameters"] = [p.to_doc() for p in self.query]
        if self.body is not None:
            content = json_content(self.body)
            if self.form:
                content["application/x-www-form-urlencoded"] = {"schema": self.body}
                content["multipart/form-data"] = {"schema": self.body}
            op["requestBody"] = {"required": False, "content": content}
        responses = {str(status): a.to_doc() for status, a in self.answers.items()}
        shared = _SHARED if self.auth is Auth.PUBLIC else {"401": _UNAUTHORIZED, **_SHARED}
        for status, shared_answer in shared.items():
            responses.setdefault(status, shared_answer)
        op["responses"] = responses
        return op


# Answers every route can give (the plugin and the browser checks give them).
_UNAUTHORIZED = {
    "description": "The daemon has tokens (`server.token_file`, `server.tokens_file`) and the "
    "request did not carry `Authorization: Bearer <token>` with one of them (a revoked token "
    "is refused within a second of `mlbench-daemon token revoke`).",
    "headers": {
        "WWW-Authenticate": {
            "description": 'Always `Bearer realm="mlbench-daemon"`.',
            "schema": {"type": "string"},
        }
    },
    "content": json_content(ref("Error")),
}
_SHARED: dict[str, Schema] = {
    "403": error(
        "The token's role is below the operation's `x-required-role` (`error` is `role`); or "
        "browser safety: `Host` is not a name of this daemon (`server.allowed_hosts`), or "
        "`Origin` is present and is neither the daemon's own origin nor in "
        "`server.allowed_origins`."
    ).to_doc(),
    "415": error(
        "A non-empty body whose `Content-Type` is not `application/json` (nor, on an "
        "operation whose `requestBody` lists them, a form type)."
    ).to_doc(),
    "500": error(
        "A bug in the daemon; the message points to its log (never a stack trace)."
    ).to_doc(),
}


def _rule_arg(m: re.Match[str]) -> str:
    """A path argument as Bottle's wildcard; one in ROUTED_BY_PATTERN matches its schema's
    pattern only, so that a sibling path is its own resource and not that argument
    (`/api/runs/catalogue/` is not run "catalogue": its 405 names GET alone)."""
    name = m.group(1)
    if name in ROUTED_BY_PATTERN:
        return f"<{name}:re:{PATH_PARAMS[name]['schema']['pattern'].strip('^$')}>"
    return f"<{name}>"


# Path arguments, described once by name for every path that has them.
PATH_PARAMS: dict[str, Schema] = {
    "job_id": {
        "name": "job_id",
        "in": "path",
        "required": True,
        "description": "The job's id (hex digits: creation time in milliseconds, then random "
        "bits).",
        "schema": {"type": "string", "pattern": "^[0-9a-f]{20,}$"},
    },
    "name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    "run_id": {
        "name": "run_id",
        "in": "path",
        "required": True,
        "description": "The run's id (MLBench's integer pk).",
        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    },
    "pk": {
        "name": "pk",
        "in": "path",
        "required": True,
        "description": "A run's id (`metric_type=run`) or a node's name (`metric_type=pod`).",
        "schema": {"type": "string"},
    },
}
ROUTED_BY_PATTERN = ("run_id",)  # job ids keep their own 404 ("no job ...") for any text


# A query flag as the API reads it: 1/true/yes or 0/false/no (any case); empty = off.
FLAG = {
    "type": "string",
    "pattern": "^(?:[01]|[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[Yy][Ee][Ss]|[Nn][Oo])?$",
}

# The answers' and requests' schemas come from their declarations (shapes.py); the sync
# answer (a Job plus its output) is written here.
SCHEMAS: dict[str, Any] = {
    **shapes.components(),
    "JobResult": {
        "description": "A finished job with its whole output (`POST` with `wait` true).",
        "allOf": [
            ref("Job"),
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


INFO: Schema = {
    "title": "mlbench-daemon",
    "version": __version__,
    "summary": "SSH-native launcher for MPI jobs, serving the MLBench dashboard's REST API.",
    "description": (
        'JSON everywhere, including every error (`Error`: `{"error", "message"}`, plus '
        "`field` for bad input), with its 4xx/5xx status: unknown paths answer 404 and "
        "unsupported methods 405 (with `Allow`), both as `Error`.  Every path works with and "
        "without its trailing slash.  When the daemon has a token (`server.token_file`), "
        "every `/api/` call needs `Authorization: Bearer <token>`, or HTTP Basic with the token "
        "as the password (and `/metrics` too, unless `server.public_metrics`); without one, "
        "none does.  A run's capability URL (`/run-cap/<secret>/api/metrics/`, given to its "
        "ranks in `MLBENCH_DASHBOARD_URL`) needs no token and allows only posting that "
        "run's metrics while it runs.  Named tokens "
        "(`server.tokens_file`) have a role: `viewer` reads, `submitter` also launches, "
        "runs preflights and cancels its own jobs, `admin` does everything (the token of "
        "`server.token_file` is the admin `admin`); each operation's `x-required-role` is the "
        "least role that may call it.  Every write and every refused request is a line in the "
        "audit log (`state.audit_file`).  Browser safety: a request whose "
        "`Host` is not a name of the daemon, or whose `Origin` is foreign, gets 403; a "
        "non-empty body that is not `application/json` gets 415, except a form body on the "
        "operations that list form types (MLBench's client posts forms), which a foreign "
        "`Origin` cannot reach either.  No CORS headers are sent."
    ),
}
TAGS: list[Schema] = [
    {"name": "nodes", "description": "Discovered nodes and their SSH reachability."},
    {
        "name": "jobs",
        "description": "MPI jobs: start, list, inspect, follow output, cancel.",
    },
    {"name": "meta", "description": "Health, metrics and this document."},
    {
        "name": "runs",
        "description": "MLBench runs (mlbench-core 3's `ApiClient`): benchmarks on nodes "
        "they hold alone.",
    },
    {"name": "page", "description": "The status page and its static files."},
    {"name": "metrics", "description": "MLBench's metrics of runs and of their nodes."},
]


def paths(routes: list[Route]) -> Schema:
    """The document's `paths`: every documented spelling of every route, in table order;
    a path's arguments (PATH_PARAMS) once on its path item."""
    out: Schema = {}
    for route in routes:
        for path, operation_id, summary in route.documented():
            item = out.get(path)
            if item is None:
                item = out[path] = {}
                names = re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", path)
                if names:
                    item["parameters"] = [PATH_PARAMS[n] for n in names]
            item[route.method.lower()] = route.operation(operation_id, summary)
    return out


HOOK_HEADERS: list[tuple[str, Schema, str]] = [
    ("X-Mlbench-Event", ref("HookEventName"), "The event (also the body's `event`)."),
    ("X-Mlbench-Event-Id", {"type": "string"}, "The idempotency key (the body's `id`)."),
    ("X-Mlbench-Attempt", {"type": "string", "pattern": "^[1-9][0-9]*$"},
     "1 for the first attempt; a resend after a restart counts on."),
    ("X-Mlbench-Timestamp", {"type": "string", "pattern": "^[0-9]+$"},
     "Unix seconds when this attempt was sent."),
    ("X-Mlbench-Signature", {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$"},
     'HMAC-SHA256 with the hook\'s secret over `timestamp + "." + body`, hex.'),
]  # fmt: skip


def webhooks() -> Schema:
    """The document's `webhooks`: the POST the daemon makes to a configured hook
    (webhooks.py), one entry per subject of events."""
    return {
        subject: {
            "post": {
                "operationId": f"webhook_{subject}",
                "summary": f"A {subject}'s event, POSTed to each hook whose `events` name it.",
                "description": "Delivered at least once, in order per hook and "
                f"{subject}: receivers deduplicate by `X-Mlbench-Event-Id`.",
                "parameters": [
                    {"name": n, "in": "header", "required": True, "description": d, "schema": s}
                    for n, s, d in HOOK_HEADERS
                ],
                "requestBody": {"required": True, "content": json_content(ref("WebhookEvent"))},
                "responses": {
                    "2XX": {
                        "description": "Taken.  Any other answer, a redirect, or none within "
                        "`webhooks.timeout_s` is retried with backoff until `max_age_s`."
                    }
                },
            }
        }
        for subject in HOOK_SUBJECTS
    }


def document(routes: list[Route]) -> Schema:
    """The whole OpenAPI document of the routes *routes*."""
    return {
        "openapi": "3.1.0",
        "info": INFO,
        "tags": TAGS,
        "security": [{}, {"bearerAuth": []}, {"basicAuth": []}],
        "paths": paths(routes),
        "webhooks": webhooks(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token in `server.token_file`, or a named token "
                    "(`<id>.<secret>`) of `server.tokens_file`; required only when the daemon "
                    "has tokens.",
                },
                "basicAuth": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The same token as the password, any user name: what "
                    "`requests` sends from `~/.netrc` for a client that sets no header "
                    "(mlbench-core's `ApiClient`).",
                },
            },
        },
    }


def render(routes: list[Route]) -> str:
    """The served document's bytes (the API serves exactly this)."""
    return json.dumps(document(routes))
