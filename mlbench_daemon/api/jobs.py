"""The jobs: POST/GET /api/mpi_jobs, GET/DELETE /api/mpi_jobs/<id>, and the job's log."""

from __future__ import annotations

import re

import bottle
import msgspec

from mlbench_daemon.api.common import (
    JSON,
    Deps,
    as_json,
    body,
    caller,
    flag,
    int_param,
    location,
    note,
    own_only,
)
from mlbench_daemon.api.plugin import register
from mlbench_daemon.api.streams import Held
from mlbench_daemon.errors import BadRequest, InsufficientStorage, Unavailable, echo
from mlbench_daemon.openapi import FLAG, Alias, Answer, Param, Route, answer, error, ref
from mlbench_daemon.shapes import TAG_PATTERN
from mlbench_daemon.store import LOG_CHUNK_MAX, StoreError
from mlbench_daemon.vocabulary import JobState, Role, StoreReason


def refuse_if_store_fault(deps: Deps) -> None:
    """507 (disk full) or 503 (read-only, other) naming the reason: nothing new can be
    recorded."""
    fault = deps.jobs.store.fault
    if fault is None:
        return
    cls = InsufficientStorage if fault.reason == StoreReason.DISK_FULL else Unavailable
    raise cls(f"the daemon's state dir cannot be written ({fault.reason})", error=fault.reason)


def submit(deps: Deps) -> str | Held:
    request = body(deps.max_body_bytes)
    refuse_if_store_fault(deps)
    wait = (request or {}).get("wait", True)
    if wait is True:
        deps.streams.take()  # before the job exists: a refused request leaves nothing behind
    try:
        try:
            job = deps.jobs.submit(request, by=caller().name)  # validates every field
        except StoreError:
            refuse_if_store_fault(deps)  # the fault this write just met
            raise
        note(job=job["id"])
        if wait is not True:
            bottle.response.set_header("Location", f"/api/mpi_jobs/{job['id']}")
            return as_json(job, 202)
        answer = deps.jobs.wait_json(job["id"])  # blocks here, before the 200 is sent
    except BaseException:
        if wait is True:
            deps.streams.give()
        raise
    bottle.response.content_type = JSON
    return Held(answer, deps.streams)


def list_jobs(deps: Deps) -> str:
    query = bottle.request.query
    states = tuple(s for s in query.getall("state") if s)
    for state in states:
        if state not in tuple(JobState):
            raise BadRequest(
                f"state: must be one of {', '.join(JobState)}, got {echo(state)}", field="state"
            )
    tags = tuple(t for t in query.getall("tag") if t)
    for tag in tags:
        if not re.search(TAG_PATTERN.replace("$", r"\Z"), tag):
            raise BadRequest(f"tag: must be key:value, got {echo(tag)}", field="tag")
    return as_json(
        deps.jobs.list(
            limit=int_param("limit", 50, 1, 1000),
            offset=int_param("offset", 0, 0, 1 << 31),
            states=states,
            submitted_by=query.get("submitted_by") or None,
            name=query.get("name") or None,
            tags=tags,
        )
    )


def get_job(deps: Deps, job_id: str) -> str:
    return as_json(deps.jobs.get(job_id))


def cancel_job(deps: Deps, job_id: str) -> str:
    who = caller()
    if not who.role.allows(Role.ADMIN):  # (an admin's cancel reads no record first)
        owner = deps.jobs.get(job_id)["submitted_by"]  # 404 first
        own_only(who, owner, f"job {job_id}", "submitted", "cancel")
    status, job = deps.jobs.cancel(job_id, by=who.name)  # bounded by server.cancel_answer_s
    return as_json(job, status)


def job_ranks(deps: Deps, job_id: str) -> str:
    deps.jobs.get(job_id)  # a 404 before a stream slot is taken
    deps.streams.take()  # a roll-call holds a thread for up to mpi.roll_call_timeout_s
    try:
        return as_json(msgspec.to_builtins(deps.jobs.roll_call(job_id)))
    finally:
        deps.streams.give()


def job_logs(deps: Deps, job_id: str) -> bytes | Held:
    offset = int_param("offset", 0, 0, 1 << 62)
    limit = int_param("limit", LOG_CHUNK_MAX, 1, LOG_CHUNK_MAX)
    tail = int_param("tail", -1, 0, 1 << 62)  # -1: not given
    follow = flag("follow")
    rank = int_param("rank", -1, 0, RANK_MAX - 1)
    if tail >= 0 and bottle.request.query.get("offset") not in (None, ""):
        raise BadRequest("tail: give either tail or offset, not both", field="tail")
    one = None if rank < 0 else rank
    size = deps.jobs.log_size(job_id, one)  # a 404 or 400 must come before the stream starts
    if tail >= 0:
        offset = max(0, size - tail)
        bottle.response.set_header("X-Log-Start", str(offset))
    bottle.response.content_type = "application/octet-stream"
    bottle.response.set_header("X-Content-Type-Options", "nosniff")
    if follow:
        deps.streams.take()
        gone = bottle.request.environ.get("waitress.client_disconnected")
        return Held(deps.jobs.follow_log(job_id, offset, gone=gone, rank=one), deps.streams)
    data, next_offset = deps.jobs.read_log(job_id, offset, limit, one)
    bottle.response.set_header("X-Next-Offset", str(next_offset))
    return data


_NO_SUCH_JOB = error("No such job.")
RANK_MAX = 1_000_000  # the most ranks a job can ask for (shapes.Np)

ROUTES = [
    Route(
        "POST",
        "/api/mpi_jobs/",
        submit,
        "submitJob",
        "Start an MPI job (the seed's endpoint)",
        "jobs",
        {
            200: answer("`wait` true: the job has ended (in any final state).", ref("JobResult")),
            202: answer(
                "`wait` false: the job is accepted (pending or running).",
                ref("Job"),
                headers=location("/api/mpi_jobs/<id>"),
            ),
            400: error(
                "Bad request body; `field` names the field (`body` for the body as a whole)."
            ),
            409: error(
                "A requested node or master is unknown, not matching the selector, "
                "or not `Running`."
            ),
            413: error("The body is over `server.max_body_bytes`."),
            429: error(
                "`mpi.max_concurrent_jobs` are running and `mpi.queue_size` more are queued."
            ),
            503: error(
                "No `Running` node matches the selector (`unavailable`); or, with `wait` true, "
                "`server.max_streams` long requests are open already (`too-many-streams`, and no "
                "job is made); or the state dir is read-only (`error` is `state-read-only` or "
                "`state-write-failed`)."
            ),
            507: error("The state dir is full (`error` is `state-disk-full`); no job is made."),
        },
        description=(
            "The body is optional: an empty body runs `mpi.program` on every selected `Running` "
            "node.  With `wait` true (the default) the answer comes when the job is over: the "
            "seed's keys `nodes`, `command`, `master_name`, `response` (the whole output), plus "
            "`id`, `state`, `exit_code` and the rest of the job.  With `wait` false the answer "
            "is 202 at once, with the job and a `Location` header.  Program and env together "
            "must stay under 256 KiB.  A request with `wait` true holds a server thread until "
            "the job ends: it counts against `server.max_streams` (with log follows)."
        ),
        body=ref("JobRequest"),
        aliases=(
            Alias(
                "/api/mpi_jobs", "submitJobNoSlash", "Start an MPI job (same as `/api/mpi_jobs/`)"
            ),
        ),
        role=Role.SUBMITTER,
    ),
    Route(
        "GET",
        "/api/mpi_jobs/",
        list_jobs,
        "listJobs",
        "Jobs, newest first",
        "jobs",
        {
            200: answer("The jobs.", {"type": "array", "items": ref("JobListItem")}),
            400: error("Bad `limit`, `offset`, `state` or `tag` (`field` names it)."),
        },
        query=(
            Param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                "At most this many jobs.",
            ),
            Param(
                "offset",
                {"type": "integer", "minimum": 0, "maximum": 2**31, "default": 0},
                "Skip this many of the newest.",
            ),
            Param(
                "state",
                {"anyOf": [ref("JobState"), {"const": ""}]},
                "Only jobs in this state (repeatable: any of them).",
            ),
            Param(
                "tag",
                {"type": "string", "pattern": f"(?:{TAG_PATTERN})|^$"},
                "Only jobs with this `key:value` tag (repeatable: every one of them).",
            ),
            Param("submitted_by", {"type": "string"}, "Only jobs submitted by this token name."),
            Param("name", {"type": "string"}, "Only jobs with this `name`."),
        ),
        aliases=(Alias("/api/mpi_jobs", "listJobsNoSlash", "Jobs (same as `/api/mpi_jobs/`)"),),
    ),
    Route(
        "GET",
        "/api/mpi_jobs/{job_id}",
        get_job,
        "getJob",
        "One job",
        "jobs",
        {200: answer("The job.", ref("Job")), 404: _NO_SUCH_JOB},
    ),
    Route(
        "DELETE",
        "/api/mpi_jobs/{job_id}",
        cancel_job,
        "cancelJob",
        "Cancel a job",
        "jobs",
        {
            200: answer("The job, final: normally `cancelled`.", ref("Job")),
            202: answer("The job, not final yet: the kill and sweep go on.", ref("Job")),
            403: error(
                "A submitter's token and another's job (`error` is `not-owner`; the message "
                "names the owner): nothing is cancelled.  Or as for every route (below)."
            ),
            404: _NO_SUCH_JOB,
            409: error("The job is already final, or not followed by this daemon."),
            503: error(
                "The state dir cannot be written (`error` is `state-read-only` or "
                "`state-write-failed`): the cancel goes on."
            ),
            507: error(
                "The state dir is full (`error` is `state-disk-full`): the cancel goes on, "
                "and the job is recorded once the disk takes writes again."
            ),
        },
        description="TERM to the job's process group on the master, `mpi.cancel_grace_s`, "
        "then KILL; then every host of the job is swept for its processes (the result is in "
        "`error`).  The kill and sweep run in the job's own thread: the answer comes within "
        "`server.cancel_answer_s`, 200 once the job is final, else 202 with the job as it is "
        "(the cancel goes on; a second DELETE starts nothing).  A master that cannot be "
        "reached is tried again every 5 s (`error` says so).  A submitter cancels its own jobs "
        "only; an admin anyone's.",
        role=Role.SUBMITTER,
    ),
    Route(
        "GET",
        "/api/mpi_jobs/{job_id}/logs",
        job_logs,
        "getJobLogs",
        "A chunk of a job's output, or all of it as it comes",
        "jobs",
        {
            200: Answer(
                "Output bytes (possibly none).",
                {"application/octet-stream": {}},
                headers={
                    "X-Next-Offset": {
                        "description": "`offset` plus the bytes returned (not with `follow=1`).",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    "X-Log-Start": {
                        "description": "With `tail`: the offset of the first byte returned "
                        "(size - `tail`, or 0).",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                },
            ),
            400: error(
                "Bad `offset`, `limit`, `tail`, `follow` or `rank`, or `tail` with `offset` "
                "(`field` names it); `rank` for a job submitted without `rank_output`, or "
                "outside its ranks."
            ),
            404: _NO_SUCH_JOB,
            503: error(
                "`follow=1`, and `server.max_streams` long requests are open already "
                "(`too-many-streams`)."
            ),
        },
        description="Raw bytes (stdout and stderr interleaved) from `offset`: at most `limit` "
        "bytes, with the offset to ask for next in `X-Next-Offset`.  `tail=N` starts at the "
        "last min(N, size) bytes instead (`X-Log-Start` says where; not with `offset`).  With "
        "`follow=1` the answer streams from `offset` (or from size - N with `tail`) until the "
        "job is final (no `X-Next-Offset`; `limit` is ignored); it holds a server thread, and "
        "counts against `server.max_streams`.  With `rank=N` (a job submitted with "
        "`rank_output`) all of this reads rank N's own log instead: its lines without the "
        "launcher's tags, split from the job's log as it comes.",
        query=(
            Param("offset", {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0}),
            Param(
                "limit",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": LOG_CHUNK_MAX,
                    "default": LOG_CHUNK_MAX,
                },
            ),
            Param(
                "tail",
                {"type": "integer", "minimum": 0, "maximum": 2**62},
                "Start at the last min(`tail`, size) bytes; not with `offset`.",
            ),
            Param(
                "follow",
                FLAG,
                "`1` (or `true`, `yes`) streams until the job is final; "
                "`0`, `false`, `no` or empty: one chunk.",
            ),
            Param(
                "rank",
                {"type": "integer", "minimum": 0, "maximum": RANK_MAX - 1},
                "One rank's output (a job submitted with `rank_output`): offsets, `tail` "
                "and `X-Next-Offset` are then in that rank's log.",
            ),
        ),
    ),
    Route(
        "GET",
        "/api/mpi_jobs/{job_id}/ranks",
        job_ranks,
        "getJobRanks",
        "Roll-call: every rank of a running job with its stack",
        "jobs",
        {
            200: answer("The roll-call.", ref("RollCall")),
            404: _NO_SUCH_JOB,
            409: error("The job is not running (pending or final)."),
            503: error("`server.max_streams` long requests are open already (`too-many-streams`)."),
        },
        description="For every rank: its node, pid, process state, CPU time and CPU % "
        "over a short sample, RSS, and a stack from the first of `mpi.roll_call_tools` the "
        "node has (`py-spy dump --nonblocking` for a Python rank, `eu-stack`, `gdb -batch`), "
        "else the kernel's `wchan`; `stack_source` says which, and `stack_error` names what "
        "was missing or denied.  Ranks are grouped by normalised stack; `suspects` are the ranks "
        "outside the majority.  One script per node, all nodes at once, each bounded by "
        "`mpi.roll_call_timeout_s`.  Concurrent requests for one job share one "
        "roll-call; each holds a server thread and counts against `server.max_streams`.",
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
