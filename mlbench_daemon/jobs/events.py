"""Webhook events: what a change of a job's record says happened, and the outbox rows
that carry it to each hook that wants it (webhooks.py delivers them).

Pure, but for reading the log's tail.  ``store.Store.watch`` calls ``Jobs._events``
(manager.py) inside the transaction of every record write touching ``WATCHED``; it
calls ``happened(old, new)`` and, for what happened, ``rows(...)``.  So every way a job
starts or ends (its thread, a cancel of a queued job, a job lost at a restart) passes
this one point, and nothing is emitted twice: the same change written again compares
equal, and an event's id is made from the job and the event, so a row already in the
outbox is not added again (``INSERT OR IGNORE``).

Events are ``<subject>.<event>``.  The subject is ``job``; a job that belongs to a run
will also make ``run.<event>`` rows at this point (``subjects``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mlbench_daemon.store import JobRecord, OutboxRecord, Store
from mlbench_daemon.timefmt import iso
from mlbench_daemon.vocabulary import HookEvent, JobState

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


def subjects(rec: JobRecord) -> tuple[str, ...]:
    """What the record's events are about: the job (and, when the runs land, its run)."""
    return ("job",)


def event_id(rec: JobRecord, name: str, key: str) -> str:
    """The event's id, the receivers' idempotency key: the same for every hook, every
    attempt and every restart."""
    return f"{rec.id}.{name}" + (f".{key}" if key else "")


def wanted(hook: Mapping[str, Any], name: str, rec: JobRecord) -> bool:
    """Whether `hook` (a webhooks.hooks entry) takes event `name` of this job: it is one of
    its `events` and the job carries every tag of its `tags`."""
    return name in hook["events"] and set(hook["tags"]) <= set(rec.tags)


def tail(store: Store, job_id: str, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of the job's output (each cut to LINE_MAX characters)."""
    size = store.log_size(job_id)
    data, _ = store.read_log(job_id, max(0, size - TAIL_BYTES), TAIL_BYTES)
    text = data.decode(errors="replace").splitlines()
    if size > TAIL_BYTES and text:
        text = text[1:]  # the first line read may be cut
    return [line[:LINE_MAX] for line in text[-lines:]]


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
    for subject in subjects(rec):
        for event, key in fired:
            name = f"{subject}.{event}"
            takers = [h for h in hooks if wanted(h, name, rec)]
            if not takers:
                continue
            eid = event_id(rec, name, key)
            body = json.dumps(
                {
                    "id": eid,
                    "event": name,
                    "time": iso(now),
                    "job": job,
                    "failure": rec.failure,
                    "output": list(output),
                }
            ).encode()
            out += [
                OutboxRecord(0, eid, h["name"], name, rec.id, now, body, 0, now, None)
                for h in takers
            ]
    return out
