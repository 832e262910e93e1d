"""Job records (SQLite) and one append-only log file per job under state.dir.

Layout::

    <state_dir>/jobs.sqlite3      table ``jobs`` (WAL, synchronous=FULL)
    <state_dir>/logs/<id>.log     the job's output, bytes exactly as produced
    <state_dir>/logs/<id>.ranks/  a job with rank_output: <rank>.log per rank and the
                                  split's checkpoint (jobs/ranklog.py writes them)

A record is a frozen `JobRecord`, whose fields declare the table's columns once
(``nodes``, ``command``, ``env_names`` — names only, values are never stored —,
``request``, ``failure``, ``tags`` and ``stalls`` are JSON in the table and plain
values in the record; ``submitted_by`` and ``cancelled_by`` are token names, None
without tokens).
Ids are 20 hex digits: creation time in milliseconds (kept strictly increasing), then
random bits, so they sort by creation; ``seq`` gives the exact order.  A database from an older
version gets the columns of ``ADDED_COLUMNS`` when it is opened.

One connection is shared by all threads behind a lock.  Every write commits
at once; with ``synchronous=FULL`` a commit (a state transition) is on disk
when ``create``/``update`` returns.  Log appends are plain writes: they
survive a killed daemon (the page cache keeps them), and the follower
resumes from ``log_size()`` after a restart.

Webhooks: table ``outbox`` holds the events still to deliver (``OutboxRecord``, declared
like ``JobRecord``), one row per (event id, hook).  ``watch(columns, events)`` makes every
``update`` that writes one of `columns` call ``events(old record, new record)`` inside the
same transaction and insert the rows it returns: the state change and its events are
committed together or not at all, so a write the disk refuses (retried by the job) loses
no event, and a state written again (a retry, a restart) adds none (``INSERT OR IGNORE``
on the event id).  Delivered and given-up rows are deleted (webhooks.py).

Retention: ``prune()`` removes finished jobs (record, log and rank logs), oldest first,
once they are older than ``state.keep_days`` or while the logs together (rank logs
counted) take more than ``state.max_bytes``; pending and running jobs are never
touched, and a job that finished in the last ``KEEP_RECENT_S`` stays so a client can
still read its end.
"""

import dataclasses
import errno
import functools
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from mlbench_daemon.shapes import NodeRow
from mlbench_daemon.vocabulary import FINAL_STATES, JobState, RunState, StoreReason

KEEP_RECENT_S = 600.0  # prune() never removes a job that finished less than this ago

STATES = tuple(JobState)
Ids = list[str]
LOG_CHUNK_MAX = 1 << 20  # the most bytes of a log read at once (and per /logs answer)
__all__ = [
    "COLUMNS", "FINAL_STATES", "LOG_CHUNK_MAX", "STATES", "JobRecord", "OutboxRecord", "RunRecord",
    "Store", "StoreError",
]  # fmt: skip

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_SQLITE_FULL, _SQLITE_READONLY = 13, 8  # primary result codes (low byte of the extended one)


def store_reason(exc: BaseException) -> StoreReason:
    """Why a write to the state dir failed: disk full, read-only, or another write error."""
    if isinstance(exc, OSError):
        if exc.errno in _FULL_ERRNOS:
            return StoreReason.DISK_FULL
        if exc.errno in _READ_ONLY_ERRNOS:
            return StoreReason.READ_ONLY
    elif isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        text = str(exc).lower()
        if code == _SQLITE_FULL or "disk is full" in text:
            return StoreReason.DISK_FULL
        if code == _SQLITE_READONLY or "readonly" in text or "read-only" in text:
            return StoreReason.READ_ONLY
    return StoreReason.WRITE_FAILED


def fs_fault(path: str) -> StoreReason | None:
    """Whether the filesystem of `path` (or of its nearest existing parent) is read-only
    or full; None if neither (or unknown)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return StoreReason.READ_ONLY
    if st.f_bavail == 0:
        return StoreReason.DISK_FULL
    return None


def fs_fault_message(path: str) -> str | None:
    """One line saying that the file system of `path` is read-only or full; None if
    neither (SQLite may fail to open a WAL database there before any write says why)."""
    fault = fs_fault(path)
    if fault is None:
        return None
    what = "read-only" if fault == StoreReason.READ_ONLY else "full"
    return f"cannot write {path}: the file system is {what} ({fault})"


class StoreError(Exception):
    """A write to the state dir failed: the `path` written, the `reason`, the `cause` (one line)."""

    def __init__(self, path: str, exc: BaseException) -> None:
        self.path = path
        self.reason = store_reason(exc)
        self.cause = (getattr(exc, "strerror", None) or str(exc)).splitlines()[0]
        super().__init__(f"cannot write {path}: {self.cause} ({self.reason})")


def column(sql: str, *, json: bool = False, added: bool = False) -> Any:
    """A field of a record (`JobRecord`, `RunRecord`, `OutboxRecord`) stored in a column of
    `sql` (its SQLite declaration); `json`: stored as JSON text; `added`: after the first
    release, so added to older databases."""
    return dataclasses.field(metadata={"sql": sql, "json": json, "added": added})


# The three records' machinery, once: their fields -> the table, the settable and JSON
# columns, and the conversions between a record's values and a row's.


@functools.cache
def _columns(record: type) -> tuple[dataclasses.Field[Any], ...]:
    """`record`'s column fields, in order: the first is the key."""
    return tuple(f for f in dataclasses.fields(record) if "sql" in f.metadata)


def _table(name: str, record: type, *constraints: str) -> str:
    """The CREATE TABLE statement of `record`'s columns (then `constraints`)."""
    lines = [f"    {f.name} {f.metadata['sql']}" for f in _columns(record)]
    lines += [f"    {c}" for c in constraints]
    return f"CREATE TABLE IF NOT EXISTS {name} (\n" + ",\n".join(lines) + "\n)\n"


@functools.cache
def _json(record: type) -> frozenset[str]:
    return frozenset(f.name for f in _columns(record) if f.metadata["json"])


def _values(record: type, row: sqlite3.Row) -> dict[str, Any]:
    """A row's columns as `record`'s values (JSON columns decoded)."""
    json_columns = _json(record)
    return {
        f.name: json.loads(row[f.name]) if f.name in json_columns else row[f.name]
        for f in _columns(record)
    }


def _to_row(record: type, what: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Columns of `record` to write -> their SQLite values (ValueError for a column that
    is not settable: the key, or not a column); `what` names the record in the message."""
    columns = _columns(record)
    unknown = set(fields) - {f.name for f in columns[1:]}  # the key is never set
    if unknown:
        raise ValueError(f"not a settable {what} column: {', '.join(sorted(unknown))}")
    json_columns = _json(record)
    return {k: json.dumps(v) if k in json_columns else v for k, v in fields.items()}


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One stored job, its columns declared once: the table (`SCHEMA`, `ADDED_COLUMNS`),
    reads (`from_row`), writes (`to_row`) and the job answer (``jobs.manager.to_json``)
    all come from these fields.  JSON columns are plain values here; `log_bytes` is not
    a column but the size of the job's log file when the record was read."""

    seq: int = column("INTEGER PRIMARY KEY AUTOINCREMENT")
    id: str = column("TEXT UNIQUE NOT NULL")
    state: JobState = column("TEXT NOT NULL")
    created: float = column("REAL NOT NULL")
    started: float | None = column("REAL")
    finished: float | None = column("REAL")
    master_name: str | None = column("TEXT")
    master_ip: str | None = column("TEXT")
    master_port: int | None = column("INTEGER")
    nodes: list[NodeRow] = column("TEXT NOT NULL DEFAULT '[]'", json=True)
    command: list[str] = column("TEXT NOT NULL DEFAULT '[]'", json=True)
    np: int | None = column("INTEGER")
    timeout_s: float | None = column("REAL")
    env_names: list[str] = column("TEXT NOT NULL DEFAULT '[]'", json=True)
    remote_dir: str | None = column("TEXT")
    pid: int | None = column("INTEGER")
    exit_code: int | None = column("INTEGER")
    error: str | None = column("TEXT")
    reason: str | None = column("TEXT")
    # what a queued job needs to be launched after a restart: program, np, master, nodes
    request: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", json=True, added=True)
    flavour: str | None = column("TEXT", added=True)
    failure: dict[str, Any] | None = column("TEXT NOT NULL DEFAULT 'null'", json=True, added=True)
    # who did what: token names (None without tokens), the cancel's time, the job's name, tags
    submitted_by: str | None = column("TEXT", added=True)
    cancelled_by: str | None = column("TEXT", added=True)
    cancelled_at: float | None = column("REAL", added=True)
    name: str | None = column("TEXT", added=True)
    tags: list[str] = column("TEXT NOT NULL DEFAULT '[]'", json=True, added=True)
    # jobs/stall.py: the job's stall episodes, the newest roll-call whole
    stalls: list[dict[str, Any]] = column("TEXT NOT NULL DEFAULT '[]'", json=True, added=True)
    # the MLBench run this job is the launch of (runs table), or None
    run_id: int | None = column("INTEGER", added=True)
    log_bytes: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row, log_bytes: int) -> "JobRecord":
        values = _values(cls, row)
        values["nodes"] = [NodeRow(*n) for n in values["nodes"]]
        values["state"] = JobState(values["state"])
        return cls(**values, log_bytes=log_bytes)

    @classmethod
    def to_row(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Columns to write -> their SQLite values (ValueError for what is not settable)."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"bad state {fields['state']!r}")
        return _to_row(cls, "job", fields)

    def overlaid(self, fields: dict[str, Any]) -> "JobRecord":
        """This record with `fields` (columns not written yet) laid over it."""
        if not fields:
            return self
        fields = {k: [NodeRow(*n) for n in v] if k == "nodes" else v for k, v in fields.items()}
        return dataclasses.replace(self, **fields)


COLUMNS = tuple(f.name for f in _columns(JobRecord))
# Columns added after the first release: (name, declaration), added to older databases.
ADDED_COLUMNS = tuple(
    (f.name, f.metadata["sql"]) for f in _columns(JobRecord) if f.metadata["added"]
)
Records = list[JobRecord]
SCHEMA = _table("jobs", JobRecord)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One MLBench run (``jobs/runs.py``), its columns declared once as `JobRecord`'s are.
    The id is MLBench's integer pk; `spec` is the checked request (``runspec.RunSpec``),
    `nodes` the names of the nodes it holds (empty while it waits), `notes` what the
    launch said (``job_metadata.notes``)."""

    id: int = column("INTEGER PRIMARY KEY AUTOINCREMENT")
    name: str = column("TEXT NOT NULL")
    state: RunState = column("TEXT NOT NULL")
    created_at: float = column("REAL NOT NULL")
    finished_at: float | None = column("REAL")
    job_id: str | None = column("TEXT")
    num_workers: int = column("INTEGER NOT NULL")
    spec: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", json=True)
    nodes: list[str] = column("TEXT NOT NULL DEFAULT '[]'", json=True)
    notes: list[str] = column("TEXT NOT NULL DEFAULT '[]'", json=True)
    submitted_by: str | None = column("TEXT")

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "RunRecord":
        values = _values(cls, row)
        values["state"] = RunState(values["state"])
        return cls(**values)

    @classmethod
    def to_row(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return _to_row(cls, "run", fields)


RunRecords = list[RunRecord]
RUN_SCHEMA = _table("runs", RunRecord)


@dataclasses.dataclass(frozen=True)
class OutboxRecord:
    """One event to deliver to one hook (webhooks.py): the body is kept as first made, so
    every attempt sends the same bytes under the same event id."""

    seq: int = column("INTEGER PRIMARY KEY AUTOINCREMENT")
    event_id: str = column("TEXT NOT NULL")  # the idempotency key (the same for every hook)
    hook: str = column("TEXT NOT NULL")  # the hook's name
    event: str = column("TEXT NOT NULL")  # e.g. job.failed
    job_id: str = column("TEXT NOT NULL")  # the job, or run-<id> for a run's events
    created: float = column("REAL NOT NULL")  # when it happened (wall time): max_age_s counts
    body: bytes = column("BLOB NOT NULL")  # the JSON sent
    attempts: int = column("INTEGER NOT NULL DEFAULT 0")  # attempts begun so far
    next_at: float = column("REAL NOT NULL")  # wall time of the next attempt
    last_error: str | None = column("TEXT")


Events = Callable[[JobRecord, JobRecord], Sequence[OutboxRecord]]
RunEvents = Callable[[RunRecord, RunRecord | None, JobRecord | None], Sequence[OutboxRecord]]
_OUTBOX = tuple(f.name for f in _columns(OutboxRecord))
OUTBOX_SCHEMA = (
    _table("outbox", OutboxRecord, "UNIQUE (event_id, hook)"),
    "CREATE INDEX IF NOT EXISTS outbox_order ON outbox (hook, job_id, seq)",
)


class Store:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.logs = os.path.join(state_dir, "logs")
        self.db_path = os.path.join(state_dir, "jobs.sqlite3")
        os.makedirs(self.logs, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._run_cache: dict[int, RunRecord] = {}  # get_run's: its readers take no lock
        self._last_ms = 0
        self.fault: StoreError | None = None  # the last write's failure; None once one succeeds
        self._db = sqlite3.connect(
            self.db_path,
            check_same_thread=False,
            isolation_level=None,
            timeout=10,
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._db.execute(RUN_SCHEMA)
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        for sql in OUTBOX_SCHEMA:
            self._db.execute(sql)
        self._watched: frozenset[str] = frozenset()
        self._events: Events | None = None
        self._run_events: RunEvents | None = None
        self.on_outbox: Callable[[], None] | None = None  # called after rows are added

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def probe_write(self) -> None:
        """Write to the database and to the logs dir once; StoreError if either fails.

        The database: ``user_version`` set to its own value, a committed write of the
        header page that changes nothing.  The logs dir: a small file written, synced
        and removed.  SQLite opens a database it cannot write read-only without a word,
        so only a write shows a read-only filesystem or file."""
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            self._write(f"PRAGMA user_version = {int(version)}", ())
        probe = os.path.join(self.logs, f".write-probe-{os.getpid()}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            self.fault = StoreError(self.logs, e)
            raise self.fault from None
        self.fault = None

    def _write(self, sql: str, params: Any) -> None:
        """One committed write (the caller holds the lock); records or clears ``fault``.

        A failed write raises StoreError naming the database, the cause and the reason."""
        try:
            self._db.execute(sql, params)
        except sqlite3.Error as e:
            self.fault = StoreError(self.db_path, e)
            raise self.fault from None
        if self.fault and self.fault.path != self.logs:
            self.fault = None

    # --- records

    def create(self, **fields: Any) -> JobRecord:
        """Insert a new job (state pending unless given); returns the record."""
        row = JobRecord.to_row({"state": JobState.PENDING, "created": time.time(), **fields})
        with self._lock:
            if "id" not in fields:
                self._last_ms = max(
                    int(time.time() * 1000), self._last_ms + 1
                )  # strictly increasing
                row["id"] = f"{self._last_ms:012x}{secrets.token_hex(4)}"
            self._write(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return self.record(row["id"])

    def watch(self, columns: frozenset[str], events: Events) -> None:
        """Every later update writing one of `columns` calls `events(old, new)` in its
        transaction (with the store's lock held: it must not call the store) and adds
        the outbox rows it returns, committed with the change."""
        self._watched, self._events = columns, events

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Change some columns of one job; returns the record (KeyError if unknown).  With
        `watch`ed columns among them, the events they make are committed with them."""
        row = JobRecord.to_row(fields)
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?"
        added = 0
        if row:
            with self._lock:
                if self._events is None or not self._watched & row.keys():
                    self._write(sql, [*row.values(), job_id])
                else:
                    added = self._update_with_events(job_id, sql, [*row.values(), job_id])
        if added and self.on_outbox is not None:
            self.on_outbox()
        return self.record(job_id)

    def _update_with_events(self, job_id: str, sql: str, params: list[Any]) -> int:
        """One transaction: the update and the outbox rows of the events it makes ->
        how many rows were new (the caller holds the lock)."""
        select = "SELECT * FROM jobs WHERE id = ?"
        events = self._events
        assert events is not None

        def change() -> Sequence[OutboxRecord]:
            old = self._db.execute(select, (job_id,)).fetchone()
            self._db.execute(sql, params)
            new = self._db.execute(select, (job_id,)).fetchone()
            return events(self._decode(old), self._decode(new)) if old and new else []

        return self._with_events(change)

    def _run_change_with_events(self, run_id: int, sql: str, params: Sequence[Any]) -> int:
        """One transaction: a run's state write or delete and the outbox rows of the events
        it makes -> how many rows were new (the caller holds the lock)."""
        events = self._run_events
        assert events is not None

        def change() -> Sequence[OutboxRecord]:
            select = "SELECT * FROM runs WHERE id = ?"
            old = self._db.execute(select, (run_id,)).fetchone()
            self._db.execute(sql, params)
            if old is None:
                return []
            new = self._db.execute(select, (run_id,)).fetchone()
            job = None
            if old["job_id"]:
                row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (old["job_id"],))
                job = row.fetchone()
            return events(
                RunRecord.from_row(old),
                RunRecord.from_row(new) if new else None,
                self._decode(job) if job else None,
            )

        return self._with_events(change)

    def _with_events(self, change: Callable[[], Sequence[OutboxRecord]]) -> int:
        """One transaction: `change()` (which writes, and returns the outbox rows of the
        events that makes) and those rows -> how many rows were new (the caller holds the
        lock)."""
        marks = ", ".join("?" * len(_OUTBOX[1:]))
        insert = f"INSERT OR IGNORE INTO outbox ({', '.join(_OUTBOX[1:])}) VALUES ({marks})"
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = change()
                before = self._db.total_changes
                self._db.executemany(
                    insert, [dataclasses.astuple(r)[1:] for r in rows]
                )  # fmt: skip
                added = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self.fault = StoreError(self.db_path, e)
            raise self.fault from None
        if self.fault and self.fault.path != self.logs:
            self.fault = None
        return added

    # --- the webhooks' outbox (webhooks.py delivers)

    def outbox_due(self, now: float, limit: int) -> list[OutboxRecord]:
        """Rows due at `now`, oldest first, each the oldest of its (hook, job): a job's
        events reach a hook in the order they happened."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox o WHERE next_at <= ? AND NOT EXISTS (SELECT 1 FROM "
                "outbox p WHERE p.hook = o.hook AND p.job_id = o.job_id AND p.seq < o.seq) "
                "ORDER BY seq LIMIT ?",
                (now, int(limit)),
            ).fetchall()
        return [OutboxRecord(**_values(OutboxRecord, r)) for r in rows]

    def outbox_next(self) -> float | None:
        """The earliest next attempt of any row (None: the outbox is empty)."""
        with self._lock:
            value = self._db.execute("SELECT MIN(next_at) FROM outbox").fetchone()[0]
        return None if value is None else float(value)

    def outbox_depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def outbox_attempt(self, seq: int, attempts: int) -> None:
        """An attempt is about to be sent: it is counted first, so a POST cut short by a
        crash is sent again after a restart as the next attempt (StoreError if not
        written)."""
        with self._lock:
            self._write("UPDATE outbox SET attempts = ? WHERE seq = ?", (attempts, seq))

    def outbox_retry(self, seq: int, attempts: int, next_at: float, error: str) -> None:
        """An attempt failed: tried again at `next_at` (StoreError if not written)."""
        with self._lock:
            self._write(
                "UPDATE outbox SET attempts = ?, next_at = ?, last_error = ? WHERE seq = ?",
                (attempts, next_at, error, seq),
            )

    def outbox_remove(self, seq: int) -> None:
        """Delivered or given up (StoreError if not written)."""
        with self._lock:
            self._write("DELETE FROM outbox WHERE seq = ?", (seq,))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._decode(row) if row else None

    def record(self, job_id: str) -> JobRecord:
        """The record of a job that exists (KeyError if it does not)."""
        rec = self.get(job_id)
        if rec is None:
            raise KeyError(f"no job {job_id!r}")
        return rec

    def list(
        self,
        limit: int = 50,
        offset: int = 0,
        *,
        states: tuple[str, ...] = (),
        submitted_by: str | None = None,
        name: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> Records:
        """Newest first; only jobs in one of *states* (if any), of *submitted_by*, named
        *name*, and carrying every tag of *tags*."""
        where: list[str] = []
        params: list[object] = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += states
        for col, value in (("submitted_by", submitted_by), ("name", name)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        for tag in tags:
            where.append("EXISTS (SELECT 1 FROM json_each(jobs.tags) WHERE value = ?)")
            params.append(tag)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._lock:
            rows = self._db.execute(
                sql + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*params, int(limit), int(offset))
            ).fetchall()
        return [self._decode(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """{state: number of jobs} over the whole history."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def running(self) -> Records:
        """Jobs not yet final (pending or running), oldest first: what a restart re-attaches."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY seq",
                (JobState.PENDING, JobState.RUNNING),
            ).fetchall()
        return [self._decode(r) for r in rows]

    def _decode(self, row: sqlite3.Row) -> JobRecord:
        return JobRecord.from_row(row, self.log_size(row["id"]))

    def prune(self, keep_days: float, max_bytes: int, now: float | None = None) -> Ids:
        """Remove finished jobs, oldest end first: those that finished more than
        ``keep_days`` ago, then more until all logs together take at most ``max_bytes``
        (0 turns either rule off).  Returns the ids removed."""
        now = time.time() if now is None else now
        cutoff = now - keep_days * 86400 if keep_days else None
        marks = ", ".join("?" * len(FINAL_STATES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, finished FROM jobs WHERE state IN ({marks}) AND finished < ? "
                "ORDER BY finished, seq",
                (*FINAL_STATES, now - KEEP_RECENT_S),
            ).fetchall()
        total = self._logs_bytes() if max_bytes else 0
        doomed: Ids = []
        for job_id, finished in rows:
            too_old = cutoff is not None and finished < cutoff
            if not (too_old or (max_bytes and total > max_bytes)):
                break
            doomed.append(job_id)
            total -= self.log_size(job_id) + self._logs_bytes(self.rank_dir(job_id))
        if doomed:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in doomed])
                self._db.execute("COMMIT")
            for job_id in doomed:
                try:
                    os.unlink(self.log_path(job_id))
                except FileNotFoundError:
                    pass
                shutil.rmtree(self.rank_dir(job_id), ignore_errors=True)
        return doomed

    def _logs_bytes(self, path: str | None = None) -> int:
        """Bytes of the files under `path` (the logs dir), rank logs' dirs included."""
        total = 0
        try:
            with os.scandir(path or self.logs) as entries:
                for e in entries:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            total += self._logs_bytes(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        return total

    # --- MLBench runs (jobs/runs.py): their own table in the same database

    def create_run(self, **fields: Any) -> RunRecord:
        """Insert a new run (the id is the next integer); returns the record."""
        row = RunRecord.to_row({"created_at": time.time(), **fields})
        with self._lock:
            self._write(
                f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            run_id = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
        return self.run(int(run_id))

    def watch_runs(self, events: RunEvents) -> None:
        """Every later write of a run's state, and every delete of a run, calls
        `events(old, new or None if deleted, the run's job record or None)` in its
        transaction (the store's lock held: it must not call the store) and adds the
        outbox rows it returns, committed with the change."""
        self._run_events = events

    def update_run(self, run_id: int, **fields: Any) -> RunRecord:
        row = RunRecord.to_row(fields)
        sql = f"UPDATE runs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?"
        added = self._run_write(run_id, sql, [*row.values(), run_id], "state" in row) if row else 0
        if added and self.on_outbox is not None:
            self.on_outbox()
        return self.run(run_id)

    def _run_write(self, run_id: int, sql: str, params: Sequence[Any], watched: bool) -> int:
        """One committed write of a run -> the outbox rows it added (its events, when
        `watched` and runs are watched)."""
        with self._lock:
            try:
                if self._run_events is None or not watched:
                    self._write(sql, params)
                    return 0
                return self._run_change_with_events(run_id, sql, params)
            finally:  # written or not (a fault may leave it unknown): read it again
                self._run_cache.pop(run_id, None)

    def get_run(self, run_id: int) -> RunRecord | None:
        """The run's record; from memory once read (every write of runs passes through
        _run_write, under the lock, and drops it), as each metric POST asks for it."""
        rec = self._run_cache.get(run_id)
        if rec is not None:
            return rec
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            rec = RunRecord.from_row(row) if row else None
            if rec is not None:
                self._run_cache[run_id] = rec
        return rec

    def run(self, run_id: int) -> RunRecord:
        """The record of a run that exists (KeyError if it does not)."""
        rec = self.get_run(run_id)
        if rec is None:
            raise KeyError(f"no run {run_id!r}")
        return rec

    def runs(self, states: tuple[RunState, ...] = ()) -> RunRecords:
        """Runs in order of creation; only those in *states*, if given."""
        sql, params = "SELECT * FROM runs", list(states)
        if states:
            sql += f" WHERE state IN ({', '.join('?' * len(states))})"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", params).fetchall()
        return [RunRecord.from_row(r) for r in rows]

    def delete_run(self, run_id: int) -> None:
        """Delete the run's row; a run not yet ended makes its `run.cancelled` event here."""
        if self._run_write(run_id, "DELETE FROM runs WHERE id = ?", (run_id,), True):
            if self.on_outbox is not None:
                self.on_outbox()

    # --- logs

    def log_path(self, job_id: str) -> str:
        if not job_id.isalnum():  # ids are hex; never let one name another path
            raise ValueError(f"bad job id {job_id!r}")
        return os.path.join(self.logs, f"{job_id}.log")

    def log_writer(self, job_id: str) -> BinaryIO:
        """The job's log opened for appending, unbuffered (readers see every write)."""
        return open(self.log_path(job_id), "ab", buffering=0)

    def sync_log(self, job_id: str) -> None:
        """fsync the log (called once when the job reaches a final state)."""
        try:
            fd = os.open(self.log_path(job_id), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def log_size(self, job_id: str, rank: int | None = None) -> int:
        """The log's size; of one rank's log with `rank`."""
        path = self.log_path(job_id) if rank is None else self.rank_log_path(job_id, rank)
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            return 0

    def read_log(
        self, job_id: str, offset: int, limit: int, rank: int | None = None
    ) -> tuple[bytes, int]:
        """Up to ``limit`` bytes from ``offset`` -> (data, next_offset); of one rank's
        log with `rank`."""
        path = self.log_path(job_id) if rank is None else self.rank_log_path(job_id, rank)
        try:
            with open(path, "rb") as f:
                if offset >= os.fstat(f.fileno()).st_size:
                    return b"", offset
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            data = b""
        return data, offset + len(data)

    # --- rank logs (a job with rank_output; jobs/ranklog.py keeps them)

    def rank_dir(self, job_id: str) -> str:
        return self.log_path(job_id).removesuffix(".log") + ".ranks"

    def rank_log_path(self, job_id: str, rank: int) -> str:
        return os.path.join(self.rank_dir(job_id), f"{int(rank)}.log")

    def rank_checkpoint_path(self, job_id: str) -> str:
        return os.path.join(self.rank_dir(job_id), "split")

    def rank_log_sizes(self, job_id: str) -> dict[int, int]:
        """{rank: size of its log} for the rank logs there are."""
        sizes = {}
        try:
            with os.scandir(self.rank_dir(job_id)) as entries:
                for e in entries:
                    rank = e.name.removesuffix(".log")
                    if e.name.endswith(".log") and rank.isdigit():
                        sizes[int(rank)] = e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
        return sizes
