"""The JSON answers of the HTTP API, each declared once as a ``msgspec.Struct``.

openapi.py generates the document's component schemas from these classes
(``msgspec.json.schema_components``), so a field added, renamed or retyped here
changes the served ``/api/openapi.json`` (and its pinned snapshot,
tests/data/openapi.json).  It imports nothing of the daemon but vocabulary.py.
Every closed vocabulary is one of vocabulary.py's enums, never a bare ``str``: the
document lists exactly the words the code uses.

The answers themselves are still built as dicts and encoded with ``json.dumps``
(the golden files pin that layout); the tests check every answer the daemon gives
against the document generated from here (tests.helpers.check_answer).
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import msgspec
from msgspec import Meta

from mlbench_daemon.vocabulary import (
    PREFLIGHT_FLAVOURS,
    CheckName,
    CheckStatus,
    FailureKind,
    FlavourName,
    JobReason,
    JobState,
    JobWait,
    NodeReason,
    Phase,
    SSHReason,
    StoreReason,
)

JOB_ID_PATTERN = "^[0-9a-f]{20,}$"
DateTime = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
# a node's reason: NodeReason, or SSHReason after a failed probe (two enums, one field)
NodeReasonText = Annotated[
    str, Meta(extra_json_schema={"enum": [str(r) for r in (*NodeReason, *SSHReason)]})
]
PreflightFlavour = Annotated[
    str, Meta(extra_json_schema={"enum": [str(f) for f in PREFLIGHT_FLAVOURS]})
]


class NodeRow(NamedTuple):
    """The seed's ``[ip, namespace, name, labels]`` row of a job's ``nodes`` (a JSON
    array in the store and the API; ``NodeRow(*row)`` reads one back by name)."""

    ip: str
    namespace: str
    name: str
    labels: str


class Error(msgspec.Struct):
    """Every error, with its 4xx/5xx status."""

    error: Annotated[
        str,
        Meta(
            description="Machine-readable code, e.g. `bad-request`, `unauthorized`, "
            "`not-found`, `conflict`, `queue-full`, `unavailable`, `too-many-streams`."
        ),
    ]
    message: Annotated[str, Meta(description="For a human.")]
    field: Annotated[str, Meta(description="The request field at fault (400, 409).")] | (
        msgspec.UnsetType
    ) = msgspec.UNSET


class Node(msgspec.Struct):
    """One worker node and its status (an item of `GET /api/nodes/`)."""

    name: Annotated[str, Meta(description="First label of the host name, else the IP.")]
    labels: Annotated[
        str,
        Meta(
            description="Python `str()` of the label dict with keys sorted, as in the seed: "
            "`{'app': 'mlbench', 'component': 'worker'}`."
        ),
    ]
    phase: Phase
    ip: str
    label_map: Annotated[dict[str, str], Meta(description="The same labels as a JSON object.")]
    host: Annotated[str, Meta(description="Host name (no trailing dot), or the IP.")]
    port: Annotated[int, Meta(ge=1, le=65535, description="SSH port.")]
    namespace: str
    reason: NodeReasonText
    message: str
    last_probe: DateTime | None
    latency_ms: Annotated[float, Meta(ge=0)] | None
    hostname: Annotated[
        str | None,
        Meta(
            description="The node's `uname -n`, asked once per SSH connection (failure "
            "attribution maps the host names a launcher prints through it)."
        ),
    ]
    discovery_note: Annotated[
        str,
        Meta(
            description="Empty, or why discovery kept this node partly: its address lookup "
            "failed (REFUSED, SERVFAIL) and it keeps its last address, or its TXT labels were "
            "over the caps and some were dropped (named)."
        ),
    ]


class Check(msgspec.Struct):
    """One preflight check on one node."""

    node: Annotated[
        str | None, Meta(description="The node checked; null for `slots` (the whole host list).")
    ]
    check: CheckName
    status: CheckStatus
    ok: bool | None
    message: str
    hint: str | None


class Failure(msgspec.Struct):
    """The cause of a job that did not end `succeeded` (README, troubleshooting).  Parts the
    launcher did not say are null."""

    kind: FailureKind
    node: Annotated[str | None, Meta(description="The daemon's node name.")]
    host: Annotated[
        str | None,
        Meta(
            description="The host as the launcher printed it (an IP of the host list, "
            "or a host name)."
        ),
    ]
    rank: Annotated[int, Meta(ge=0)] | None
    exit_code: int | None
    signal: Annotated[int, Meta(ge=1)] | None
    message: str | None
    hint: str | None
    checks: (
        Annotated[
            list[Check],
            Meta(
                description="Only when the daemon ran the preflight to find the cause "
                "(`daemon-launch`): the checks that failed."
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class StoreFault(msgspec.Struct):
    """A write of this job's log or record that failed (the state dir is full or read-only);
    the daemon keeps what it could not write in memory and tries again."""

    reason: StoreReason
    message: Annotated[str, Meta(description="One line: what could not be written, and why.")]
    since: DateTime


class Waiting(msgspec.Struct):
    """What a job that is not final waits for."""

    reason: JobWait
    next_check: Annotated[
        DateTime,
        Meta(
            description="When the daemon checks this job's progress again, at the latest "
            "(a queued job: when a running job is checked next)."
        ),
    ]


class Job(msgspec.Struct):
    """One MPI job: the seed's keys first."""

    nodes: list[NodeRow]
    command: Annotated[str, Meta(description="Python `str()` of the exact argv run on the master.")]
    master_name: Annotated[str | None, Meta(description="Null until the job is launched.")]
    id: Annotated[str, Meta(pattern=JOB_ID_PATTERN)]
    state: JobState
    exit_code: int | None
    created: DateTime
    started: DateTime | None
    finished: DateTime | None
    error: str | None
    reason: Annotated[
        JobReason | None,
        Meta(description="Machine-readable cause of a failed, cancelled or lost job."),
    ]
    failure: Annotated[
        Failure | None,
        Meta(
            description="Why and where a job that did not succeed failed; null while it "
            "runs and when it succeeded."
        ),
    ]
    np: Annotated[int, Meta(ge=1)] | None
    timeout_s: Annotated[float, Meta(gt=0)] | None
    env: Annotated[
        dict[str, Literal["***"]],
        Meta(description="The names of the exported variables; values are never shown."),
    ]
    flavour: Annotated[
        FlavourName | None,
        Meta(
            description="The launcher the job ran with (`mpi.flavour`, detected on its "
            "master when `auto`); null until the job is launched."
        ),
    ]
    log_bytes: Annotated[
        int,
        Meta(ge=0, description='Size of the job\'s log so far (for "showing the last X of Y").'),
    ]
    store_error: Annotated[
        StoreFault | None,
        Meta(
            description="Null, or why the daemon cannot write this job's log or record now "
            "(the answer then shows the job as the daemon knows it, not as stored)."
        ),
    ]
    waiting: Annotated[
        Waiting | None,
        Meta(description="Null for a final job; otherwise what it waits for and until when."),
    ]


class PreflightResult(msgspec.Struct):
    """What `POST /api/preflight` found."""

    ok: Annotated[bool, Meta(description="No check failed.")]
    master_name: str
    command: Annotated[
        str, Meta(description="Python `str()` of the argv a job with these fields would run.")
    ]
    nodes: list[NodeRow]
    flavour: PreflightFlavour
    checks: list[Check]


class Health(msgspec.Struct):
    """Counts only: /healthz needs no token, so it says nothing more."""

    status: Annotated[
        Literal["ok", "degraded"],
        Meta(description="`degraded` while the state dir cannot be written (`reason`)."),
    ]
    nodes: Annotated[int, Meta(ge=0)]
    running: Annotated[int, Meta(ge=0)]
    discovery_stale: bool
    discovery_age_s: Annotated[
        Annotated[float, Meta(ge=0)] | None,
        Meta(
            description="Seconds since the node list was last discovered (null before the "
            "first discovery)."
        ),
    ]
    reason: Annotated[
        StoreReason | None,
        Meta(description="Only while `degraded`: why the state dir cannot be written."),
    ] = None


ENUMS = (
    Phase,
    JobState,
    JobReason,
    FailureKind,
    CheckName,
    CheckStatus,
    FlavourName,
    StoreReason,
)
ENUM_TEXT: dict[type, str] = {
    Phase: "`Pending`: first probe not finished; `Running`: a job can be launched "
    "there now: the node accepts new SSH connections (checked every probe round), a fresh "
    "login with the configured key and the pinned host key ran `true` within "
    "`ssh.verify_interval_s`, and the persistent session runs a command; `Unknown`: could "
    "not reach it (also: its listener is gone or hung while an old session lives); "
    "`Failed`: reached it but it refused us or could not be trusted (also when seen on a "
    "fresh login while an old session still works).",
}
ANSWERS = (Error, Node, Job, Failure, Check, PreflightResult, Health)


def components() -> dict[str, dict[str, object]]:
    """The JSON Schema (2020-12) of every declared answer and what they refer to, by name."""
    _, schemas = msgspec.json.schema_components(ANSWERS, ref_template="#/components/schemas/{name}")
    for enum in ENUMS:  # msgspec sorts an enum's values; the document keeps the code's order
        schemas[enum.__name__] = {
            "type": "string",
            "enum": [m.value for m in enum],
            **({"description": ENUM_TEXT[enum]} if enum in ENUM_TEXT else {}),
        }
    return schemas
