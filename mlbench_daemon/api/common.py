"""What every route module shares: ``Deps`` (what the handlers are given) and the
request's parts as the API reads them (query numbers and flags, the JSON body)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bottle

from mlbench_daemon.api.streams import Streams
from mlbench_daemon.errors import BadRequest, Forbidden, PayloadTooLarge, echo
from mlbench_daemon.metricstore import NO_RUNS, RunLookup
from mlbench_daemon.tokens import NOBODY, Caller
from mlbench_daemon.vocabulary import Refusal, Role

if TYPE_CHECKING:  # the API is given these; it imports none of them
    from mlbench_daemon.jobs import Jobs
    from mlbench_daemon.jobs.preflight import Preflight
    from mlbench_daemon.jobs.runs import Runs
    from mlbench_daemon.metricstore import MetricStore
    from mlbench_daemon.nodes import Registry

JSON = "application/json"
CALLER = "mlbench.caller"  # the request's tokens.Caller (the plugin sets it)
AUDIT_NOTES = "mlbench.audit"  # what the request's audit line says besides the request
# far deeper than any field needs; Python's parser recurses and fails near 1,000
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


@dataclass(frozen=True)
class Deps:
    """What the handlers work with: each handler is called as ``handler(deps, **url_args)``."""

    registry: Registry
    jobs: Jobs
    preflight: Preflight | None
    max_body_bytes: int
    streams: Streams
    document: str  # the served OpenAPI document (made from the route table once)
    tokens_enabled: bool = False  # whether requests must carry a token
    runs: Runs | None = None  # MLBench runs (api/runs.py); None: those routes answer 503
    metric_store: MetricStore | None = None  # None: the metrics routes answer 404
    run_lookup: RunLookup = NO_RUNS  # the runs metrics belong to (none: nothing to post)


def caller() -> Caller:
    """Who made this request (``tokens.NOBODY`` when the daemon has no tokens)."""
    found = bottle.request.environ.get(CALLER)
    return found if isinstance(found, Caller) else NOBODY


def note(**fields: Any) -> None:
    """Add *fields* (job, owner, ...) to this request's audit line."""
    bottle.request.environ.setdefault(AUDIT_NOTES, {}).update(fields)


def as_json(value: Any, status: int = 200) -> str:
    bottle.response.status = status
    bottle.response.content_type = JSON
    return json.dumps(value)


def int_param(name: str, default: int, lo: int, hi: int) -> int:
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw):
        raise BadRequest(f"{name}: must be a whole number, got {echo(raw)}", field=name)
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be from {lo} to {hi}, got {value}", field=name)
    return value


def flag(name: str) -> bool:
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


def body(max_bytes: int) -> dict[str, Any] | None:
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
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body: not valid JSON: {e}", field="body") from None
    if not isinstance(parsed, dict):
        raise BadRequest("body: must be a JSON object", field="body")
    return parsed


def own_only(who: Caller, owner: str | None, thing: str, made: str, verb: str) -> None:
    """A submitter acts only on what it made (an admin on anything): Forbidden otherwise,
    naming the owner (in the audit line too).  `thing` is e.g. ``job <id>``, `made` how
    it came (``submitted``), `verb` what the request does (``cancel``)."""
    if who.role.allows(Role.ADMIN) or owner == who.name:
        return
    note(owner=owner)
    kind = thing.split()[0]
    raise Forbidden(
        f"{thing} was {made} by {owner!r}, not {who.name!r}: a submitter {verb}s only its "
        f"own {kind}s (an admin token can {verb} it)",
        error=Refusal.NOT_OWNER,
    )


def location(path: str) -> dict[str, Any]:
    """The document's `Location` header of a 201/202 answer: where the new thing is."""
    return {
        "Location": {"description": f"`{path}`", "required": True, "schema": {"type": "string"}}
    }
