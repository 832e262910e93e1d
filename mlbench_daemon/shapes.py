"""The JSON answers and request bodies of the HTTP API, each declared once as a
``msgspec.Struct``.

openapi.py generates the document's component schemas from these classes
(``msgspec.json.schema_components``), so a field added, renamed or retyped here
changes the served ``/api/openapi.json`` (and its pinned snapshot,
tests/data/openapi.json).  It imports nothing of the daemon but vocabulary.py.
Every closed vocabulary is one of vocabulary.py's enums, never a bare ``str``: the
document lists exactly the words the code uses.

The answers themselves are still built as dicts and encoded with ``json.dumps``
(the golden files pin that layout); the tests check every answer the daemon gives
against the document generated from here (tests.helpers.check_answer).

The requests (``JobRequest``, ``PreflightRequest``) are checked by jobs/request.py,
which reads every limit it enforces (lengths, ranges, patterns, the reserved env
names) from these declarations, so the document and the check cannot drift; its
messages and the order it checks fields in are its own (the golden files pin them).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import msgspec
from msgspec import Meta

from mlbench_daemon.vocabulary import (
    HOOK_EVENTS,
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
    ProcessState,
    Role,
    RunState,
    SSHReason,
    StackSource,
    StoreReason,
)

JOB_ID_PATTERN = "^[0-9a-f]{20,}$"
REF_TEMPLATE = "#/components/schemas/{name}"
DateTime = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]


class Words:
    """A closed vocabulary made of several enums' words: a named component of its own
    (``{"type": "string", "enum": words}``), so a client generator gets a type.  A field
    typed with a subclass refers to it by ``$ref``; answers are dicts, never these."""

    words: ClassVar[tuple[str, ...]]
    description: ClassVar[str]


class NodeReasonCode(Words):
    description = "A node's `reason`: a `NodeReason`, or an `SSHReason` after a failed probe."
    words = tuple(str(r) for r in (*NodeReason, *SSHReason))


class PreflightFlavour(Words):
    description = "The launcher preflight found on the master (`unknown`: none it knows)."
    words = tuple(str(f) for f in PREFLIGHT_FLAVOURS)


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
    reason: NodeReasonCode
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
    suspects: (
        Annotated[
            list[Suspect],
            Meta(
                description="Only for a job that was stalled (`stalls`): the suspects of the "
                "last roll-call taken in a stall, the ranks that were elsewhere than the others."
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
    detail: (
        Annotated[
            str,
            Meta(description="With `held`: which run holds which of the job's nodes."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


JobName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern="^[^\\u0000-\\u001f\\u007f]*$",
        description="A name for people (not unique; no control characters).",
    ),
]
TAG_PATTERN = "^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}:[-A-Za-z0-9_.:/@+=]{0,128}$"
Tags = Annotated[
    list[Annotated[str, Meta(pattern=TAG_PATTERN)]],
    Meta(
        max_length=16,
        description="`key:value` strings (key: letters, digits, `-_.`; value: also `:/@+=`), "
        "at most 16, each once; `GET /api/mpi_jobs/?tag=k:v` finds the jobs with a tag.",
        extra_json_schema={"uniqueItems": True},
    ),
]


class Stall(msgspec.Struct):
    """One stall of a running job: its output did not grow for `stall_after_s`."""

    since: Annotated[DateTime, Meta(description="When the job's output last grew.")]
    detected: Annotated[
        DateTime,
        Meta(
            description="When the quiet was found to be a stall: within `stall_after_s` and "
            "one check interval (a quarter of it, at most 5 s) of `since`."
        ),
    ]
    ended: Annotated[
        DateTime | None,
        Meta(description="When the output grew again or the job ended; null while it lasts."),
    ]
    quiet_s: Annotated[
        float, Meta(ge=0, description="How long the output has been quiet (until `ended`).")
    ]
    roll_call: Annotated[
        RollCall | None,
        Meta(
            description="The roll-call taken once in this stall; null while it is taken, when "
            "it could not be (`roll_call_error`), and in an older stall (only the newest "
            "roll-call is kept; `suspects` stay)."
        ),
    ]
    roll_call_error: Annotated[
        str | None, Meta(description="Why no roll-call was taken in this stall.")
    ]
    suspects: Annotated[list[Suspect], Meta(description="The roll-call's suspects.")]


class JobFields(msgspec.Struct):
    """The fields a job has in every answer (``Job``, ``JobListItem``): the seed's keys first."""

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
    rank_output: Annotated[
        bool,
        Meta(
            description="Submitted with `rank_output`: the launcher tags each line with its "
            "rank (the option is in `command`) and `GET .../logs?rank=N` serves one rank's "
            "output."
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
    # who did what (issue 24)
    submitted_by: Annotated[
        str | None,
        Meta(
            description="The name of the token that submitted the job (at `created`); null "
            "on a daemon without tokens."
        ),
    ]
    cancelled_by: Annotated[
        str | None,
        Meta(description="The name of the token whose DELETE cancelled the job, or null."),
    ]
    cancelled_at: Annotated[
        DateTime | None, Meta(description="When that DELETE started the cancel, or null.")
    ]
    name: JobName | None
    tags: Tags


STALLED = (
    "Null, or the stall under way: the job runs, but its output has not grown for "
    "`stall_after_s` (a signal, not a verdict: the job stays `running`)."
)
STALLS = "The job's other stalls (ended), oldest first; at most 20."


class Job(JobFields):
    """One MPI job: the seed's keys first."""

    stalled: Annotated[Stall | None, Meta(description=STALLED)]
    stalls: Annotated[list[Stall], Meta(description=STALLS)]


class RollCallCounts(msgspec.Struct):
    """A roll-call as a job list shows it: when, and how many; `GET /api/mpi_jobs/<id>`
    (or `/ranks`) has its ranks and stacks."""

    taken: DateTime
    took_s: Annotated[float, Meta(ge=0)]
    ranks: Annotated[int, Meta(ge=0, description="Ranks reported.")]
    groups: Annotated[
        list[Annotated[int, Meta(ge=1)]],
        Meta(description="The size of each group of ranks with one stack; largest first."),
    ]
    nodes_failed: Annotated[list[str], Meta(description="Nodes whose ranks could not be read.")]


class StallSummary(msgspec.Struct):
    """A stall as a job list shows it: ``Stall`` with its roll-call's counts only."""

    since: DateTime
    detected: DateTime
    ended: DateTime | None
    quiet_s: Annotated[float, Meta(ge=0)]
    roll_call: RollCallCounts | None
    roll_call_error: str | None
    suspects: Annotated[list[Suspect], Meta(description="The roll-call's suspects.")]


class JobListItem(JobFields):
    """One job of `GET /api/mpi_jobs/`: ``Job``, with each stall's roll-call summed up
    (a list of stalled jobs stays small)."""

    stalled: Annotated[StallSummary | None, Meta(description=STALLED)]
    stalls: Annotated[list[StallSummary], Meta(description=STALLS)]


class Whoami(msgspec.Struct):
    """Who the request's token is, and what it may do."""

    name: Annotated[str | None, Meta(description="The token's name; null without tokens.")]
    role: Role
    auth: Annotated[bool, Meta(description="Whether the daemon asks for tokens at all.")]
    can_submit: Annotated[bool, Meta(description="May launch jobs and run preflights.")]
    can_cancel: Annotated[
        Literal["none", "own", "all"],
        Meta(description="Which jobs it may cancel: none, its own, or anyone's."),
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


# --- requests ---------------------------------------------------------------------------

# A request string: no NUL byte (mpirun and the remote shell cannot carry one).
NO_NUL = "^[^\\u0000]*$"
Text = Annotated[str, Meta(pattern=NO_NUL)]

# Label syntax (Kubernetes): discovery.Selector's parser reads it, and the request's
# `selector` pattern is built from it (tests/test_openapi.py checks they agree).
LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_PREFIX = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = rf"(?:{LABEL_PREFIX}/)?{LABEL_NAME}"
# comma-separated terms `k=v`, `k==v`, `k!=v`, `k`, `!k`
_TERM = f"\\s*(?:{LABEL_KEY}\\s*(?:!=|==|=)\\s*(?:{LABEL_NAME})?|!\\s*{LABEL_KEY}|{LABEL_KEY})\\s*"
SELECTOR_PATTERN = f"^(?:\\s*|{_TERM}(?:,{_TERM})*)$"

# The env names a request may not set: the OpenMPI MCA prefix of the daemon's marker,
# and any name holding JOB_MARKER in any case (every flavour's marker variables end
# with it: jobs/flavour.py; the cancel sweep looks for it).
JOB_MARKER = "mlbench_job_id"
RESERVED_ENV_PREFIX = "OMPI_MCA_mlbench"
_ANY_CASE = "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in JOB_MARKER)
RESERVED_ENV_PATTERN = f"^{RESERVED_ENV_PREFIX}|{_ANY_CASE}"
EnvName = Annotated[
    str,
    Meta(
        pattern="^[A-Za-z_][A-Za-z0-9_]*$",
        extra_json_schema={"not": {"pattern": RESERVED_ENV_PATTERN}},
    ),
]

MPMD_SEPARATOR = ":"  # mpirun takes a lone ":" anywhere as its MPMD separator
# program[0]: a program, not empty and not an option (a lone ":" is refused as any item)
PROGRAM_FIRST = "^[^-:\\u0000][^\\u0000]*$|^:[^\\u0000]+$"
Program = Annotated[
    list[Annotated[Text, Meta(extra_json_schema={"not": {"const": MPMD_SEPARATOR}})]],
    Meta(
        min_length=1,
        description="The argv run by mpirun on every rank (replaces `mpi.program`).  The first "
        "item is a program: not empty, not an option.  A lone `:` is reserved by mpirun.",
        extra_json_schema={"prefixItems": [{"type": "string", "pattern": PROGRAM_FIRST}]},
    ),
]
Np = Annotated[
    int,
    Meta(
        ge=1,
        le=1_000_000,
        description="Number of ranks (mpirun `-np`); default: one per host slot.",
    ),
]
Selector = Annotated[
    str,
    Meta(
        pattern=SELECTOR_PATTERN,
        description="Label selector applied on top of `discovery.selector`: `k=v,k!=v,k,!k`.",
    ),
]
Nodes = Annotated[
    list[Text],
    Meta(
        min_length=1,
        description="Run on exactly these nodes (names); default: every selected `Running` node.",
        extra_json_schema={"uniqueItems": True},
    ),
]
Master = Annotated[
    Text,
    Meta(
        description="The node mpirun runs on; one of `nodes` when both are given.  Default: "
        "the first `Running` node in natural name order.",
    ),
]


class JobRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of `POST /api/mpi_jobs/`.  Every field is optional."""

    program: Program | msgspec.UnsetType = msgspec.UNSET
    env: (
        Annotated[
            dict[EnvName, Text],
            Meta(description="Exported to every rank; values never appear in any argv."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    np: Np | msgspec.UnsetType = msgspec.UNSET
    selector: Selector | msgspec.UnsetType = msgspec.UNSET
    nodes: Nodes | msgspec.UnsetType = msgspec.UNSET
    master: Master | msgspec.UnsetType = msgspec.UNSET
    timeout_s: (
        Annotated[
            float,
            Meta(
                gt=0,
                lt=1e9,
                description="Cancel the job after this long (default `mpi.default_timeout_s`).",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    stall_after_s: (
        Annotated[
            float,
            Meta(
                ge=0,
                lt=1e9,
                description="Mark the running job `stalled` (and take one roll-call) once its "
                "output has not grown for this long; 0 = never (default `mpi.stall_after_s`).",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    wait: Annotated[
        bool, Meta(description="Answer when the job is over (200) or at once (202).")
    ] = True
    name: JobName | msgspec.UnsetType = msgspec.UNSET
    tags: Tags | msgspec.UnsetType = msgspec.UNSET
    rank_output: Annotated[
        bool,
        Meta(
            description="Keep each rank's output apart as well: the launcher tags every line "
            "with its rank (OpenMPI 4 `--tag-output`, OpenMPI 5 `--output tag`, Hydra "
            "`-prepend-pattern`), the job's log keeps every line as tagged, and "
            "`GET /api/mpi_jobs/<id>/logs?rank=N` serves rank N's lines untagged."
        ),
    ] = False


class PreflightRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of `POST /api/preflight/`: a job request's fields that choose where and
    what it would run.  Every field is optional."""

    program: Program | msgspec.UnsetType = msgspec.UNSET
    np: Np | msgspec.UnsetType = msgspec.UNSET
    selector: Selector | msgspec.UnsetType = msgspec.UNSET
    nodes: Nodes | msgspec.UnsetType = msgspec.UNSET
    master: Master | msgspec.UnsetType = msgspec.UNSET


class RankReport(msgspec.Struct):
    """One rank in a roll-call.  A rank whose process was not found (its node could not
    be reached, or it was not running) is listed too, with nulls and `stack_error`."""

    rank: Annotated[int, Meta(ge=0)]
    node: Annotated[str | None, Meta(description="The daemon's node name; null if not found.")]
    pid: Annotated[int, Meta(ge=1)] | None
    state: Annotated[
        ProcessState | None, Meta(description="From /proc/<pid>/stat, before any tool ran.")
    ]
    cpu_s: Annotated[
        Annotated[float, Meta(ge=0)] | None,
        Meta(description="User + system CPU time the process has used."),
    ]
    cpu_percent: Annotated[
        Annotated[float, Meta(ge=0)] | None,
        Meta(description="CPU use over the roll-call's sample (`sample_s`); 100 = one core."),
    ]
    rss_bytes: Annotated[int, Meta(ge=0)] | None
    wchan: Annotated[
        str | None,
        Meta(description="The kernel function it sleeps in (`/proc/<pid>/wchan`); null "
             "while it runs on a CPU."),
    ]  # fmt: skip
    stack_source: StackSource
    stack_error: Annotated[
        str | None,
        Meta(description="Why no better stack was read (a tool missing, ptrace denied, "
             "the tool's bound ran out, the process not found); null when none is missing."),
    ]  # fmt: skip
    stack: Annotated[
        list[str],
        Meta(description="Frames, innermost first (`wchan`: the one kernel function)."),
    ]


class RankGroup(msgspec.Struct):
    """Ranks whose stacks are the same once normalised."""

    ranks: list[Annotated[int, Meta(ge=0)]]
    key: Annotated[
        list[str],
        Meta(description="The normalised stack they share: function names only (no "
             "addresses, arguments, lines), and frames inside the MPI library cut at the "
             "MPI call the program made."),
    ]  # fmt: skip


class Suspect(msgspec.Struct):
    """A rank whose stack differs from the majority's."""

    rank: Annotated[int, Meta(ge=0)]
    node: str | None
    top_frame: Annotated[str | None, Meta(description="Its innermost frame.")]


class NodeProblem(msgspec.Struct):
    """A node of the job whose ranks could not be read."""

    node: str
    error: str


class RollCall(msgspec.Struct):
    """Every rank of a running job with its process's state, CPU, memory and stack."""

    job_id: Annotated[str, Meta(pattern=JOB_ID_PATTERN)]
    taken: Annotated[DateTime, Meta(description="When the roll-call began.")]
    took_s: Annotated[float, Meta(ge=0)]
    sample_s: Annotated[float, Meta(ge=0, description="The CPU sample's length.")]
    ranks: Annotated[list[RankReport], Meta(description="By rank.")]
    groups: Annotated[
        list[RankGroup],
        Meta(description="Ranks with a stack, by the same normalised stack; largest first."),
    ]
    suspects: Annotated[
        list[Suspect],
        Meta(description="The ranks outside the one largest group; none when all agree "
             "or no group is larger than every other."),
    ]  # fmt: skip
    nodes_failed: list[NodeProblem]


# --- MLBench runs (mlbench-dashboard's ModelRun, as mlbench-core 3's ApiClient uses it) ---

RUN_DATE_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z$"
RunDate = Annotated[
    str, Meta(pattern=RUN_DATE_PATTERN, description="`%Y-%m-%dT%H:%M:%S.%fZ` (UTC).")
]
FORM_FLAG = "^(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[01])?$"
FormFlag = Annotated[str, Meta(pattern=FORM_FLAG, description="`true`/`false` (any case), 1/0.")]


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The form `POST /api/runs/` takes (every value a string, as mlbench-core's
    `ApiClient.create_run` sends it); JSON with the same keys is taken too."""

    name: JobName
    num_workers: Annotated[
        str, Meta(pattern="^[1-9][0-9]{0,5}$", description="How many nodes the run holds.")
    ]
    image_name: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=256,
            description="An entry of `mpi.catalogue`, by MLBench's image string "
            "(`mlbench/<name>:<tag>`) or by its short name; or `custom_image`, which runs "
            "`custom_image_command`.",
        ),
    ]
    num_cpus: (
        Annotated[str, Meta(max_length=32, description="Kept for MLBench; not enforced.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    max_bandwidth: (
        Annotated[str, Meta(max_length=32, description="Kept for MLBench; not enforced.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    backend: (
        Annotated[
            str,
            Meta(
                max_length=64,
                pattern="^[A-Za-z0-9_.-]*$",
                description="`mpi` (or missing): one mpirun over the run's nodes, `{rank}` 0.  "
                "`custom_backend`: `custom_backend` names it.  Any other: with "
                "`run_all_nodes`, one process per node with its own `{rank}` (one MPMD "
                "launch); without, the first node only.",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    custom_backend: (
        Annotated[str, Meta(max_length=64, pattern="^[A-Za-z0-9_.-]*$")] | msgspec.UnsetType
    ) = msgspec.UNSET
    custom_image_name: (
        Annotated[str, Meta(max_length=256, description="Kept for MLBench; not used.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    custom_image_command: (
        Annotated[
            str,
            Meta(
                max_length=65536,
                pattern=NO_NUL,
                description="With `image_name` `custom_image`: the command template, split "
                "like a shell would (no shell runs it); each word may name `{run_id}`, "
                "`{rank}`, `{hosts}` (the run's node addresses, comma-separated) and "
                "`{backend}`.",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    run_all_nodes: FormFlag | msgspec.UnsetType = msgspec.UNSET
    gpu_enabled: (
        Annotated[FormFlag, Meta(description="Appends `--gpu` to the command.")] | msgspec.UnsetType
    ) = msgspec.UNSET
    light_target: (
        Annotated[FormFlag, Meta(description="Appends `--light` to the command.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class RunWaiting(msgspec.Struct):
    """Why an `initialized` run has not started."""

    position: Annotated[int, Meta(ge=1, description="1: the next run to start.")]
    reason: Annotated[str, Meta(description="One line: what the run waits for.")]


class RunMetadata(msgspec.Struct):
    """MLBench's `job_metadata`: the run's job as MLBench's dashboard showed it."""

    stdout: Annotated[
        list[str], Meta(description="The last lines of the job's output (at most 200).")
    ]
    stderr: Annotated[list[str], Meta(description="The job's error, if any, as lines.")]
    command: Annotated[
        str | None, Meta(description="The launcher's argv, joined; null until launched.")
    ]
    master_name: Annotated[str | None, Meta(description="The node mpirun runs on.")]
    pods: Annotated[
        list[NodeRow], Meta(description="The run's nodes: `[ip, namespace, name, labels]`.")
    ]
    waiting: RunWaiting | None
    notes: Annotated[list[str], Meta(description="What the daemon tells about the launch.")]


class Run(msgspec.Struct):
    """One MLBench run (mlbench-dashboard's `ModelRunSerializer` keys, then the daemon's)."""

    id: Annotated[int, Meta(ge=1)]
    name: JobName
    created_at: RunDate
    finished_at: RunDate | None
    state: RunState
    job_id: Annotated[str, Meta(pattern=JOB_ID_PATTERN)] | None  # null until started
    job_metadata: RunMetadata
    num_workers: Annotated[int, Meta(ge=1)]
    submitted_by: Annotated[
        str | None, Meta(description="The token that created the run; null without tokens.")
    ]


class CatalogueEntry(msgspec.Struct):
    """One benchmark of the daemon's catalogue (`mpi.catalogue`): what a run's
    `image_name` may name, as the page's run form offers it."""

    name: Annotated[str, Meta(description="The entry's key: `image_name` takes it as it is.")]
    command: Annotated[
        str,
        Meta(description="Its command template (`{run_id}`, `{rank}`, `{hosts}`, `{backend}`)."),
    ]


# --- metrics (MLBench's runs and metrics; metricstore.py) ------------------------------

METRIC_DATE_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z$"
MetricDate = Annotated[
    str,
    Meta(pattern=METRIC_DATE_PATTERN,
         description="UTC, microseconds (MLBench's `%Y-%m-%dT%H:%M:%S.%fZ`)."),
]  # fmt: skip
METRIC_NAME_MAX = 200
METRIC_VALUE_MAX = 10_000
METRIC_METADATA_MAX = 10_000


class MetricPoint(msgspec.Struct):
    """One point of a metric series, as MLBench serves it."""

    date: MetricDate
    value: Annotated[
        str,
        Meta(description="As posted (a number as text, or text such as an official "
             "result); the mean of a group's numbers with `summarize`."),
    ]  # fmt: skip
    cumulative: bool


class MetricPosted(msgspec.Struct):
    """The point a `POST /api/metrics/` stored (MLBench's answer)."""

    name: str
    value: str
    date: MetricDate
    metadata: str
    cumulative: bool


class AllMetrics(msgspec.Struct):
    """Every node's and every run's metric series (MLBench's `GET /api/metrics/`)."""

    pod_metrics: Annotated[
        dict[str, dict[str, list[MetricPoint]]],
        Meta(description="Node name -> metric name -> points, oldest first."),
    ]
    run_metrics: Annotated[
        dict[str, dict[str, list[MetricPoint]]],
        Meta(description="Run name -> metric name -> points, oldest first."),
    ]


class MetricRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A metric point to store (`POST /api/metrics/`), as JSON or as a form (every value
    then a string, as mlbench-core's `post_metric` sends it).  Exactly one of `run_id`
    (a run's own metric) and `pod_name` (a node's, for the run holding that node)."""

    name: Annotated[str, Meta(min_length=1, max_length=METRIC_NAME_MAX, pattern=NO_NUL)]
    value: Annotated[
        str | float,
        Meta(description="A number, or text (at most 10,000 characters)."),
    ]
    run_id: Annotated[
        int | str | None,
        Meta(description="The run's id (a whole number; as text in a form)."),
    ] = None
    pod_name: Annotated[str | None, Meta(description="A node of a run.")] = None
    date: Annotated[
        str | None,
        Meta(description="ISO 8601 (`Z` or an offset) or Python's `str(datetime)` (a space, "
             "no zone: UTC); none = now."),
    ] = None  # fmt: skip
    metadata: Annotated[
        str | dict[str, Any] | None,
        Meta(description="Free text or an object (stored as its JSON), at most 10,000 "
             "characters."),
    ] = None  # fmt: skip
    cumulative: Annotated[
        bool | str | None,
        Meta(description="Whether the value adds up over time; `True`/`False` in a form."),
    ] = None


# --- webhooks (webhooks.py delivers, jobs/events.py makes the bodies) -------------------


class HookEventName(Words):
    description = (
        "A webhook event, `<subject>.<event>`: a job's `started`, `succeeded`, `failed`, "
        "`cancelled`, `lost` or `stalled`; a run's `started`, `finished`, `failed` or "
        "`cancelled` (a run deleted before it ended, or whose job was cancelled)."
    )
    words = HOOK_EVENTS


class HookRun(msgspec.Struct):
    """The run a `run.*` event is about, as it was after the change."""

    id: Annotated[int, Meta(ge=1)]
    name: JobName
    state: Annotated[
        RunState,
        Meta(description="A run deleted before it ended is `failed` (MLBench's word)."),
    ]
    num_workers: Annotated[int, Meta(ge=1)]
    job_id: Annotated[str, Meta(pattern=JOB_ID_PATTERN)] | None
    nodes: Annotated[list[str], Meta(description="The names of the nodes it holds or held.")]
    notes: Annotated[list[str], Meta(description="What the daemon told about its launch.")]
    created_at: RunDate
    finished_at: Annotated[
        RunDate | None, Meta(description="When it ended (a deleted run: the delete).")
    ]
    submitted_by: str | None


class WebhookEvent(msgspec.Struct):
    """The JSON body POSTed to a hook.  The headers carry the event (`X-Mlbench-Event`), its
    id (`X-Mlbench-Event-Id`), the attempt (`X-Mlbench-Attempt`, 1 first), the time sent
    (`X-Mlbench-Timestamp`, Unix seconds) and `X-Mlbench-Signature: sha256=<hex
    HMAC-SHA256(secret, timestamp + "." + body)>`.  Every attempt sends the same bytes."""

    id: Annotated[
        str,
        Meta(description="The idempotency key: the same for every hook, attempt and restart "
             "(`<job>.job.<event>[.<stall ms>]`, `run-<id>.run.<event>`)."),
    ]  # fmt: skip
    event: HookEventName
    time: Annotated[DateTime, Meta(description="When it happened.")]
    job: Annotated[
        Job | None,
        Meta(description="The job's answer at the change; for a `run.*` event the run's "
             "job, null if it has none (it failed before its job was submitted)."),
    ]  # fmt: skip
    run: Annotated[HookRun | None, Meta(description="The run of a `run.*` event; else null.")]
    failure: Annotated[Failure | None, Meta(description="The job's `failure` block.")]
    output: Annotated[
        list[str],
        Meta(description="The last 50 lines of the job's output (each cut at 1,000 "
             "characters); empty without a job."),
    ]  # fmt: skip


ENUMS = (
    Phase,
    JobState,
    JobReason,
    FailureKind,
    CheckName,
    CheckStatus,
    FlavourName,
    StoreReason,
    ProcessState,
    StackSource,
    Role,
    RunState,
)
ENUM_TEXT: dict[type, str] = {
    Phase: "`Pending`: first probe not finished; `Running`: a job can be launched "
    "there now: the node accepts new SSH connections (its sshd's listening socket checked "
    "every probe round, a connection to it every `ssh.listener_interval_s`), a fresh "
    "login with the configured key and the pinned host key ran `true` within "
    "`ssh.verify_interval_s`, and the persistent session answers every probe round and "
    "starts a command every 60 s; `Unknown`: could "
    "not reach it (also: its listener is gone or hung while an old session lives); "
    "`Failed`: reached it but it refused us or could not be trusted (also when seen on a "
    "fresh login while an old session still works).",
}
ANSWERS: tuple[type[msgspec.Struct], ...] = (
    Error, Node, Job, Failure, Check, PreflightResult, Health, RollCall, Whoami, Run,
    MetricPoint, MetricPosted, AllMetrics, JobListItem,
    CatalogueEntry,
)  # fmt: skip
REQUESTS: tuple[type[msgspec.Struct], ...] = (
    JobRequest, PreflightRequest, RunRequest, MetricRequest,
)  # fmt: skip
HOOK_BODIES: tuple[type[msgspec.Struct], ...] = (WebhookEvent,)  # the document's `webhooks`


def _words_ref(t: type) -> dict[str, object]:
    """msgspec's schema hook: a ``Words`` field refers to its named component."""
    if isinstance(t, type) and issubclass(t, Words):
        return {"$ref": REF_TEMPLATE.format(name=t.__name__)}
    raise NotImplementedError(t)


def components() -> dict[str, dict[str, object]]:
    """The JSON Schema (2020-12) of every declared answer and request and what they refer
    to, by name."""
    _, schemas = msgspec.json.schema_components(
        ANSWERS + REQUESTS + HOOK_BODIES, schema_hook=_words_ref, ref_template=REF_TEMPLATE
    )
    for words in (NodeReasonCode, PreflightFlavour, HookEventName):
        schemas[words.__name__] = {
            "type": "string",
            "enum": list(words.words),
            "description": words.description,
        }
    for enum in ENUMS:  # msgspec sorts an enum's values; the document keeps the code's order
        schemas[enum.__name__] = {
            "type": "string",
            "enum": [m.value for m in enum],
            **({"description": ENUM_TEXT[enum]} if enum in ENUM_TEXT else {}),
        }
    return schemas
