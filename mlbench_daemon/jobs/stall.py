"""Stalls: a running job whose output has not grown for ``stall_after_s`` (the job's
field, else ``mpi.stall_after_s``; 0 = off).

A stall is a signal, not a verdict: the job stays running.  Each *episode* begins when
the quiet reaches ``stall_after_s`` (checked every ``check_interval()``, so it is seen
within ``stall_after_s`` + one interval) and ends when the output grows again or the job
ends.  One roll-call is taken per episode and kept with it, so whoever looks later sees
where every rank was while the job was quiet.

``Stalls`` is the pure part (time is passed in; the caller locks): the episodes of one
job as stored in its record's ``stalls`` column, a JSON list of::

    {"since": epoch, "detected": epoch, "ended": epoch | None,
     "roll_call": RollCall as a dict | None, "roll_call_error": str | None,
     "suspects": [Suspect as a dict, ...]}

``since`` is when the output last grew (the quiet began); ``detected`` when the quiet
was found to be a stall.  Only the newest roll-call is kept whole (a roll-call of many
ranks is large); older episodes keep their suspects.  At most ``MAX_EPISODES`` are kept.
A job list shows each roll-call's counts only (``summary``): its whole stays with
``GET /api/mpi_jobs/<id>``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from mlbench_daemon.timefmt import iso

MAX_EPISODES = 20  # the oldest episodes go first beyond this (a job that stalls again and again)
CHECK_MAX_S = 5.0  # the longest pause between two checks of one job's quiet
CHECK_MIN_S = 0.25

Episode = dict[str, Any]


def check_interval(after_s: float) -> float:
    """How often a job's quiet is checked: a quarter of `after_s`, within bounds; a stall is
    seen at most this long after the quiet reaches `after_s`."""
    return min(CHECK_MAX_S, max(CHECK_MIN_S, after_s / 4))


class Stalls:
    """The stall episodes of one job (pure: the caller passes the time and holds a lock)."""

    def __init__(self, episodes: Sequence[Episode], quiet_since: float) -> None:
        self.episodes: list[Episode] = copy.deepcopy(list(episodes))
        # when the output last grew; an episode left open by a previous daemon keeps its own
        self.quiet_since = self.open["since"] if self.open else quiet_since

    @property
    def open(self) -> Episode | None:
        """The episode under way, if any."""
        last = self.episodes[-1] if self.episodes else None
        return last if last is not None and last["ended"] is None else None

    def snapshot(self) -> list[Episode]:
        """The episodes as the record stores them (a copy: later changes do not touch it)."""
        return copy.deepcopy(self.episodes)

    def grew(self, now: float) -> bool:
        """The output grew at `now` -> whether that ended an episode."""
        self.quiet_since = now
        return self.end(now)

    def end(self, now: float) -> bool:
        """End the episode under way (the output grew, or the job ended) -> whether one was."""
        episode = self.open
        if episode is None:
            return False
        episode["ended"] = now
        return True

    def check(self, now: float, after_s: float) -> Episode | None:
        """-> the new episode if the quiet at `now` is a stall (none while one is open)."""
        if after_s <= 0 or self.open is not None or now - self.quiet_since < after_s:
            return None
        episode: Episode = {
            "since": self.quiet_since, "detected": now, "ended": None,
            "roll_call": None, "roll_call_error": None, "suspects": [],
        }  # fmt: skip
        self.episodes = [*self.episodes[-(MAX_EPISODES - 1) :], episode]
        return episode

    def roll_call_taken(
        self, episode: Episode, roll_call: dict[str, Any] | None, error: str | None
    ) -> None:
        """Keep `episode`'s roll-call (or why there is none); older ones keep their suspects."""
        if roll_call is not None:
            for other in self.episodes:
                other["roll_call"] = None
            episode["suspects"] = roll_call["suspects"]
        episode["roll_call"], episode["roll_call_error"] = roll_call, error


def last_suspects(episodes: Sequence[Episode]) -> list[dict[str, Any]] | None:
    """The suspects of the newest roll-call taken in a stall (None: none was taken)."""
    for episode in reversed(episodes):
        if episode["roll_call"] is not None:
            return list(episode["suspects"])
    return None


def to_json(episode: Episode, now: float) -> dict[str, Any]:
    """One episode as the API shows it (``shapes.Stall``): `quiet_s` up to `now` while
    it lasts, else up to its end."""
    until = now if episode["ended"] is None else episode["ended"]
    return {
        "since": iso(episode["since"]),
        "detected": iso(episode["detected"]),
        "ended": iso(episode["ended"]),
        "quiet_s": round(max(0.0, until - episode["since"]), 1),
        "roll_call": episode["roll_call"],
        "roll_call_error": episode["roll_call_error"],
        "suspects": episode["suspects"],
    }


def view(episodes: Sequence[Episode], now: float, running: bool) -> tuple[Any, list[Any]]:
    """-> (`stalled`: the episode under way of a running job, or None; `stalls`: the
    others, oldest first), as the job's answer shows them."""
    if running and episodes and episodes[-1]["ended"] is None:
        return to_json(episodes[-1], now), [to_json(e, now) for e in episodes[:-1]]
    return None, [to_json(e, now) for e in episodes]


def summary(stall: Mapping[str, Any]) -> dict[str, Any]:
    """A stall as `to_json` gives it, as a job list shows it (``shapes.StallSummary``): its
    roll-call's time and counts instead of every rank's stack."""
    rc = stall["roll_call"]
    counts = rc and {
        "taken": rc["taken"],
        "took_s": rc["took_s"],
        "ranks": len(rc["ranks"]),
        "groups": [len(g["ranks"]) for g in rc["groups"]],
        "nodes_failed": [n["node"] for n in rc["nodes_failed"]],
    }
    return {k: counts if k == "roll_call" else v for k, v in stall.items()}
