"""The node registry: background discovery refresh and SSH probes; readers never wait.

Two daemon threads keep one immutable snapshot (a tuple of frozen NodeStatus,
in natural name order) that readers take without waiting:

- refresh loop: ``discovery.discover()`` every ``discovery.refresh_s`` seconds
  (whatever the records' TTLs: a TTL of 0 means "do not cache", not "ask every
  second"; Discovery re-reads unchanged members' records only every
  ``discovery.recheck_s``); nodes outside ``discovery.selector`` are never
  tracked.  New members start ``Pending`` (reason ``not-probed-yet``); removed
  ones disappear and their pool connection is dropped.  On DiscoveryError the
  last good list stays and ``stale``/``stale_reason`` say why (before the
  first success the table is empty and stale, reason ``not-discovered-yet``).
- probe loop: every ``ssh.probe_interval_s`` all nodes are probed in parallel
  (at most ``ssh.max_connects`` at once) under one deadline for the whole
  sweep; a probe still running at that deadline makes its node ``Unknown``
  (``connect-timeout``) and a node whose previous probe is still running is not
  probed again, so one silent host never stalls the others.  Each result is
  applied as soon as it arrives.

What a probe of one node checks (``Running`` = a job can be launched there now):

1. the persistent session answers: one round of the node's probe loop (``pool.watch``,
   ssh/watch.py: a long-lived python3 loop on the session, one line each way), which
   also looks at sshd's listening socket on the node (sshd logs nothing for that);
2. the node accepts new connections: every ``ssh.listener_interval_s`` (and at once
   when its listening socket is gone or holds unaccepted connections) the loop connects
   to its own sshd and reads the banner; a node without python3 is checked the old way
   each round (``pool.check_listener``), unless step 3 has just logged in afresh;
3. a new command starts: `true` on the session (``pool.probe``) every ``EXEC_EVERY_S``
   (starting the loop is one), in a round that (re)connects (the loop starts the round
   after), and every round where python3 is missing;
4. once every ``ssh.verify_interval_s`` a full fresh login on a new connection
   (``pool.verify_login``: host-key check, auth, `true`).  The persistent
   session's own login counts as one.  Node i of n is due at phase i/n of the
   interval (``FreshLogins``), so the logins are spread evenly over it, never
   all at once.  Forced rounds (``refresh()``, ``?refresh=1``) do steps 1, 2 and 3 as
   a round of the loop would, and step 4 only for nodes whose last fresh login failed.

A forced round does not make every node connect to its own sshd: it trusts a check
younger than ``ssh.listener_interval_s``, as a scheduled round does.  Each round still
reads the listening socket and its accept queue, so a stopped listener shows at once,
and a hung one as soon as any connection waits on it (a job's launch, a person's ssh);
one that nobody has tried shows within ``ssh.listener_interval_s``, forced or not.
Connecting on every forced round would cost each node's sshd a fork and exec per
``?refresh=1`` (most of a warm forced round's time), and a client refreshing in a loop
would write two lines to each node's auth log per refresh: kept to the schedule, the
checks stay within PRODUCT.md's auth-log bound however often clients refresh.

Rounds of nodes with nothing but step 1 (and 2) due are made by the sweep itself, all
asked at once and then read (``pool.watch_many``); the others go to the worker pool.

A failed step 2 makes the node ``Unknown`` (connection-refused, no-banner, ...)
with a message saying that an existing session still works but new logins
fail; a failed step 4 gives the login's own phase and reason (``Failed``:
host-key-changed, auth-failed, ...), kept until a later fresh login succeeds.
A node that refused us (``Failed``) is not logged into again before its next
slot (or a forced round), so a broken node does not fill its sshd log (and
fail2ban) with failed logins every probe round; a fresh login that timed out or
broke is retried the next round.
"""

import concurrent.futures
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from mlbench_daemon.config import Config
from mlbench_daemon.discovery import Discovery, DiscoveryError, Node, Selector, natural_key
from mlbench_daemon.ssh_errors import ListenerDown, SSHError, Unreachable, Untrusted
from mlbench_daemon.timefmt import iso
from mlbench_daemon.vocabulary import DiscoveryReason, NodeReason, Phase, SSHReason

log = logging.getLogger(__name__)


def _key(node: Node) -> tuple[str, str, int]:
    return (node.name, node.ip, node.port)


SWEEP_SLACK_S = 1.0  # sweep deadline = ssh.connect_timeout_s + this (each probe bounds itself)
RETRY_S = 2.0  # discovery retry after a failure (at most discovery.refresh_s)
ALIVE_FACTOR = 3  # alive() while each loop made progress within this many of its periods
# A probe loop proves the session lives, not that a new command can start (the user's
# process limit reached, a hung home directory): `true` runs on each session this often.
EXEC_EVERY_S = 60.0
NEW_LOGINS_FAIL = "; an existing session still works but new logins fail"


class Session(Protocol):
    """What the registry reads of ssh.Connection."""

    connects: int

    @property
    def is_connected(self) -> bool: ...


class Prober(Protocol):
    """What the registry needs of ssh.Pool."""

    def probe(self, ip: str, port: int, host: str | None = None) -> float: ...
    def watch(
        self, ip: str, port: int, host: str | None = None, *, listener: bool, timeout: float
    ) -> Any: ...
    def watch_ages(self, ip: str, port: int) -> tuple[float, float] | None: ...
    def watch_many(self, rounds: list[tuple[str, int, bool]], timeout: float) -> list[Any]: ...
    def hostname(self, ip: str, port: int) -> str | None: ...
    def check_listener(
        self, ip: str, port: int, host: str | None = None, timeout: float | None = None
    ) -> float: ...
    def verify_login(self, ip: str, port: int, host: str | None = None) -> float: ...
    def connection(self, ip: str, port: int, host: str | None = None) -> Session: ...
    def drop(self, ip: str, port: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    node: Node
    phase: str = Phase.PENDING
    reason: str = NodeReason.NOT_PROBED_YET
    message: str = "discovered, first probe not finished"
    last_probe: float | None = None  # epoch seconds
    latency_ms: float | None = None
    hostname: str | None = None  # `uname -n`, asked once per new connection

    def to_json(self) -> dict[str, Any]:
        n = self.node
        return {
            "name": n.name,
            "labels": n.labels_str,
            "phase": self.phase,
            "ip": n.ip,
            "label_map": dict(n.labels),
            "host": n.host,
            "port": n.port,
            "namespace": n.namespace,
            "reason": self.reason,
            "message": self.message,
            "last_probe": iso(self.last_probe),
            "latency_ms": self.latency_ms,
            "hostname": self.hostname,
            "discovery_note": n.note,
        }

    @functools.cached_property
    def json_text(self) -> str:
        """``to_json()`` as JSON text, made once per status (a status is never changed: a
        probe result makes a new one), so the node list re-encodes only the nodes that
        changed since it was last read."""
        return json.dumps(self.to_json())


NodeKey = tuple[str, str, int]


class FreshLogins:
    """When each node last tried a full fresh login, and its error while they fail."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self.interval_s, self.clock = interval_s, clock
        self.count = 0  # fresh logins made (session reconnects + verify_login)
        self._last: dict[NodeKey, float] = {}
        self._error: dict[NodeKey, SSHError] = {}
        self._lock = threading.Lock()

    def due(self, k: NodeKey, index: int, n: int, now: float) -> bool:
        """Is node `index` of `n` due?  Its slots are at phase index/n of the interval, so
        at most one interval after its last attempt."""
        last = self._last.get(k)
        if last is None:
            return True
        interval = self.interval_s
        wait = (interval * index / max(n, 1) - last) % interval or interval
        return now >= last + wait

    def done(self, k: NodeKey, error: SSHError | None) -> None:
        """Record a fresh-login attempt of node k (error None = it worked)."""
        with self._lock:
            self._last[k] = self.clock()
            self.count += 1
            if error is None:
                self._error.pop(k, None)
            else:
                self._error[k] = error

    def error(self, k: NodeKey) -> SSHError | None:
        return self._error.get(k)

    def forget(self, k: NodeKey) -> None:
        with self._lock:
            self._last.pop(k, None)
            self._error.pop(k, None)


def _noted(e: SSHError, note: str) -> SSHError:
    """A copy of SSHError e with `note` added to its message (e itself may be reused)."""
    return type(e)(e.reason, f"{e}{note}")


def _listener_down(e: SSHError) -> SSHError:
    """The node's listener check failed: say that the session still works."""
    return _noted(e, NEW_LOGINS_FAIL + " (so mpirun cannot start there)")


def listener_due(ages: tuple[float, float] | None, ssh: Any) -> bool:
    """Does the node connect to its own sshd this round: when its last such check is
    ``ssh.listener_interval_s`` old (or its loop starts).  Forced rounds keep to this
    too (see the module docstring)."""
    return ages is None or ages[1] >= ssh.listener_interval_s


def watched(answer: Any, user: str) -> dict[str, Any]:
    """The NodeStatus fields of a Running node whose loop answered."""
    return dict(
        phase=Phase.RUNNING,
        reason=NodeReason.OK,
        latency_ms=round(answer.seconds * 1000, 3),
        message=f"session answers as {user}; new connections accepted; last fresh login ok",
    )


def probe_result(
    pool: Prober,
    node: Node,
    ssh: Any,
    logins: FreshLogins,
    *,
    login: bool,
    retry: bool,
) -> dict[str, Any]:
    """Probe `node` -> the NodeStatus fields its result sets (phase, reason, ...).

    `ssh`: the config section (user, connect_timeout_s: the bound of the whole probe);
    `login`: make a fresh login unless the session does; `retry`: a node whose last fresh
    login was refused may be tried again (its slot has come, or the round was forced)."""
    user, timeout = ssh.user, ssh.connect_timeout_s
    k = _key(node)
    start = time.monotonic()
    ip, port = node.ip, node.port
    try:
        conn = pool.connection(ip, port, node.host)
        failed = logins.error(k)
        if isinstance(failed, Untrusted) and not retry and not conn.is_connected:
            raise failed  # not before its next slot (see the module docstring)
        # a refusal is retried at its slot; a login that timed out or broke, next round
        login = login or (failed is not None and (retry or not isinstance(failed, Untrusted)))
        connects = conn.connects
        ages = pool.watch_ages(ip, port)
        latency, answer = None, None
        if not conn.is_connected or (ages is not None and ages[0] >= EXEC_EVERY_S):
            # a new command on the session; a (re)connect stops here: its login proved the
            # listener, `true` proved commands start, and the loop starts next round (its
            # python3 start-up on every node would slow a cold `?refresh=1` down)
            latency = pool.probe(ip, port, node.host)
        if conn.connects == connects:
            left = max(0.1, timeout - (time.monotonic() - start))
            listener = listener_due(ages, ssh)
            try:  # starts the loop where none runs: a new command too
                answer = pool.watch(ip, port, node.host, listener=listener, timeout=left)
            except ListenerDown as e:
                raise _listener_down(e) from e
            if answer is None and latency is None:  # no python3 there: `true` every round
                latency = pool.probe(ip, port, node.host)
        fresh = conn.connects != connects  # the session logged in afresh: 2 and 4 done
        if answer is None and not fresh:  # and the old listener check
            left = timeout - (time.monotonic() - start)
            try:
                pool.check_listener(ip, port, node.host, timeout=max(0.1, left))
            except SSHError as e:
                raise _listener_down(e) from e
        if fresh:
            logins.done(k, None)
        elif login:
            try:
                pool.verify_login(ip, port, node.host)
                logins.done(k, None)
            except SSHError as e:
                # a login the node refused, or one that found no listener (no banner...)
                note = NEW_LOGINS_FAIL if isinstance(e, Unreachable) else ""
                logins.done(k, _noted(e, note or " (an existing session still works)"))
        failed = logins.error(k)
        if failed is not None:
            raise failed
        if answer is not None and latency is None:
            return watched(answer, user)
        return dict(
            phase=Phase.RUNNING,
            reason=NodeReason.OK,
            latency_ms=None if latency is None else round(latency * 1000, 3),
            message=f"ran `true` as {user}; new connections accepted; last fresh login ok",
        )
    except SSHError as e:
        if isinstance(e, Untrusted) and e is not logins.error(k):
            logins.done(k, e)  # the session's reconnect was refused: a failed login
        return dict(phase=e.phase, reason=e.reason, message=str(e), latency_ms=None)
    except Exception as e:  # a bug must not leave the node Pending forever
        log.exception("probe of %s failed unexpectedly", node.name)
        return dict(
            phase=Phase.UNKNOWN, reason=SSHReason.SSH_ERROR, message=repr(e), latency_ms=None
        )


class Registry:
    def __init__(
        self,
        cfg: Config,
        discovery: Discovery,
        pool: Prober,
        clock: Callable[[], float] = time.monotonic,
        on_probe: Callable[[NodeStatus], object] | None = None,
    ) -> None:
        """`on_probe(status)` is called after each probe result (metrics hook), if given."""
        self.cfg, self.discovery, self.pool, self.clock = cfg, discovery, pool, clock
        self.on_probe = on_probe
        self.selector = Selector.parse(cfg.discovery.selector)
        self.generation = 0  # bumped on every change of the table
        self.refreshed_at: float | None = None  # epoch of the last successful discovery
        self._snapshot: tuple[NodeStatus, ...] = ()
        self._index: dict[NodeKey, int] = {}  # node key -> its place in the snapshot
        self._json: tuple[int, str] = (-1, "")  # (generation, the node list as JSON)
        self._stale, self._stale_reason = True, str(DiscoveryReason.NOT_DISCOVERED_YET)
        self._lock = threading.Lock()  # guards every swap of the snapshot and the stale flag
        self._stop = threading.Event()
        self._wake = threading.Event()  # start a probe round now
        self._rounds = threading.Condition()
        self._started = self._done = 0
        self._discovered = threading.Event()
        self._first_pass = threading.Event()
        # node key -> the future of its probe still running
        self._inflight: dict[tuple[str, str, int], concurrent.futures.Future[None]] = {}
        self._forced = False  # the next round was asked for by refresh(): no fresh logins
        self.logins = FreshLogins(cfg.ssh.verify_interval_s, clock)
        self._beats: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.ssh.max_connects, thread_name_prefix="probe"
        )

    # --- readers (never wait) -----------------------------------------------------------

    def nodes(self, selector: Selector | str | None = None) -> list[NodeStatus]:
        """Current status of every selected node, in natural name order."""
        if isinstance(selector, str):
            selector = Selector.parse(selector)
        snap = self._snapshot
        return [s for s in snap if selector is None or selector.matches(s.node.labels)]

    def nodes_json(self) -> str:
        """The API's node list (every node's ``to_json()``) as JSON text, made again only
        when the table changed: it changes per probe, it is read far more often.  Joined
        from each status's own text (what ``json.dumps`` of the list gives), so a table
        where one node changed costs one node's encoding, not 512."""
        with self._lock:
            snap, generation = self._snapshot, self.generation
        cached = self._json
        if cached[0] != generation:
            text = "[" + ", ".join(s.json_text for s in snap) + "]"
            cached = self._json = (generation, text)
        return cached[1]

    @property
    def stale(self) -> bool:
        return self._stale

    @property
    def stale_reason(self) -> str:
        return self._stale_reason

    def discovery_age_s(self) -> float | None:
        """Seconds since the last successful discovery (how old the node list is)."""
        at = self.refreshed_at
        return None if at is None else round(max(0.0, time.time() - at), 3)

    def wait_first_pass(self, timeout: float) -> bool:
        """True once discovery has run and a probe round started after it has finished."""
        return self._first_pass.wait(timeout)

    def alive(self) -> bool:
        """Both loops made progress lately (for the systemd watchdog)."""
        d, s = self.cfg.discovery, self.cfg.ssh
        periods = {
            "refresh": d.refresh_s + d.timeout_s,
            "probe": s.probe_interval_s + s.connect_timeout_s + SWEEP_SLACK_S,
        }
        now = self.clock()
        return (
            bool(self._threads)
            and not self._stop.is_set()
            and all(
                now - self._beats.get(name, -1e18) < ALIVE_FACTOR * period
                for name, period in periods.items()
            )
        )

    # --- control ------------------------------------------------------------------------

    def start(self) -> None:
        now = self.clock()
        self._beats = {"refresh": now, "probe": now}
        for name, loop in (("refresh", self._refresh_loop), ("probe", self._probe_loop)):
            t = threading.Thread(target=loop, name=f"nodes-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        """Stop both loops; waits at most `timeout` (default: one discovery + one sweep)."""
        if timeout is None:
            timeout = self.cfg.discovery.timeout_s + self.cfg.ssh.connect_timeout_s + SWEEP_SLACK_S
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def refresh(self, timeout: float) -> None:
        """Run one probe round now and wait (at most `timeout`) until it has finished."""
        with self._rounds:
            want = self._started + 1
            self._forced = True
            self._wake.set()
            self._rounds.wait_for(lambda: self._done >= want, timeout)

    # --- refresh loop -------------------------------------------------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            wait = self._refresh_once()
            self._discovered.set()
            self._wake.set()  # probe new members now (and let the first pass finish)
            self._beats["refresh"] = self.clock()
            self._stop.wait(wait)

    def _refresh_once(self) -> float:
        """One discovery pass; returns the seconds until the next one."""
        refresh_s = self.cfg.discovery.refresh_s
        try:
            nodes, _ttl = self.discovery.discover()
        except Exception as e:
            reason = e.reason if isinstance(e, DiscoveryError) else DiscoveryReason.DNS_ERROR
            if not isinstance(e, DiscoveryError):
                log.exception("discovery failed unexpectedly")
            if not self._stale or self._stale_reason != reason:
                log.warning("discovery failed (%s): %s; keeping the last good node list", reason, e)
            with self._lock:
                self._stale, self._stale_reason = True, reason
            return min(refresh_s, RETRY_S)
        self._set_members(n for n in nodes if self.selector.matches(n.labels))
        return refresh_s

    def _set_members(self, nodes: Iterable[Node]) -> None:
        members = {_key(n): n for n in nodes}
        with self._lock:
            old = {_key(s.node): s for s in self._snapshot}
            table = [
                dataclasses.replace(old[k], node=n) if k in old else NodeStatus(n)
                for k, n in members.items()
            ]
            self._snapshot = tuple(sorted(table, key=lambda s: natural_key(s.node.name)))
            self._index = {_key(s.node): i for i, s in enumerate(self._snapshot)}
            self._stale, self._stale_reason = False, ""
            self.refreshed_at = time.time()
            self.generation += 1
        kept = {(n.ip, n.port) for n in members.values()}
        for k in old.keys() - members.keys():
            log.info("node %s (%s:%d) left", *k)
            self.logins.forget(k)
            if k[1:] not in kept:
                self.pool.drop(*k[1:])
        for k in members.keys() - old.keys():
            log.info("node %s (%s:%d) joined", *k)

    # --- probe loop ---------------------------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            with self._rounds:
                self._wake.clear()
                self._started += 1
                n = self._started
                after_discovery = self._discovered.is_set()
                forced, self._forced = self._forced, False
            try:
                self._sweep(logins=not forced)
            except Exception:  # never let the loop die; the watchdog would notice anyway
                log.exception("probe sweep failed")
            with self._rounds:
                self._done = n
                self._rounds.notify_all()
            if after_discovery:
                self._first_pass.set()
            self._beats["probe"] = self.clock()
            self._wake.wait(self.cfg.ssh.probe_interval_s)

    def _sweep(self, logins: bool = True) -> None:
        """Probe every node in parallel under one deadline for the whole round: rounds of
        the nodes with only their probe loop due here, at once; the others in the pool."""
        budget = self.cfg.ssh.connect_timeout_s + SWEEP_SLACK_S
        futures: dict[concurrent.futures.Future[None], Node] = {}
        batch: list[tuple[Node, bool]] = []
        snapshot, now = self._snapshot, self.clock()
        for i, s in enumerate(snapshot):
            k = _key(s.node)
            due = self.logins.due(k, i, len(snapshot), now)
            login, retry = due and logins, due or not logins  # see probe_result
            with self._lock:
                f = self._inflight.get(k)
            if f is None and not login and self.logins.error(k) is None:
                ages = self.pool.watch_ages(s.node.ip, s.node.port)
                if ages is not None and ages[0] < EXEC_EVERY_S:
                    batch.append((s.node, listener_due(ages, self.cfg.ssh)))
                    continue
            with self._lock:
                f = self._inflight.get(k)
                if f is None:
                    try:
                        f = self._inflight[k] = self._executor.submit(
                            self._probe, s.node, login, retry
                        )
                    except RuntimeError:  # executor shut down: we are stopping
                        return
            # a probe still running from an earlier round is waited for, not piled up
            futures[f] = s.node
        if batch:
            self._watch_batch(batch)
        concurrent.futures.wait(futures, timeout=budget)
        for f, node in futures.items():
            if f.running():
                self._update(
                    node,
                    lambda s: dataclasses.replace(
                        s,
                        phase=Phase.UNKNOWN,
                        reason=SSHReason.CONNECT_TIMEOUT,
                        latency_ms=None,
                        message=f"no answer within {budget:g} s",
                        last_probe=time.time(),
                    ),
                    if_inflight=True,
                )

    def _watch_batch(self, batch: list[tuple[Node, bool]]) -> None:
        """One probe-loop round of each node in `batch`, asked all at once."""
        rounds = [(n.ip, n.port, listener) for n, listener in batch]
        try:
            results = self.pool.watch_many(rounds, self.cfg.ssh.connect_timeout_s)
        except Exception as bug:  # a bug must not leave these nodes as they were
            log.exception("probe rounds of %d nodes failed unexpectedly", len(batch))
            results = [bug] * len(batch)
        changes = []
        for (node, _), r in zip(batch, results, strict=True):
            if not isinstance(r, SSHError) and isinstance(r, Exception):
                change: dict[str, Any] = dict(
                    phase=Phase.UNKNOWN,
                    reason=SSHReason.SSH_ERROR,
                    message=repr(r),
                    latency_ms=None,
                )
            elif isinstance(r, SSHError):
                err = _listener_down(r) if isinstance(r, ListenerDown) else r
                change = dict(phase=err.phase, reason=err.reason, message=str(err), latency_ms=None)
            else:
                change = watched(r, self.cfg.ssh.user)
            changes.append((node, self._with_hostname(node, change)))
        self._update_many(changes)

    def _probe(self, node: Node, login: bool, retry: bool) -> None:
        """Probe one node and record the result (runs in the worker pool)."""
        change = probe_result(self.pool, node, self.cfg.ssh, self.logins, login=login, retry=retry)
        self._record(node, change, finished=True)

    def _record(self, node: Node, change: dict[str, Any], *, finished: bool) -> None:
        self._update(node, self._with_hostname(node, change), finished=finished)

    def _with_hostname(
        self, node: Node, change: dict[str, Any]
    ) -> Callable[[NodeStatus], NodeStatus]:
        """A probe result's fields (with the host name of a Running node) -> the change of
        its status."""
        if change["phase"] == Phase.RUNNING:
            hostname = self.pool.hostname(node.ip, node.port)
            if hostname:
                change["hostname"] = hostname
        now = time.time()
        return lambda s: dataclasses.replace(s, last_probe=now, **change)

    def _update(
        self,
        node: Node,
        change: Callable[[NodeStatus], NodeStatus],
        *,
        finished: bool = False,
        if_inflight: bool = False,
    ) -> None:
        """Apply change(status) to the node's entry, if it is still a member.

        `finished`: this is the probe's own result (its node leaves the in-flight
        set); `if_inflight`: apply only while the probe has not reported yet.
        """
        self._update_many([(node, change)], finished=finished, if_inflight=if_inflight)

    def _update_many(
        self,
        changes: list[tuple[Node, Callable[[NodeStatus], NodeStatus]]],
        *,
        finished: bool = False,
        if_inflight: bool = False,
    ) -> None:
        """`_update` of several nodes as one change of the table: a sweep's batch of 512
        answers makes one new snapshot (found by the key's index, not a scan), so the
        readers' cached JSON is made again once per batch, not once per node."""
        done = []
        with self._lock:
            table = list(self._snapshot)
            for node, change in changes:
                k = _key(node)
                if if_inflight and k not in self._inflight:
                    continue
                if finished:
                    self._inflight.pop(k, None)
                i = self._index.get(k)
                if i is None:
                    continue
                table[i] = new = change(table[i])
                done.append((node, self._snapshot[i], new))
            if not done:
                return
            self._snapshot = tuple(table)
            self.generation += 1
        for node, s, new in done:
            if new.phase != s.phase or new.reason != s.reason:
                level = logging.INFO if new.phase == Phase.RUNNING else logging.WARNING
                log.log(level, "node %s: %s (%s) %s", node.name, new.phase, new.reason, new.message)
            if self.on_probe is not None:
                try:
                    self.on_probe(new)
                except Exception:
                    log.exception("on_probe callback failed")
