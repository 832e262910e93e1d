"""The SSH pool: one persistent connection per host, host keys verified; the facade
the rest of the daemon uses (see the package docstring)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mlbench_daemon import config
from mlbench_daemon.known_hosts import KnownHosts
from mlbench_daemon.ssh import channels
from mlbench_daemon.ssh.channels import Result, Stream
from mlbench_daemon.ssh.connection import (
    Connection,
    Login,
    classify,
    load_client_key,
    remaining,
)
from mlbench_daemon.ssh.forward import Forwards
from mlbench_daemon.ssh.listener import ListenerCheck
from mlbench_daemon.ssh.watch import Answer, Watches
from mlbench_daemon.ssh_errors import SSHError, Unreachable
from mlbench_daemon.vocabulary import SSHReason as R

log = logging.getLogger(__name__)


class Pool:
    """Persistent SSH connections keyed by (ip, port), shared by all threads."""

    def __init__(
        self, cfg: config.Ssh, on_reconnect: Callable[[str, int], object] | None = None
    ) -> None:
        self.cfg = cfg
        self.login = Login(
            cfg,
            load_client_key(cfg.key_file),
            KnownHosts(cfg.known_hosts, cfg.use_system_known_hosts, cfg.host_key_policy),
            threading.BoundedSemaphore(cfg.max_connects),
        )
        self.listener = ListenerCheck()
        self.watches = Watches()
        self.forwards = Forwards()
        self.on_reconnect = on_reconnect
        self.reconnects = 0
        self._conns: dict[tuple[str, int], Connection] = {}
        self._lock = threading.Lock()

    # --- public API -----------------------------------------------------------------

    def probe(self, ip: str, port: int, host: str | None = None) -> float:
        """Seconds it took to log in (if needed) and run `true`; bounded by the connect timeout."""
        start = time.monotonic()
        deadline = start + self.cfg.connect_timeout_s
        conn = self.connection(ip, port, host)
        try:
            channels.run_true(conn, deadline)
            self.watches.executed(conn)
            return time.monotonic() - start
        except Exception as e:
            conn.close()
            raise classify(e, conn.where) from e

    def watch(
        self, ip: str, port: int, host: str | None = None, *, listener: bool, timeout: float
    ) -> Answer | None:
        """One round of the node's probe loop (watch.py), started first if needed (a new
        exec, connecting if needed) -> Answer; None when no loop can run there (no python3).
        `listener`: the node also connects to its own sshd.  Bounded by `timeout`; raises
        Unreachable (the listener check's reason, a loop or link that did not answer)."""
        return self.watches.round(
            self.connection(ip, port, host), listener=listener, timeout=timeout
        )

    def watch_ages(self, ip: str, port: int) -> tuple[float, float] | None:
        """(seconds since a new command last ran on the session, since the node last
        checked its listener) while the node's probe loop runs; None when it does not."""
        return self.watches.ages(self.connection(ip, port))

    def counters(self, ip: str, port: int) -> tuple[float, Answer] | None:
        """The node's newest probe-loop answer (its /proc counters) and when it came (epoch);
        None before its first.  Asks nothing: what the probe rounds already read."""
        return self.watches.last(ip, port)

    def watch_many(
        self, rounds: list[tuple[str, int, bool]], timeout: float
    ) -> list[Answer | SSHError]:
        """One round on each (ip, port, listener) whose probe loop runs, all asked at once
        (watch.Watches.many); bounded by `timeout`."""
        conns = [(self.connection(ip, port), listener) for ip, port, listener in rounds]
        return self.watches.many(conns, timeout)

    def verify_login(self, ip: str, port: int, host: str | None = None) -> float:
        """Seconds for a full fresh login on a new connection: key exchange with the host-key
        check, public-key auth, then `true`; closed at once.  Bounded by the connect timeout.
        Raises Untrusted (host-key-changed, host-key-unknown, auth-failed) or Unreachable."""
        start = time.monotonic()
        deadline = start + self.cfg.connect_timeout_s
        conn = Connection(self.login, ip, port)  # not in the pool: used once
        conn.host = host or self.connection(ip, port).host
        conn.where = f"{conn.where} (fresh login)"
        try:
            if not self.login.connects.acquire(timeout=remaining(deadline)):
                raise Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: too many connects in flight")
            try:
                conn.transport = conn.new_transport(deadline)
            finally:
                self.login.connects.release()
            channels.run_true(conn, deadline)
            return time.monotonic() - start
        except Exception as e:
            raise classify(e, conn.where) from e
        finally:
            conn.close()

    def run(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", timeout: float
    ) -> Result:
        """Run argv to completion -> Result; raises CommandTimeout after `timeout` seconds."""
        return channels.run(self.connection(ip, port), argv, stdin=stdin, timeout=timeout)

    def check_listener(
        self, ip: str, port: int, host: str | None = None, timeout: float | None = None
    ) -> float:
        """Seconds for a fresh TCP connect to the node's sshd and its banner (see
        listener.py); bounded by `timeout` (default the connect timeout).  Raises
        Unreachable: connection-refused, no-banner, connect-timeout, ..."""
        timeout = self.cfg.connect_timeout_s if timeout is None else timeout
        return self.listener.check(self.connection(ip, port, host), timeout)

    def stream(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", idle_timeout: float
    ) -> Stream:
        """Start argv and return a Stream of its combined output."""
        return channels.stream(
            self.connection(ip, port),
            argv,
            stdin=stdin,
            idle_timeout=idle_timeout,
            ping=lambda: self.probe(ip, port),
        )

    def hostname(self, ip: str, port: int) -> str | None:
        """The host's `uname -n`, asked once per connection (a launcher prints host names;
        failure attribution maps them back to nodes); the last one known if it cannot be
        asked now."""
        conn = self.connection(ip, port)
        asked_at, name = conn.uname
        if conn.connects and asked_at == conn.connects:
            return name
        try:
            r = self.run(ip, port, ["uname", "-n"], timeout=self.cfg.connect_timeout_s)
        except SSHError:
            return name
        if r.exit_code == 0:
            name = r.stdout.decode(errors="replace").strip() or None
        conn.uname = (conn.connects, name)
        return name

    def forward(self, ip: str, port: int, remote_port: int, target: tuple[str, int]) -> None:
        """Forward the node's 127.0.0.1:`remote_port` to `target` (an address here) over
        the node's connection (forward.py), connecting first if needed; bounded by the
        connect timeout.  Raises forward.ForwardRefused (taken, prohibited, no answer) or
        SSHError (the node cannot be reached)."""
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        self.forwards.open(self.connection(ip, port), remote_port, target, deadline)

    def unforward(self, ip: str, port: int, remote_port: int) -> None:
        """Stop forwarding the node's `remote_port` (bounded by the connect timeout)."""
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        self.forwards.close(self.connection(ip, port), remote_port, deadline)

    def local_address(self, ip: str, port: int) -> str | None:
        """Our address on the node's live connection (one the node can reach), else None."""
        return self.connection(ip, port).local_address()

    def drop(self, ip: str, port: int) -> None:
        """Forget and close the connection to (ip, port)."""
        with self._lock:
            conn = self._conns.pop((ip, port), None)
        self.listener.forget(ip, port)
        self.watches.forget(ip, port)
        self.forwards.forget(ip, port)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()

    def connection(self, ip: str, port: int, host: str | None = None) -> Connection:
        """The pool's Connection for (ip, port) (not necessarily connected)."""
        with self._lock:
            conn = self._conns.get((ip, port))
            if conn is None:
                conn = self._conns[(ip, port)] = Connection(self.login, ip, port, self._reconnected)
            if host:
                conn.host = host
            return conn

    # --- internals ------------------------------------------------------------------

    def _reconnected(self, conn: Connection) -> None:
        with self._lock:
            self.reconnects += 1
        if self.forwards.ports(conn.ip, conn.port):  # not on the connecting thread: it waits
            deadline = time.monotonic() + self.cfg.connect_timeout_s
            threading.Thread(
                target=self.forwards.reopen, args=(conn, deadline), name="reforward", daemon=True
            ).start()
        if self.on_reconnect is not None:
            try:
                self.on_reconnect(conn.ip, conn.port)
            except Exception:
                log.exception("on_reconnect callback failed")
