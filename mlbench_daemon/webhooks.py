"""Webhook delivery: the store's outbox POSTed to each hook, signed, at least once.

The events are made by the job code (jobs/events.py) and committed with the state change
that makes them (``Store.watch``); this module only delivers.  One dispatcher thread
reads the rows due (each the oldest of its hook and job, so a job's events arrive in
order), and hands each to a pool of ``webhooks.concurrency`` threads, which POST it with
bounded connect and read timeouts (``webhooks.timeout_s``), no redirect followed (a
receiver cannot send the POST on to the daemon or anywhere else) and no proxy.  No lock
is held during a POST; the API and the jobs never wait on a receiver.

A 2xx answer deletes the row.  Anything else is retried after a backoff with full jitter
(a random time up to ``backoff_s * 2**(attempt-1)``, at most ``backoff_max_s``), until
the event is ``max_age_s`` old: then it is given up, with one log line and the counter.
Rows live in the store, so pending deliveries resume after a restart (or a ``kill -9``:
a POST that was in flight is sent again, with the same event id and body).  Each
attempt is counted in the store before it is sent, so that resend carries the next
attempt number.

When the state dir cannot be written (read-only, full), deliveries go on: an attempt's
outcome that cannot be written is kept here and written once the disk takes writes; a
delivered row is not sent again meanwhile.  A restart before then sends it again (the
receiver deduplicates by the event id).

Each POST carries::

    Content-Type: application/json
    X-Mlbench-Event: job.failed
    X-Mlbench-Event-Id: <id, the same on every attempt and for every hook>
    X-Mlbench-Attempt: <1, 2, ...>
    X-Mlbench-Timestamp: <unix seconds when this attempt was sent>
    X-Mlbench-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.client
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlbench_daemon import config, metrics
from mlbench_daemon.store import OutboxRecord, Store, StoreError
from mlbench_daemon.tokens import check_mode
from mlbench_daemon.vocabulary import Delivery

log = logging.getLogger(__name__)

ANSWER_MAX = 65536  # bytes of a receiver's answer read (and dropped)
IDLE_WAIT_S = 5.0  # the dispatcher looks at the outbox at least this often


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str
    url: str
    secret: bytes


def read_secret(path: str) -> bytes:
    """The secret in file `path`: owner-only mode, one non-empty line; ValueError (one
    line naming the file) otherwise."""
    try:
        with open(path, "rb") as f:
            check_mode(path, os.fstat(f.fileno()))
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if not secret or b"\n" in secret:
        raise ValueError(f"{path} must hold one non-empty line")
    return secret


def load(settings: config.Webhooks) -> list[Hook]:
    """The configured hooks with their secrets; ValueError naming the hook otherwise."""
    hooks = []
    for i, h in enumerate(settings.hooks):
        try:
            hooks.append(Hook(h["name"], h["url"], read_secret(h["secret_file"])))
        except ValueError as e:
            raise ValueError(f"webhooks.hooks[{i}].secret_file: {e}") from None
    return hooks


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Mlbench-Signature value: HMAC-SHA256 over ``timestamp + "." + body``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds before the next attempt after `attempt` failed ones: full jitter."""
    return rand() * min(cap, base * 2.0 ** min(attempt - 1, 60))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is a failed attempt, never followed


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


class Deliveries:
    """The outbox's dispatcher and its bounded pool of senders."""

    def __init__(
        self,
        store: Store,
        settings: config.Webhooks,
        hooks: Sequence[Hook],
        *,
        now: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
    ) -> None:
        """`now` (wall time), `rand` and `wait` (``wait(event, seconds)``: whether it is
        set) are the time, jitter and pause of the backoff: tests pass their own, so an
        outage and its retries pass without waiting them out."""
        self.store, self.settings, self._now, self._rand = store, settings, now, rand
        self._wait = wait
        self.hooks: Mapping[str, Hook] = {h.name: h for h in hooks}
        self._opener = _opener()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: set[int] = set()
        # outcomes the store could not take yet: seq -> (attempts, next_at, error), or
        # None for a row delivered (or given up) but not yet deleted
        self._unwritten: dict[int, tuple[int, float, str] | None] = {}
        self._failing: set[str] = set()  # hooks whose last attempt failed (one log line each)
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        for hook in self.hooks:
            for outcome in Delivery:
                metrics.webhook_deliveries_total.labels(hook, outcome)

    def start(self) -> None:
        self.store.on_outbox = self._wake.set
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop dispatching; POSTs in flight end within their timeouts (rows stay)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the dispatcher -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._dispatch()
            except Exception:  # a bug, or a store that cannot be read: try again later
                log.exception("webhooks: dispatch failed")
                wait = IDLE_WAIT_S
            self._wait(self._wake, wait)
            self._wake.clear()

    def _dispatch(self) -> float:
        """Send what is due (within the free slots) -> seconds until it is worth looking again."""
        self._write_unwritten()
        now = self._now()
        with self._lock:
            free = self.settings.concurrency - len(self._inflight)
            inflight, unwritten = set(self._inflight), dict(self._unwritten)
        if free <= 0:
            return IDLE_WAIT_S  # a sender ending wakes the dispatcher
        for row in self.store.outbox_due(now, free + len(inflight) + len(unwritten)):
            if row.seq in unwritten:  # its outcome is known here, not yet in the store
                outcome = unwritten[row.seq]
                if outcome is None or outcome[1] > now:
                    continue
                row = dataclasses.replace(row, attempts=outcome[0])
            if row.seq in inflight:
                continue
            if free <= 0:
                break
            hook = self.hooks.get(row.hook)
            if hook is None:
                self._give_up(row, "the hook is no longer configured")
                continue
            with self._lock:
                self._inflight.add(row.seq)
            free -= 1
            self._pool.submit(self._send, row, hook)
        with self._lock:
            later = [u[1] for u in self._unwritten.values() if u is not None]
        soonest = min([*later, self.store.outbox_next() or now + IDLE_WAIT_S])
        if self._unwritten:
            return max(0.5, min(IDLE_WAIT_S, soonest - now))  # the disk: not too often
        return max(0.01, min(IDLE_WAIT_S, soonest - now))

    # --- one attempt --------------------------------------------------------------------

    def _send(self, row: OutboxRecord, hook: Hook) -> None:
        try:
            self._begin(row)
            error = self._post(row, hook, row.attempts + 1)
            if error is None:
                self._delivered(row, hook)
            else:
                self._failed(row, hook, error)
        except Exception:  # a bug must not lose the row: it stays, tried again later
            log.exception("webhooks: %s: delivery of %s failed", hook.name, row.event_id)
        finally:
            with self._lock:
                self._inflight.discard(row.seq)
            self._wake.set()

    def _begin(self, row: OutboxRecord) -> None:
        """Count the attempt in the store before it is sent: after a `kill -9` mid-POST,
        the resend carries the next attempt number (same id, same bytes).  A store that
        cannot take the write does not hold the POST back (a restart before the disk
        recovers then repeats this attempt's number)."""
        try:
            self.store.outbox_attempt(row.seq, row.attempts + 1)
        except StoreError:
            pass

    def _post(self, row: OutboxRecord, hook: Hook, attempt: int) -> str | None:
        """POST the row's body -> None if the receiver took it (2xx), else why not."""
        timestamp = str(int(self._now()))
        request = urllib.request.Request(
            hook.url,
            data=row.body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "mlbench-daemon",
                "X-Mlbench-Event": row.event,
                "X-Mlbench-Event-Id": row.event_id,
                "X-Mlbench-Attempt": str(attempt),
                "X-Mlbench-Timestamp": timestamp,
                "X-Mlbench-Signature": signature(hook.secret, timestamp, row.body),
            },
        )
        try:
            with self._opener.open(request, timeout=self.settings.timeout_s) as answer:
                answer.read(ANSWER_MAX)
                status = answer.status
        except urllib.error.HTTPError as e:
            e.close()
            return f"HTTP {e.code}"
        except urllib.error.URLError as e:
            return str(getattr(e.reason, "strerror", None) or e.reason)
        except (OSError, http.client.HTTPException) as e:
            return f"{type(e).__name__}: {e}".rstrip(": ")
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _delivered(self, row: OutboxRecord, hook: Hook) -> None:
        metrics.webhook_deliveries_total.labels(hook.name, Delivery.DELIVERED).inc()
        with self._lock:
            recovered = hook.name in self._failing
            self._failing.discard(hook.name)
        if recovered:
            log.info("webhooks: %s: delivering again", hook.name)
        self._remove(row.seq)

    def _failed(self, row: OutboxRecord, hook: Hook, error: str) -> None:
        attempts, now = row.attempts + 1, self._now()
        if now - row.created >= self.settings.max_age_s:
            self._give_up(row, f"{attempts} attempt(s), the last: {error}")
            return
        metrics.webhook_deliveries_total.labels(hook.name, Delivery.RETRY).inc()
        with self._lock:
            first = hook.name not in self._failing
            self._failing.add(hook.name)
        if first:
            log.warning("webhooks: %s: %s; retrying with backoff", hook.name, error)
        s = self.settings
        next_at = now + backoff(attempts, s.backoff_s, s.backoff_max_s, self._rand)
        try:
            self.store.outbox_retry(row.seq, attempts, next_at, error)
        except StoreError:
            with self._lock:
                self._unwritten[row.seq] = (attempts, next_at, error)

    def _give_up(self, row: OutboxRecord, why: str) -> None:
        """One log line and the counter; the row goes."""
        metrics.webhook_deliveries_total.labels(row.hook, Delivery.GAVE_UP).inc()
        age = self._now() - row.created
        log.error(
            "webhooks: %s: gave up %s (%s of job %s) after %.0f s: %s",
            row.hook, row.event_id, row.event, row.job_id, age, why,
        )  # fmt: skip
        self._remove(row.seq)

    def _remove(self, seq: int) -> None:
        try:
            self.store.outbox_remove(seq)
        except StoreError:
            with self._lock:
                self._unwritten[seq] = None

    def _write_unwritten(self) -> None:
        """Write the outcomes the store could not take before (kept until it can)."""
        with self._lock:
            pending = dict(self._unwritten)
        for seq, outcome in pending.items():
            try:
                if outcome is None:
                    self.store.outbox_remove(seq)
                else:
                    self.store.outbox_retry(seq, *outcome)
            except StoreError:
                return
            with self._lock:
                if self._unwritten.get(seq, ...) == outcome:
                    del self._unwritten[seq]

    def depth(self) -> int:
        """Events waiting (the outbox's rows)."""
        return self.store.outbox_depth()
