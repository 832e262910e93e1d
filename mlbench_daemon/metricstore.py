"""Metrics of runs and of their nodes (MLBench's "pods"): a SQLite file of their own.

Layout: ``<state_dir>/metrics.sqlite`` (WAL), apart from the job records so that a
flood of points never queues behind a job's state transition, nor a job's commit
behind a flood of points.  One table, one row per point; a run's own points have no
``pod``, a node's name it:

    points (id, run_id, pod, name, date, value, num, cumulative, metadata, posted)
        index (run_id, pod, name, date, id, num, cumulative)     a run's series; pruning
        index (pod, name, date, id, num, cumulative) where pod   a node's series

Both indexes hold a series in answer order (``date``, then arrival) with what
``summarize`` averages, so a read walks one index range and never sorts.  A file
written before this layout (``run_points`` and ``pod_points``, the same columns twice)
is moved into ``points`` when it is opened, in one transaction.

``date`` is text in the API's point format (``%Y-%m-%dT%H:%M:%S.%fZ``, UTC, fixed
width): it sorts as time does, so a ``since`` filter and ``ORDER BY date`` use the
index and reads never format a date again.  ``value`` is the text as posted (MLBench's
values are strings: ``TaskResult @ 0`` holds a sentence); ``num`` its number, or NULL,
which is what ``summarize`` averages.

Writes are grouped: ``add()`` checks the caps and queues the point (a bounded queue:
full = ``Busy``, answered 429 with Retry-After) and returns; one writer thread commits
what is queued every ``GROUP_S`` or ``GROUP_POINTS`` points, in one transaction (one
fsync per group, not per point).  A read first waits (bounded) for the points queued
before it (``flush``), so a client reads what it posted.  A commit that fails (disk
full, read-only) keeps its points and is retried every ``RETRY_S``; meanwhile
``fault`` is set and ``add()`` refuses at once (507/503 as the job store does), so
the API never waits on a sick disk.

Caps: ``max_points_per_series`` per (run, name) and per (node, name);
``max_points_per_run`` over what clients post for one run (its own points and the
pod points posted for its nodes); the daemon's own node samples count in their series
only.  Past a cap a point is refused (``CapReached``, 413), never an older one dropped.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from mlbench_daemon.store import StoreError

log = logging.getLogger(__name__)

DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # MLBench's serializer's, for every point's date
GROUP_S = 0.1  # the writer commits what is queued at least this often
GROUP_POINTS = 2000  # ... or once this many are queued
RETRY_S = 1.0  # a failed commit is tried again after this
FLUSH_WAIT_S = 2.0  # the longest a read waits for the points queued before it
RETRY_AFTER_S = 1  # what a refused add() tells the client to wait

SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    pod TEXT,
    name TEXT NOT NULL,
    date TEXT NOT NULL,
    value TEXT NOT NULL,
    num REAL,
    cumulative INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    posted INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS points_run ON points (run_id, pod, name, date, id, num, cumulative);
CREATE INDEX IF NOT EXISTS points_pod ON points (pod, name, date, id, num, cumulative)
    WHERE pod IS NOT NULL;
"""
OLD_TABLES = """
INSERT INTO points (run_id, pod, name, date, value, num, cumulative, metadata, posted)
    SELECT run_id, NULL, name, date, value, num, cumulative, metadata, 1
    FROM run_points ORDER BY id;
INSERT INTO points (run_id, pod, name, date, value, num, cumulative, metadata, posted)
    SELECT run_id, pod, name, date, value, num, cumulative, metadata, posted
    FROM pod_points ORDER BY id;
DROP TABLE run_points;
DROP TABLE pod_points;
"""  # the layout before one table: moved in arrival order, so ties keep their order

RUN_KEY = "run_id = :key AND pod IS NULL"  # a run's own series
POD_KEY = "pod = :key"  # a node's series

# The names of a run's or node's series, in order: one index seek each.
NAMES = """
WITH RECURSIVE names(name) AS (
    SELECT min(name) FROM points WHERE {key}
    UNION ALL
    SELECT (SELECT min(name) FROM points WHERE {key} AND name > names.name)
    FROM names WHERE names.name IS NOT NULL
)
SELECT name FROM names WHERE name IS NOT NULL
"""

# One series read walks its index range in answer order.  With ``summarize``: the first
# point of each group of :f (a recursive step skips :f - 1 points of the index from
# the previous group's first), then each group's mean of numbers by SQLite (``avg``
# skips the NULLs of text values), its first point's date, ``cumulative`` and value.
# About 2 x count index steps in SQLite, and only the groups come to Python.
SUMMARY = """
WITH RECURSIVE firsts(id, date) AS (
    SELECT id, date FROM (SELECT id, date FROM points WHERE {where} ORDER BY date, id LIMIT 1)
    UNION ALL
    SELECT p.id, p.date FROM firsts f, points p WHERE p.id = (
        SELECT id FROM points WHERE {where} AND (date, id) > (f.date, f.id)
        ORDER BY date, id LIMIT 1 OFFSET :f - 1)
)
SELECT p.date, p.cumulative, p.value, (
    SELECT avg(num) FROM (
        SELECT num FROM points WHERE {where} AND (date, id) >= (p.date, p.id)
        ORDER BY date, id LIMIT :f)
) FROM firsts f JOIN points p ON p.id = f.id ORDER BY p.date, p.id
"""


# --- what the metrics need of a run (runs.Runs satisfies it; tests use a dict) ---------


class RunLike(Protocol):
    """What the metrics read of a run (``runs.RunView``)."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def nodes(self) -> tuple[str, ...]: ...
    @property
    def created_at(self) -> float: ...
    @property
    def finished_at(self) -> float | None: ...


class RunLookup(Protocol):
    """The runs the metrics belong to: by id, by one of their nodes, the live ones."""

    def get_run(self, run_id: int) -> RunLike | None: ...
    def by_pod(self, pod_name: str) -> RunLike | None: ...
    def live(self) -> Sequence[RunLike]: ...


class NoRuns:
    """The lookup of a daemon without runs: there is none, so nothing can be posted."""

    def get_run(self, run_id: int) -> RunLike | None:
        return None

    def by_pod(self, pod_name: str) -> RunLike | None:
        return None

    def live(self) -> Sequence[RunLike]:
        return ()


NO_RUNS = NoRuns()


# --- points --------------------------------------------------------------------------


def format_date(epoch: float) -> str:
    """An epoch time in the points' date format (UTC, microseconds, ``Z``)."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime(DATE_FORMAT)


def parse_date(text: str) -> str:
    """A client's date -> the points' format.  Takes ISO 8601 with ``Z`` or an offset,
    and Python's ``str(datetime)`` (a space, no zone, microseconds only when not zero),
    which is what mlbench-core sends; a date without a zone is UTC (the client's
    ``utcnow()``).  ValueError for anything else."""
    raw = text.strip()
    if not raw or len(raw) > 64:
        raise ValueError("not a date")
    t = datetime.datetime.fromisoformat(raw.replace("z", "Z"))
    if t.tzinfo is not None:
        t = t.astimezone(datetime.UTC).replace(tzinfo=None)
    return t.strftime(DATE_FORMAT)


def number(value: str) -> float | None:
    """The value as a number for averaging; None for text (and for inf/nan)."""
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


@dataclasses.dataclass(frozen=True)
class Point:
    """One metric point to store: a run's (``pod`` None) or a node's."""

    run_id: int
    name: str
    value: str
    date: str  # DATE_FORMAT
    cumulative: bool = False
    metadata: str = ""
    pod: str | None = None
    posted: bool = True  # by a client (counts in the run's cap); False: the daemon's sample

    def answer(self) -> dict[str, Any]:
        """MLBench's answer to a POST: the point as stored."""
        return {
            "name": self.name,
            "value": self.value,
            "date": self.date,
            "metadata": self.metadata,
            "cumulative": self.cumulative,
        }


# --- refusals -------------------------------------------------------------------------


class CapReached(Exception):
    """A cap of the store is reached; str() names it and its value."""


class Busy(Exception):
    """The write queue is full: try again after ``RETRY_AFTER_S``."""


@dataclasses.dataclass(frozen=True)
class Query:
    """A read of one run's or node's series (MLBench's query parameters)."""

    since: str | None = None  # DATE_FORMAT; points at or after it
    until: str | None = None  # DATE_FORMAT; points at or before it (the zip: the run's end)
    summarize: int | None = None  # at most this many points per series, by averaging
    name: str | None = None  # one series only (metric_filter)
    last_n: int | None = None  # the last n points of each series (after summarize)


Series = dict[str, list[dict[str, Any]]]  # name -> points {"date", "value", "cumulative"}


class MetricStore:
    def __init__(
        self,
        path: str,
        *,
        max_points_per_series: int = 100_000,
        max_points_per_run: int = 1_000_000,
        queue_size: int = 10_000,
    ) -> None:
        self.path = path
        self.max_series, self.max_run = max_points_per_series, max_points_per_run
        self.fault: StoreError | None = None  # the last commit's failure; None once one works
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        self._db = self._connect()
        self._create()
        self._read = self._connect()  # readers never wait for the writer's transaction
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()  # the writer's connection: commits, delete_run
        self._queue: queue.Queue[Point] = queue.Queue(queue_size)
        self._counts_lock = threading.Lock()
        self._series: dict[tuple[str, int | str, str], int] = {}
        self._runs: dict[int, int] = {}
        self._load_counts()
        self._done = threading.Condition()
        self._queued = self._committed = 0  # points queued / committed so far (flush)
        self._hurry = threading.Event()  # a reader waits: commit now
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="metrics-writer", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _create(self) -> None:
        """The schema, in one transaction with the move of a file in the old layout."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                self._db.execute(statement)
            old = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'run_points'"
            if self._db.execute(old).fetchone():
                for statement in OLD_TABLES.split(";"):
                    self._db.execute(statement)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _load_counts(self) -> None:
        for run_id, pod, name, posted, n in self._db.execute(
            "SELECT run_id, pod, name, posted, COUNT(*) FROM points "
            "GROUP BY run_id, pod, name, posted"
        ):
            key = ("r", run_id, name) if pod is None else ("p", pod, name)
            self._series[key] = self._series.get(key, 0) + n
            if posted:
                self._runs[run_id] = self._runs.get(run_id, 0) + n

    def close(self, timeout: float = 5.0) -> None:
        """Commit what is queued (bounded by `timeout`), then stop the writer."""
        self._stop.set()
        self._hurry.set()
        self._writer.join(timeout)
        with self._read_lock:
            self._read.close()
        if not self._writer.is_alive():
            self._db.close()

    # --- writes ---------------------------------------------------------------------

    def add(self, point: Point) -> None:
        """Queue `point` for the next group commit.  StoreError: the store cannot be
        written now; CapReached: a cap is full; Busy: the queue is full."""
        if self.fault is not None:
            raise self.fault
        key = (
            ("p", point.pod, point.name)
            if point.pod is not None
            else ("r", point.run_id, point.name)
        )
        with self._counts_lock:
            if self._series.get(key, 0) >= self.max_series:
                what = f"node {point.pod!r}" if point.pod is not None else f"run {point.run_id}"
                raise CapReached(
                    f"metric {point.name!r} of {what} has {self.max_series} points, the cap "
                    "(metrics.max_points_per_series)"
                )
            if point.posted and self._runs.get(point.run_id, 0) >= self.max_run:
                raise CapReached(
                    f"run {point.run_id} has {self.max_run} posted points, the cap "
                    "(metrics.max_points_per_run)"
                )
            try:
                self._queue.put_nowait(point)
            except queue.Full:
                raise Busy(
                    f"{self._queue.maxsize} points wait to be written (metrics.queue_size)"
                ) from None
            self._series[key] = self._series.get(key, 0) + 1
            if point.posted:
                self._runs[point.run_id] = self._runs.get(point.run_id, 0) + 1
            self._queued += 1

    def flush(self, timeout: float = FLUSH_WAIT_S) -> bool:
        """Wait until every point queued before this call is committed (at most
        `timeout`); False if they are not (the disk is sick: reads show what is there)."""
        with self._done:
            target = self._queued
            if self._committed >= target:
                return True
            self._hurry.set()
            return self._done.wait_for(lambda: self._committed >= target, timeout)

    def _write_loop(self) -> None:
        batch: list[Point] = []
        while True:
            if not batch:
                try:
                    batch.append(self._queue.get(timeout=GROUP_S))  # idle: close() waits this
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    if self.fault is not None:  # add() refuses meanwhile: see if it healed
                        self._commit([])
                    continue
                deadline = time.monotonic() + GROUP_S
                while len(batch) < GROUP_POINTS and not self._hurry.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        batch.append(self._queue.get(timeout=left))
                    except queue.Empty:
                        break
                self._hurry.clear()
            while len(batch) < GROUP_POINTS:  # whatever else is there: same transaction
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._commit(batch):
                with self._done:
                    self._committed += len(batch)
                    self._done.notify_all()
                batch = []
            elif self._stop.wait(RETRY_S):
                log.error("metrics: %d points not written at shutdown: %s", len(batch), self.fault)
                return

    def _commit(self, batch: list[Point]) -> bool:
        rows = [
            (p.run_id, p.pod, p.name, p.date, p.value, number(p.value), p.cumulative,
             p.metadata, p.posted)
            for p in batch
        ]  # fmt: skip
        try:
            with self._write_lock:
                self._insert(rows)
        except sqlite3.Error as e:
            fault = StoreError(self.path, e)
            if self.fault is None or self.fault.reason != fault.reason:
                log.error(
                    "metrics: %s; %d points kept, tried again every %gs", fault, len(batch), RETRY_S
                )
            self.fault = fault
            return False
        if self.fault is not None:
            log.warning("metrics: %s writable again (was %s)", self.path, self.fault.reason)
            self.fault = None
        return True

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """One transaction: a group of points, all or none (none: a write of the header
        page that changes nothing, to see whether the file can be written again)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if not rows:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                self._db.execute(f"PRAGMA user_version = {int(version)}")
            self._db.executemany(
                "INSERT INTO points (run_id, pod, name, date, value, num, cumulative, metadata, "
                "posted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def delete_run(self, run_id: int) -> int:
        """Remove every point of the run and of its nodes while it ran; -> how many.
        Points of it still queued are committed first, so none outlives the run."""
        self.flush()
        with self._counts_lock, self._write_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n = self._db.execute("DELETE FROM points WHERE run_id = ?", (run_id,)).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(self.path, e) from None
            self._runs.pop(run_id, None)
            self._series = {k: v for k, v in self._series.items() if k[0] == "r" and k[1] != run_id}
            for pod, name, count in self._db.execute(
                "SELECT pod, name, COUNT(*) FROM points WHERE pod IS NOT NULL GROUP BY pod, name"
            ):
                self._series["p", pod, name] = count
        return n

    # --- reads ----------------------------------------------------------------------

    def _rows(self, sql: str, params: Iterable[Any] | dict[str, Any]) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._read.execute(
                sql, params if isinstance(params, dict) else tuple(params)
            ).fetchall()

    def run_series(self, run_id: int, q: Query = Query()) -> Series:
        """The run's own series, by name."""
        return self._series_of(RUN_KEY, run_id, q)

    def pod_series(self, pod: str, q: Query = Query()) -> Series:
        """A node's series (every run's samples and posts for it), by name."""
        return self._series_of(POD_KEY, pod, q)

    def has_pod(self, pod: str) -> bool:
        self.flush()
        return bool(self._rows("SELECT 1 FROM points WHERE pod = ? LIMIT 1", (pod,)))

    def value(self, run_id: int, name: str) -> str | None:
        """The run's first point named `name` (its official result), or None."""
        self.flush()
        rows = self._rows(
            f"SELECT value FROM points WHERE {RUN_KEY} AND name = :name ORDER BY date, id LIMIT 1",
            {"key": run_id, "name": name},
        )
        return rows[0][0] if rows else None

    def _series_of(self, key_sql: str, key: int | str, q: Query) -> Series:
        self.flush()
        params = {"key": key, "name": q.name, "since": q.since, "until": q.until}
        if q.name is not None:
            names = [q.name]
        else:  # one index seek per name, not a walk over every point (DISTINCT)
            names = [r[0] for r in self._rows(NAMES.format(key=key_sql), params)]
        out: Series = {}
        for name in names:
            points = self._one_series(key_sql, {**params, "name": name}, q)
            if points:
                out[name] = points
        return out

    def _one_series(self, key_sql: str, params: dict[str, Any], q: Query) -> list[dict[str, Any]]:
        where = key_sql + " AND name = :name"
        if q.since is not None:
            where += " AND date >= :since"
        if q.until is not None:
            where += " AND date <= :until"
        count = 0
        if q.summarize:
            count = self._rows(f"SELECT COUNT(*) FROM points WHERE {where}", params)[0][0]
        if q.summarize and count > q.summarize:
            # MLBench's averaging: consecutive groups of ceil(count / summarize) points, each
            # the mean of its values at its first point's date and `cumulative`.  MLBench
            # dropped a last, shorter group; it is kept here (its own mean), so the newest
            # points are never lost from a summary.  A group of text only (an official
            # result) shows its first value as posted.
            factor = math.ceil(count / q.summarize)
            points = [
                {"date": d, "value": v if mean is None else str(mean), "cumulative": bool(c)}
                for d, c, v, mean in self._rows(
                    SUMMARY.format(where=where), {**params, "f": factor}
                )
            ]
        else:
            points = [
                {"date": d, "value": v, "cumulative": bool(c)}
                for d, v, c in self._rows(
                    f"SELECT date, value, cumulative FROM points WHERE {where} ORDER BY date, id",
                    params,
                )
            ]
        if q.last_n:
            points = points[-q.last_n :]
        return points

    def everything(self, run_names: dict[int, str]) -> dict[str, dict[str, Series]]:
        """MLBench's ``GET /api/metrics/``: every node's and every run's series; runs by
        name (`run_names`; a run no longer known by its id)."""
        self.flush()
        pods: dict[str, Series] = {}
        for pod, name, d, v, c in self._rows(
            "SELECT pod, name, date, value, cumulative FROM points WHERE pod IS NOT NULL "
            "ORDER BY pod, name, date, id",
            (),
        ):
            pods.setdefault(pod, {}).setdefault(name, []).append(
                {"date": d, "value": v, "cumulative": bool(c)}
            )
        runs: dict[str, Series] = {}
        for run_id, name, d, v, c in self._rows(
            "SELECT run_id, name, date, value, cumulative FROM points WHERE pod IS NULL "
            "ORDER BY run_id, name, date, id",
            (),
        ):
            label = run_names.get(run_id, str(run_id))
            runs.setdefault(label, {}).setdefault(name, []).append(
                {"date": d, "value": v, "cumulative": bool(c)}
            )
        return {"pod_metrics": pods, "run_metrics": runs}

    def run_ids(self) -> list[int]:
        """Every run that has points (its own or its nodes')."""
        self.flush()
        rows = self._rows("SELECT DISTINCT run_id FROM points ORDER BY 1", ())
        return [r[0] for r in rows]
