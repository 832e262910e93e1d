"""The audit log: one append-only JSON-lines file of every write and every refused request.

One line per request, written before its answer is sent::

    {"time": "2026-12-05T06:40:01.123Z", "token": "alice", "role": "submitter",
     "source": "10.0.0.7", "method": "DELETE", "path": "/api/mpi_jobs/<job_id>",
     "job": "0193a4f2c1d07e5a9b3c", "outcome": "not-owner", "status": 403, "owner": "bob"}

``token`` is the token's name, never the token; ``path`` is the route's pattern, never
the path as sent (a future capability URL or a query string cannot end up here);
``outcome`` is ``ok``, a ``Refusal`` or the error code of the answer.

Each line is one ``write()`` to a file opened ``O_APPEND``, so a killed daemon leaves
whole lines (the page cache keeps them).  A thread syncs the file every ``SYNC_EVERY_S``
when something was written (``sync`` is injectable: a test counts the calls), so a
power loss costs at most the last second; a line cut by one is removed when the file is
opened again, so every line of the file parses.  The file is mode 0640: the daemon's
group may read it, nobody else.  ``rotate`` (called by the retention pass) starts a new
file once this one is a day old or ``ROTATE_BYTES`` long, and removes rotated files older
than ``state.keep_days``.

``record`` is the one point where the API's decisions pass; a later consumer of them
(webhooks) can be added there.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from mlbench_daemon.timefmt import iso

log = logging.getLogger(__name__)

SYNC_EVERY_S = 0.5  # longest time a written line waits for its fsync
ROTATE_BYTES = 64 << 20
ROTATE_AGE_S = 86400.0
MODE = 0o640


class AuditLog:
    def __init__(
        self,
        path: str,
        *,
        sync: Callable[[int], None] = os.fsync,
        every_s: float = SYNC_EVERY_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path, self._sync, self._every, self._now = path, sync, every_s, now
        self._lock = threading.Lock()
        self._dirty = False
        self._failing = False
        self._fd = self._open()
        self._started = self._first_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._syncer, name="audit-sync", daemon=True)
        self._thread.start()

    def _open(self) -> int:
        """The file for appending, mode 0640, with a line cut by a crash removed."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, MODE)
        os.fchmod(fd, MODE)  # whatever the umask or an older file said
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
            keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
            os.ftruncate(fd, keep)
            log.warning("audit: removed a line cut short at the end of %s", self.path)
        return fd

    def _first_time(self) -> float:
        """When the current file was started (its first line; now for an empty file)."""
        try:
            with open(self.path, "rb") as f:
                first = json.loads(f.readline())
            return datetime.datetime.fromisoformat(first["time"]).timestamp()
        except (ValueError, KeyError, TypeError, OSError):
            return self._now()

    def record(self, **fields: Any) -> None:
        """Append one line: the time, then *fields* as given."""
        line = json.dumps({"time": iso(self._now()), **fields}, separators=(", ", ": "))
        data = (line + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, data)
            except OSError as e:
                if not self._failing:
                    log.error("audit: cannot write %s: %s", self.path, e.strerror or e)
                self._failing = True
                return
            if self._failing:
                log.warning("audit: %s can be written again", self.path)
            self._failing = False
            self._dirty = True

    def flush(self) -> None:
        """Sync what was written (the syncer's step; also at close).  The sync runs on a
        duplicate of the descriptor, outside the lock: a slow disk never holds up a
        request's line."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            fd = os.dup(self._fd)
        try:
            self._sync(fd)
        except OSError as e:
            log.error("audit: cannot sync %s: %s", self.path, e.strerror or e)
            with self._lock:
                self._dirty = True
        finally:
            os.close(fd)

    def _syncer(self) -> None:
        while not self._stop.wait(self._every):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.flush()
        with self._lock:
            os.close(self._fd)

    def rotate(self, keep_days: float) -> None:
        """Start a new file when this one is a day old or ROTATE_BYTES long; remove
        rotated files older than *keep_days* (0: keep them)."""
        now = self._now()
        with self._lock:
            size = os.fstat(self._fd).st_size
            if size and (size >= ROTATE_BYTES or now - self._started >= ROTATE_AGE_S):
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
                if self._dirty:
                    self._sync(self._fd)  # the old file's last lines, before it is closed
                    self._dirty = False
                os.rename(self.path, f"{self.path}.{stamp}")
                os.close(self._fd)
                self._fd = self._open()
                self._started = now
        if not keep_days:
            return
        folder, base = os.path.split(os.path.abspath(self.path))
        for name in os.listdir(folder):
            if not name.startswith(base + "."):
                continue
            old = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(old).st_mtime < now - keep_days * 86400:
                    os.unlink(old)
                    log.info("audit: removed %s (older than state.keep_days)", name)
