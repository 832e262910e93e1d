"""Reverse port forwards on the pool's connections: a node's ``127.0.0.1:<port>`` leads to
an address here (the daemon's own listening socket), so ranks reach a loopback-bound
daemon through the SSH session the daemon already holds to their node.

paramiko calls one handler per connection for every ``forwarded-tcpip`` channel, on that
connection's reader thread: while it runs, nothing else on the connection moves (job
output, the probe loop's answers).  So the handler only starts a thread and returns;
the thread connects to the target and pipes both ways (one thread, ``select`` on the
socket and the channel), half-closes as each side ends, and gives up after ``IDLE_S``
of silence.

The ``tcpip-forward`` request is a global request, sent through
``Connection.global_reply`` like the probe loop's keepalive: one at a time per
connection, bounded by a deadline.  sshd refuses a forward the same way whether the
port is taken or forwarding is not allowed (``AllowTcpForwarding no`` or ``local``), so
a refusal is followed by a forward of port 0: granted (and cancelled at once) means
the port was taken.  A connection that reconnects gets its forwards again.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time

import paramiko

from mlbench_daemon.ssh import internals
from mlbench_daemon.ssh.connection import Connection
from mlbench_daemon.ssh_errors import SSHError

log = logging.getLogger(__name__)

BIND = "127.0.0.1"  # the node's side of every forward: only the node's own processes reach it
CONNECT_S = 5.0  # a forwarded connection's connect to the target
IDLE_S = 300.0  # a forwarded connection silent both ways this long is closed
CHUNK = 2**16
TAKEN = "taken"  # ForwardRefused.why: another process listens on the node's port
PROHIBITED = "prohibited"  # the node's sshd allows no remote forwarding
NO_ANSWER = "no-answer"  # the node did not answer in time (or the session is down)


class ForwardRefused(Exception):
    """A forward the node did not grant; ``why`` is TAKEN, PROHIBITED or NO_ANSWER;
    str() says it for a person."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why


class Forwards:
    """The reverse forwards of a pool's connections: remote port -> local (host, port)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}
        self.piped = 0  # forwarded connections handed to a pipe thread (for the bench)

    def open(self, conn: Connection, port: int, target: tuple[str, int], deadline: float) -> None:
        """Forward the node's BIND:`port` to `target`; nothing to do if it already is.
        Raises ForwardRefused."""
        key = (conn.ip, conn.port)
        with self._lock:
            if self._ports.get(key, {}).get(port) == target:
                return
        conn.open(deadline)
        self._request(conn, port, deadline)
        with self._lock:
            self._ports.setdefault(key, {})[port] = target

    def close(self, conn: Connection, port: int, deadline: float) -> None:
        """Stop forwarding the node's `port` (best effort: a dead session has no forwards)."""
        with self._lock:
            ports = self._ports.get((conn.ip, conn.port), {})
            if ports.pop(port, None) is None:
                return
        conn.global_request("cancel-tcpip-forward", deadline, (BIND, port))

    def ports(self, ip: str, port: int) -> dict[int, tuple[str, int]]:
        """The forwards of the node at (ip, port): remote port -> target."""
        with self._lock:
            return dict(self._ports.get((ip, port), {}))

    def reopen(self, conn: Connection, deadline: float) -> None:
        """After a reconnect: ask again for every forward the connection had."""
        for port in self.ports(conn.ip, conn.port):
            try:
                self._request(conn, port, deadline)
            except (SSHError, ForwardRefused) as e:
                log.warning(
                    "%s: reverse forward of port %d lost on reconnect: %s", conn.where, port, e
                )

    def forget(self, ip: str, port: int) -> None:
        with self._lock:
            self._ports.pop((ip, port), None)

    # --- internals ------------------------------------------------------------------

    def _request(self, conn: Connection, port: int, deadline: float) -> None:
        transport = conn.transport
        if transport is not None:
            internals.forward_handler(transport, self._handler(conn))
        reply = conn.global_reply("tcpip-forward", deadline, (BIND, port))
        if reply is None:
            raise ForwardRefused(NO_ANSWER, f"{conn.where}: no answer to the forward request")
        if reply is not False:
            return
        probe = conn.global_reply("tcpip-forward", deadline, (BIND, 0))
        if isinstance(probe, paramiko.Message):  # forwarding works: the port is taken
            conn.global_request("cancel-tcpip-forward", deadline, (BIND, probe.get_int()))
            raise ForwardRefused(TAKEN, f"port {port} is taken on the node")
        if probe is None:
            raise ForwardRefused(NO_ANSWER, f"{conn.where}: no answer to the forward request")
        raise ForwardRefused(
            PROHIBITED, "its sshd refuses remote port forwarding (AllowTcpForwarding)"
        )

    def _handler(self, conn: Connection) -> internals.ForwardHandler:
        key = (conn.ip, conn.port)

        def handle(
            chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]
        ) -> None:
            with self._lock:
                target = self._ports.get(key, {}).get(server[1])
                self.piped += target is not None
            if target is None:  # a forward being cancelled: nothing listens for it here
                chan.close()
                return
            threading.Thread(
                target=pipe, args=(chan, target), name=f"forward-{server[1]}", daemon=True
            ).start()

        return handle


def pipe(chan: paramiko.Channel, target: tuple[str, int]) -> None:
    """Copy bytes between a forwarded channel and a new connection to `target` until both
    sides have ended (each end's EOF passed on as a half-close) or IDLE_S of silence."""
    try:
        sock = socket.create_connection(target, timeout=CONNECT_S)
    except OSError as e:
        log.warning("reverse forward: cannot connect to %s:%d: %s", *target, e.strerror or e)
        chan.close()
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sel = selectors.DefaultSelector()
    try:
        sel.register(sock, selectors.EVENT_READ)
        sel.register(chan, selectors.EVENT_READ)
        ends = 0
        quiet_since = time.monotonic()
        while ends < 2:
            events = sel.select(timeout=max(0.0, quiet_since + IDLE_S - time.monotonic()))
            if not events:
                break
            quiet_since = time.monotonic()
            for key, _ in events:
                if key.fileobj is sock:
                    data = sock.recv(CHUNK)
                    if data:
                        chan.sendall(data)
                        continue
                    chan.shutdown_write()
                else:
                    data = chan.recv(CHUNK)
                    if data:
                        sock.sendall(data)
                        continue
                    sock.shutdown(socket.SHUT_WR)
                sel.unregister(key.fileobj)
                ends += 1
    except OSError as e:  # a reset on either side ends the connection
        log.debug("reverse forward to %s:%d: %s", *target, e)
    finally:
        sel.close()
        chan.close()
        with contextlib.suppress(OSError):
            sock.close()
