"""Webhook events: what a change of a job's record says happened, and the outbox rows
that carry it to each hook that wants it (webhooks.py delivers them).

Pure, but for reading the log's tail.  ``store.Store.watch`` calls ``Jobs._events``
(manager.py) inside the transaction of every record write touching ``WATCHED``; it
calls ``happened(old, new)`` and, for what happened, ``rows(...)``.  So every way a job
starts or ends (its thread, a cancel of a queued job, a job lost at a restart) passes
this one point, and nothing is emitted twice: the same change written again compares
equal, and an event's id is made from the job and the event, so a row already in the
outbox is not added again (``INSERT OR IGNORE``).

Events are ``<subject>.<event>``.  ``job.*`` events come from a job's record as above.
``run.*`` events come from a run's own state changes (``Store.watch_runs`` calls
``Runs._events`` in the transaction of every run state write and delete, with the run's
job as it is then): ``run_happened`` and ``run_rows``.  A run's rows carry
``run-<id>`` in the outbox's `job_id` column, so they reach each hook in order too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mlbench_daemon.store import JobRecord, OutboxRecord, RunRecord, Store
from mlbench_daemon.timefmt import iso, mlbench_date
from mlbench_daemon.vocabulary import HookEvent, JobState, RunHookEvent, RunState

WATCHED = frozenset({"state", "stalls"})  # the columns whose change may be an event
TAIL_LINES = 50  # lines of output in an event
TAIL_BYTES = 64 * 1024  # read from the log's end to find them
LINE_MAX = 1000  # characters kept of one line

_FINAL = {
    JobState.SUCCEEDED: HookEvent.SUCCEEDED,
    JobState.FAILED: HookEvent.FAILED,
    JobState.CANCELLED: HookEvent.CANCELLED,
    JobState.LOST: HookEvent.LOST,
}


def _stall_ready(episode: Mapping[str, Any]) -> bool:
    """An episode is reported once its roll-call is taken (or failed), or it ended first:
    the event then names the suspects."""
    return bool(
        episode.get("roll_call") is not None
        or episode.get("roll_call_error") is not None
        or episode.get("ended") is not None
    )


def happened(old: JobRecord, new: JobRecord) -> list[tuple[HookEvent, str]]:
    """What the change from `old` to `new` says happened -> [(event, key)]: `key` makes
    the event's id unique per job (a stall episode's detection time)."""
    found: list[tuple[HookEvent, str]] = []
    if old.state != new.state:
        if new.state == JobState.RUNNING:
            found.append((HookEvent.STARTED, ""))
        elif new.state in _FINAL:
            found.append((_FINAL[new.state], ""))
    reported = {e.get("detected") for e in old.stalls if _stall_ready(e)}
    for episode in new.stalls:
        if _stall_ready(episode) and episode.get("detected") not in reported:
            found.append((HookEvent.STALLED, f"{round(episode['detected'] * 1000)}"))
    return found


def event_id(rec: JobRecord, name: str, key: str) -> str:
    """The event's id, the receivers' idempotency key: the same for every hook, every
    attempt and every restart."""
    return f"{rec.id}.{name}" + (f".{key}" if key else "")


def wanted(hook: Mapping[str, Any], name: str, tags: Sequence[str]) -> bool:
    """Whether `hook` (a webhooks.hooks entry) takes event `name` of a job with `tags`: it
    is one of its `events` and the job carries every tag of its `tags`."""
    return name in hook["events"] and set(hook["tags"]) <= set(tags)


def tail(store: Store, job_id: str, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of the job's output (each cut to LINE_MAX characters)."""
    size = store.log_size(job_id)
    data, _ = store.read_log(job_id, max(0, size - TAIL_BYTES), TAIL_BYTES)
    text = data.decode(errors="replace").splitlines()
    if size > TAIL_BYTES and text:
        text = text[1:]  # the first line read may be cut
    return [line[:LINE_MAX] for line in text[-lines:]]


def tail_or_why(store: Store, job_id: str) -> list[str]:
    """`tail`, or one line saying why the output could not be read (the event goes all
    the same)."""
    try:
        return tail(store, job_id)
    except OSError as e:
        return [f"(the output could not be read: {e.strerror or e})"]


def body(
    eid: str,
    name: str,
    now: float,
    job: Mapping[str, Any] | None,
    run: Mapping[str, Any] | None,
    failure: Mapping[str, Any] | None,
    output: Sequence[str],
) -> bytes:
    """An event's JSON body: ``shapes.WebhookEvent``'s fields, in its order."""
    fields = {"id": eid, "event": name, "time": iso(now), "job": job, "run": run}
    return json.dumps({**fields, "failure": failure, "output": list(output)}).encode()


def rows(
    hooks: Sequence[Mapping[str, Any]],
    rec: JobRecord,
    fired: Sequence[tuple[HookEvent, str]],
    job: Mapping[str, Any],
    output: Sequence[str],
    now: float,
) -> list[OutboxRecord]:
    """One outbox row per (event, hook that wants it); the body is made once per event.
    `job` is the job's API answer, `now` the wall time (max_age_s counts from it)."""
    out = []
    for event, key in fired:
        name = f"job.{event}"
        takers = [h for h in hooks if wanted(h, name, rec.tags)]
        if takers:
            eid = event_id(rec, name, key)
            data = body(eid, name, now, job, None, rec.failure, output)
            out += [OutboxRecord(0, eid, h["name"], name, rec.id, now, data, 0, now, None)
                    for h in takers]  # fmt: skip
    return out


# --- runs: a run's own state changes (``Store.watch_runs``; jobs/runs.py calls these)


def run_happened(
    old: RunRecord, new: RunRecord | None, job: JobRecord | None
) -> RunHookEvent | None:
    """What the change of a run from `old` to `new` (None: deleted) says happened, its
    job (if any) as it is then -> the event, or None."""
    if new is None:  # a delete: a cancel of a run that had not ended
        return None if old.state.is_final else RunHookEvent.CANCELLED
    if old.state == new.state:
        return None
    if new.state == RunState.STARTED:
        return RunHookEvent.STARTED
    if new.state == RunState.FINISHED:
        return RunHookEvent.FINISHED
    if new.state == RunState.FAILED:
        cancelled = job is not None and job.state == JobState.CANCELLED
        return RunHookEvent.CANCELLED if cancelled else RunHookEvent.FAILED
    return None


def run_subject(run_id: int) -> str:
    """A run's events' key in the outbox's `job_id` column (their order is kept per hook
    and key) and the start of their ids."""
    return f"run-{run_id}"


def run_view(old: RunRecord, new: RunRecord | None, now: float) -> dict[str, Any]:
    """The run as a `run.*` event shows it (``shapes.HookRun``): as it was after the
    change; a run deleted before it ended as `failed`, ended at the delete."""
    rec = new or old
    state, finished = rec.state, rec.finished_at
    if new is None and not old.state.is_final:
        state, finished = RunState.FAILED, now
    return {
        "id": rec.id, "name": rec.name, "state": state, "num_workers": rec.num_workers,
        "job_id": rec.job_id, "nodes": list(rec.nodes), "notes": list(rec.notes),
        "created_at": mlbench_date(rec.created_at), "finished_at": mlbench_date(finished),
        "submitted_by": rec.submitted_by,
    }  # fmt: skip


def run_rows(
    hooks: Sequence[Mapping[str, Any]],
    event: RunHookEvent,
    run: Mapping[str, Any],
    job: JobRecord | None,
    job_json: Mapping[str, Any] | None,
    output: Sequence[str],
    now: float,
) -> list[OutboxRecord]:
    """One outbox row per hook that wants the run's `event`; a hook's `tags` are matched
    against the run's job's (a run without a job has none)."""
    name = f"run.{event}"
    takers = [h for h in hooks if wanted(h, name, job.tags if job is not None else [])]
    if not takers:
        return []
    key = run_subject(run["id"])
    eid = f"{key}.{name}"
    failure = job.failure if job is not None else None
    data = body(eid, name, now, job_json, run, failure, output)
    return [OutboxRecord(0, eid, h["name"], name, key, now, data, 0, now, None) for h in takers]
