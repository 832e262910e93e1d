"""A job request: its fields, checked one table row at a time, as a frozen ``Request``.

``FIELDS`` is the table (like ``config.SETTINGS``): name, default, check.  A check
takes the value from the body and returns it as the request keeps it, or raises
``BadRequest`` naming the field.  Fields are checked in table order, so the first
bad one is the one reported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from mlbench_daemon.discovery import Selector
from mlbench_daemon.errors import BadRequest
from mlbench_daemon.jobs import flavour

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
RESERVED_ENV_PREFIX = "OMPI_MCA_mlbench"  # OpenMPI's MCA namespace of the daemon's marker
MAX_REQUEST_BYTES = 256 * 1024  # program + env, well under the kernel's argv/env limits


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
    wait: bool = True


def _text(value: Any, field: str) -> int:
    """Check one string of the request -> its UTF-8 size."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", field=field)
    if "\0" in value:
        raise BadRequest(f"{field} must not contain NUL bytes", field=field)
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} must be valid Unicode text (no lone surrogates)", field=field
        ) from None


def _program(prog: Any) -> tuple[str, ...]:
    if not isinstance(prog, list) or not prog:
        raise BadRequest("program must be a non-empty list of strings (an argv)", field="program")
    for a in prog:
        _text(a, "program")
    if not prog[0] or prog[0].startswith("-"):
        raise BadRequest("program[0] must be a program, not empty or an option", field="program")
    if ":" in prog:  # mpirun takes a lone ":" anywhere as its MPMD separator
        raise BadRequest(
            'program must not contain a lone ":" argument (mpirun reserves it)', field="program"
        )
    return tuple(prog)


def _env(env: Any) -> dict[str, str]:
    if not isinstance(env, dict):
        raise BadRequest("env must be an object of name -> string", field="env")
    for name, value in env.items():
        if not ENV_NAME.match(name):
            raise BadRequest(
                f"env name {name[:64]!r} must match [A-Za-z_][A-Za-z0-9_]*", field="env"
            )
        if name.startswith(RESERVED_ENV_PREFIX) or flavour.reserved(name):
            raise BadRequest(f"env name {name[:64]!r} is reserved for the daemon", field="env")
        _text(value, "env")
    return dict(env)


def _np(np: Any) -> int:
    if isinstance(np, float) and np.is_integer():  # JSON has one number type: 4.0 is 4
        np = int(np)
    if isinstance(np, bool) or not isinstance(np, int) or not 1 <= np <= 1_000_000:
        raise BadRequest("np must be an integer >= 1", field="np")
    return np


def _selector(text: Any) -> Selector:
    _text(text, "selector")
    try:
        return Selector.parse(text)
    except ValueError as e:
        raise BadRequest(f"selector: {e}", field="selector") from None


def _nodes(nodes: Any) -> tuple[str, ...]:
    if not isinstance(nodes, list) or not nodes:
        raise BadRequest("nodes must be a non-empty list of node names", field="nodes")
    for n in nodes:
        _text(n, "nodes")
    if len(set(nodes)) != len(nodes):
        raise BadRequest("nodes must not repeat a name", field="nodes")
    return tuple(nodes)


def _master(name: Any) -> str:
    _text(name, "master")
    return cast(str, name)  # _text has checked it


def _timeout_s(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1e9:
        raise BadRequest("timeout_s must be a number > 0", field="timeout_s")
    return float(t)


def _wait(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("wait must be true or false", field="wait")
    return value


# name -> check, in the order fields are checked (and listed in the unknown-field message)
FIELDS: dict[str, Callable[[Any], Any]] = {
    "program": _program,
    "env": _env,
    "np": _np,
    "selector": _selector,
    "nodes": _nodes,
    "master": _master,
    "timeout_s": _timeout_s,
    "wait": _wait,
}


def _size(req: Request) -> int:
    program = sum(len(a.encode()) for a in req.program)
    return program + sum(len(k) + len(v.encode()) for k, v in req.env.items())


def validate(body: Any, default_program: Sequence[str]) -> Request:
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
    values = {}
    for name, check in FIELDS.items():
        if name in body:
            values[name] = check(body[name])
        if name == "env" and _size(Request(**values)) > MAX_REQUEST_BYTES:
            raise BadRequest(
                f"program and env together must stay under {MAX_REQUEST_BYTES} bytes",
                field="env" if "env" in body else "program",
            )
    return Request(**{"program": tuple(default_program), **values})
