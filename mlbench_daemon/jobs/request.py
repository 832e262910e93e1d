"""A job request: its fields, checked one table row at a time, as a frozen ``Request``.

The request is declared once, in shapes.py (``JobRequest``, ``PreflightRequest``),
and the document's schema is generated from that.  Every limit checked here (list
lengths, ranges, patterns, the reserved env names) is read from that declaration
(``msgspec.inspect``), so the check and the document cannot drift; the messages and
their order are this module's (the golden files pin them).

``FIELDS`` is the table (like ``config.SETTINGS``): name -> check, in the declaration's
order.  A check takes the value from the body and returns it as the request keeps it,
or raises ``BadRequest`` naming the field.  Fields are checked in table order, so the
first bad one is the one reported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from msgspec import inspect

from mlbench_daemon import shapes
from mlbench_daemon.discovery import Selector
from mlbench_daemon.errors import BadRequest, echo

MAX_REQUEST_BYTES = 256 * 1024  # program + env, well under the kernel's argv/env limits

_T = TypeVar("_T", bound=inspect.Type)


def _declared(t: inspect.Type, kind: type[_T]) -> tuple[_T, dict[str, Any]]:
    """A declared type's constraints (`kind`) and its extra JSON Schema keywords."""
    extra: dict[str, Any] = {}
    if isinstance(t, inspect.Metadata):
        extra, t = dict(t.extra_json_schema or {}), t.type
    if not isinstance(t, kind):
        raise TypeError(f"{t} is declared, not a {kind.__name__}")
    return t, extra


def _regex(pattern: str | None) -> re.Pattern[str]:
    """A declared pattern (JSON Schema: ECMA-262, `$` only at the very end) as Python's
    `re.search` must read it (its `$` also matches before a final newline)."""
    if pattern is None:
        raise TypeError("a pattern is declared")
    return re.compile(pattern.replace("$", r"\Z"))


def _bounds(*limits: float | None) -> tuple[float, ...]:
    if None in limits:
        raise TypeError("both bounds are declared")
    return tuple(float(x) for x in limits if x is not None)


_REQUEST = _declared(inspect.type_info(shapes.JobRequest), inspect.StructType)[0]
_DECLARED = {f.name: f.type for f in _REQUEST.fields}
TEXT = _regex(_declared(inspect.type_info(shapes.Text), inspect.StrType)[0].pattern)
_PROGRAM, _PROGRAM_EXTRA = _declared(_DECLARED["program"], inspect.ListType)
_PROGRAM_MIN = _PROGRAM.min_length or 0
if _PROGRAM_MIN < 1:
    raise TypeError("program is declared with a program[0]: min_length >= 1")
_PROGRAM_FIRST = _regex(_PROGRAM_EXTRA["prefixItems"][0]["pattern"])
_SEPARATOR = _declared(_PROGRAM.item_type, inspect.StrType)[1]["not"]["const"]
_ENV = _declared(_DECLARED["env"], inspect.DictType)[0]
_ENV_NAME, _ENV_NAME_EXTRA = _declared(_ENV.key_type, inspect.StrType)
ENV_NAME = _regex(_ENV_NAME.pattern)
RESERVED_ENV = _regex(_ENV_NAME_EXTRA["not"]["pattern"])
_NP = _declared(_DECLARED["np"], inspect.IntType)[0]
_NP_MIN, _NP_MAX = _bounds(_NP.ge, _NP.le)
_NODES, _NODES_EXTRA = _declared(_DECLARED["nodes"], inspect.ListType)
_TIMEOUT = _declared(_DECLARED["timeout_s"], inspect.FloatType)[0]
_TIMEOUT_ABOVE, _TIMEOUT_BELOW = _bounds(_TIMEOUT.gt, _TIMEOUT.lt)
_NAME = _declared(_DECLARED["name"], inspect.StrType)[0]
_NAME_TEXT = _regex(_NAME.pattern)
_TAGS, _TAGS_EXTRA = _declared(_DECLARED["tags"], inspect.ListType)
_TAG = _regex(_declared(_TAGS.item_type, inspect.StrType)[0].pattern)
_STALL = _declared(_DECLARED["stall_after_s"], inspect.FloatType)[0]
_STALL_MIN, _STALL_BELOW = _bounds(_STALL.ge, _STALL.lt)


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request, every field filled (``program`` defaults to ``mpi.program``)."""

    program: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    np: int | None = None
    selector: Selector | None = None
    nodes: tuple[str, ...] | None = None
    master: str | None = None
    timeout_s: float | None = None
    stall_after_s: float | None = None  # None: mpi.stall_after_s
    wait: bool = True
    name: str | None = None
    tags: tuple[str, ...] = ()
    rank_output: bool = False


def _text(value: object, field: str) -> str:
    """Check one string of the request -> the string."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", field=field)
    if not TEXT.search(value):
        raise BadRequest(f"{field} must not contain NUL bytes", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} must be valid Unicode text (no lone surrogates)", field=field
        ) from None
    return value


def _program(prog: object) -> tuple[str, ...]:
    if not isinstance(prog, list) or len(prog) < _PROGRAM_MIN:
        raise BadRequest("program must be a non-empty list of strings (an argv)", field="program")
    for a in prog:
        _text(a, "program")
    if prog[0] != _SEPARATOR and not _PROGRAM_FIRST.search(prog[0]):
        raise BadRequest("program[0] must be a program, not empty or an option", field="program")
    if _SEPARATOR in prog:
        raise BadRequest(
            f"program must not contain a lone {_SEPARATOR!r} argument (mpirun reserves it)",
            field="program",
        )
    return tuple(prog)


def _env(env: object) -> dict[str, str]:
    if not isinstance(env, dict):
        raise BadRequest("env must be an object of name -> string", field="env")
    for name, value in env.items():
        if not ENV_NAME.search(name):
            rule = ENV_NAME.pattern.removeprefix("^").removesuffix(r"\Z")
            raise BadRequest(f"env name {name[:64]!r} must match {rule}", field="env")
        if RESERVED_ENV.search(name):
            raise BadRequest(f"env name {name[:64]!r} is reserved for the daemon", field="env")
        _text(value, "env")
    return dict(env)


def _np(np: object) -> int:
    if isinstance(np, float) and np.is_integer():  # JSON has one number type: 4.0 is 4
        np = int(np)
    if isinstance(np, bool) or not isinstance(np, int) or not _NP_MIN <= np <= _NP_MAX:
        raise BadRequest(f"np must be an integer >= {_NP_MIN:g}", field="np")
    return np


def _selector(text: object) -> Selector:
    try:
        return Selector.parse(_text(text, "selector"))
    except ValueError as e:
        raise BadRequest(f"selector: {e}", field="selector") from None


def _nodes(nodes: object) -> tuple[str, ...]:
    if not isinstance(nodes, list) or len(nodes) < (_NODES.min_length or 0):
        raise BadRequest("nodes must be a non-empty list of node names", field="nodes")
    for n in nodes:
        _text(n, "nodes")
    if _NODES_EXTRA.get("uniqueItems") and len(set(nodes)) != len(nodes):
        raise BadRequest("nodes must not repeat a name", field="nodes")
    return tuple(nodes)


def _master(name: object) -> str:
    return _text(name, "master")


def _timeout_s(t: object) -> float:
    if (
        isinstance(t, bool)
        or not isinstance(t, (int, float))
        or not _TIMEOUT_ABOVE < t < _TIMEOUT_BELOW
    ):
        raise BadRequest(f"timeout_s must be a number > {_TIMEOUT_ABOVE:g}", field="timeout_s")
    return float(t)


def _stall_after_s(t: object) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not _STALL_MIN <= t < _STALL_BELOW:
        raise BadRequest(
            f"stall_after_s must be a number >= {_STALL_MIN:g} (0 = never)", field="stall_after_s"
        )
    return float(t)


def _flag(name: str) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false", field=name)
        return value

    return check


def _name(name: object) -> str:
    text = _text(name, "name")
    if not (_NAME.min_length or 0) <= len(text) <= (_NAME.max_length or 0):
        raise BadRequest(
            f"name must be {_NAME.min_length} to {_NAME.max_length} characters", field="name"
        )
    if not _NAME_TEXT.search(text):
        raise BadRequest("name must not contain control characters", field="name")
    return text


def _tags(tags: object) -> tuple[str, ...]:
    if not isinstance(tags, list) or len(tags) > (_TAGS.max_length or 0):
        raise BadRequest(
            f"tags must be a list of at most {_TAGS.max_length} key:value strings", field="tags"
        )
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.search(tag):
            raise BadRequest(
                f"tag {echo(tag)} must be key:value (key: letters, digits, '-_.' up to 63; "
                "value: also ':/@+=', up to 128)",
                field="tags",
            )
    if _TAGS_EXTRA.get("uniqueItems") and len(set(tags)) != len(tags):
        raise BadRequest("tags must not repeat a tag", field="tags")
    return tuple(tags)


# name -> check, in the order fields are checked (and listed in the unknown-field message):
# the declaration's order (checked below)
FIELDS: dict[str, Callable[[object], object]] = {
    "program": _program,
    "env": _env,
    "np": _np,
    "selector": _selector,
    "nodes": _nodes,
    "master": _master,
    "timeout_s": _timeout_s,
    "stall_after_s": _stall_after_s,
    "wait": _flag("wait"),
    "name": _name,
    "tags": _tags,
    "rank_output": _flag("rank_output"),
}
if tuple(FIELDS) != shapes.JobRequest.__struct_fields__:
    raise TypeError(f"request.FIELDS {tuple(FIELDS)} are not shapes.JobRequest's fields")


def _size(req: Request) -> int:
    program = sum(len(a.encode()) for a in req.program)
    return program + sum(len(k) + len(v.encode()) for k, v in req.env.items())


def validate(body: object, default_program: Sequence[str]) -> Request:
    """Check a request body (None = empty) -> Request; BadRequest names the bad field."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", field="body")
    for key in body:
        if key not in FIELDS:
            raise BadRequest(
                f"unknown field {key!r} (known: {', '.join(FIELDS)})", field=str(key) or "body"
            )
    values: dict[str, Any] = {}  # each check's own type (Request's fields)
    for name, check in FIELDS.items():
        if name in body:
            values[name] = check(body[name])
        if name == "env" and _size(Request(**values)) > MAX_REQUEST_BYTES:
            raise BadRequest(
                f"program and env together must stay under {MAX_REQUEST_BYTES} bytes",
                field="env" if "env" in body else "program",
            )
    return Request(**{"program": tuple(default_program), **values})
