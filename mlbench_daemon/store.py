"""Job records (SQLite) and one append-only log file per job under state.dir.

Layout::

    <state_dir>/jobs.sqlite3      table ``jobs`` (WAL, synchronous=FULL)
    <state_dir>/logs/<id>.log     the job's output, bytes exactly as produced
    <state_dir>/logs/<id>.ranks/  a job with rank_output: <rank>.log per rank and the
                                  split's checkpoint (jobs/ranklog.py writes them)

A record is a dict with the columns of ``COLUMNS`` and ``log_bytes`` (the size of
the job's log file when the record was read); ``nodes`` (list of
``[ip, namespace, name, labels]``), ``command`` (argv list), ``env_names``
(list of names; values are never stored) and ``request`` (what a queued job
needs to be launched after a restart: program, np, master, node names) and
``failure`` (the cause of a job that did not succeed, or None) are JSON in the
table and plain values here.  Ids are 20 hex digits: creation
time in milliseconds (kept strictly increasing), then random bits, so they
sort by creation; ``seq`` gives the exact order.  A database from an older
version gets the columns of ``ADDED_COLUMNS`` when it is opened.

One connection is shared by all threads behind a lock.  Every write commits
at once; with ``synchronous=FULL`` a commit (a state transition) is on disk
when ``create``/``update`` returns.  Log appends are plain writes: they
survive a killed daemon (the page cache keeps them), and the follower
resumes from ``log_size()`` after a restart.

Retention: ``prune()`` removes finished jobs (record, log and rank logs), oldest first,
once they are older than ``state.keep_days`` or while the logs together (rank logs
counted) take more than ``state.max_bytes``; pending and running jobs are never
touched, and a job that finished in the last ``KEEP_RECENT_S`` stays so a client can
still read its end.
"""

import errno
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from typing import Any, BinaryIO

from mlbench_daemon.vocabulary import FINAL_STATES, JobState, StoreReason

KEEP_RECENT_S = 600.0  # prune() never removes a job that finished less than this ago

STATES = tuple(JobState)
Record = dict[str, Any]  # one job: the columns of COLUMNS, JSON columns decoded
Records = list[Record]
Ids = list[str]
LOG_CHUNK_MAX = 1 << 20  # the most bytes of a log read at once (and per /logs answer)
__all__ = ["COLUMNS", "FINAL_STATES", "LOG_CHUNK_MAX", "STATES", "Store", "StoreError"]

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


class StoreError(Exception):
    """A write to the state dir failed: the `path` written, the `reason`, the `cause` (one line)."""

    def __init__(self, path: str, exc: BaseException) -> None:
        self.path = path
        self.reason = store_reason(exc)
        self.cause = (getattr(exc, "strerror", None) or str(exc)).splitlines()[0]
        super().__init__(f"cannot write {path}: {self.cause} ({self.reason})")


COLUMNS = (
    "id",
    "seq",
    "state",
    "created",
    "started",
    "finished",
    "master_name",
    "master_ip",
    "master_port",
    "nodes",
    "command",
    "np",
    "timeout_s",
    "env_names",
    "remote_dir",
    "pid",
    "exit_code",
    "error",
    "reason",
    "request",
    "flavour",
    "failure",
)
JSON_COLUMNS = ("nodes", "command", "env_names", "request", "failure")
# Columns added after the first release: (name, declaration), added to older databases.
ADDED_COLUMNS = (
    ("request", "TEXT NOT NULL DEFAULT '{}'"),
    ("flavour", "TEXT"),
    ("failure", "TEXT NOT NULL DEFAULT 'null'"),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    master_name TEXT,
    master_ip TEXT,
    master_port INTEGER,
    nodes TEXT NOT NULL DEFAULT '[]',
    command TEXT NOT NULL DEFAULT '[]',
    np INTEGER,
    timeout_s REAL,
    env_names TEXT NOT NULL DEFAULT '[]',
    remote_dir TEXT,
    pid INTEGER,
    exit_code INTEGER,
    error TEXT,
    reason TEXT,
    request TEXT NOT NULL DEFAULT '{}',
    flavour TEXT,
    failure TEXT NOT NULL DEFAULT 'null'
)
"""


class Store:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.logs = os.path.join(state_dir, "logs")
        self.db_path = os.path.join(state_dir, "jobs.sqlite3")
        os.makedirs(self.logs, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
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
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

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

    def create(self, **fields: Any) -> Record:
        """Insert a new job (state pending unless given); returns the record."""
        fields = {"state": JobState.PENDING, "created": time.time(), **fields}
        self._check(fields)
        with self._lock:
            if "id" not in fields:
                self._last_ms = max(
                    int(time.time() * 1000), self._last_ms + 1
                )  # strictly increasing
                fields["id"] = f"{self._last_ms:012x}{secrets.token_hex(4)}"
            names = list(fields)
            self._write(
                f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [self._encode(k, fields[k]) for k in names],
            )
        return self.record(fields["id"])

    def update(self, job_id: str, **fields: Any) -> Record:
        """Change some columns of one job; returns the record (KeyError if unknown)."""
        self._check(fields)
        if fields:
            with self._lock:
                self._write(
                    f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                    [self._encode(k, v) for k, v in fields.items()] + [job_id],
                )
        return self.record(job_id)

    def get(self, job_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._decode(row) if row else None

    def record(self, job_id: str) -> Record:
        """The record of a job that exists (KeyError if it does not)."""
        rec = self.get(job_id)
        if rec is None:
            raise KeyError(f"no job {job_id!r}")
        return rec

    def list(self, limit: int = 50, offset: int = 0) -> Records:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (int(limit), int(offset))
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

    @staticmethod
    def _check(fields: dict[str, Any]) -> None:
        unknown = set(fields) - set(COLUMNS) | ({"seq"} & set(fields))
        if unknown:
            raise ValueError(f"not a settable job column: {', '.join(sorted(unknown))}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"bad state {fields['state']!r}")

    @staticmethod
    def _encode(key: str, value: Any) -> Any:
        return json.dumps(value) if key in JSON_COLUMNS else value

    def _decode(self, row: sqlite3.Row) -> Record:
        rec = {k: row[k] for k in COLUMNS}
        for k in JSON_COLUMNS:
            rec[k] = json.loads(rec[k])
        rec["log_bytes"] = self.log_size(rec["id"])  # not a column: the log file's size now
        return rec

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
