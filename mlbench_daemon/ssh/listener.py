"""The listener check: is the node's sshd still accepting new logins?

An established connection proves nothing about the next login (sshd's listener can
be stopped, hung, re-keyed, or the key revoked while old sessions live).  The check is
a fresh TCP connect to the node's sshd and its banner (no crypto), made by the node
itself through the persistent connection (a ``direct-tcpip`` channel to the node's own
address and port); after the banner it sends an identification string and a
disconnect (reason 11, "by application"), so sshd logs a clean "Received disconnect
... listener check".  Made from the node, the check's pre-auth disconnect is logged
against the node's own address, which fail2ban never bans (``ignoreself``); made from
here, fail2ban's sshd filter in ddos/aggressive mode counts every such disconnect as a
failure and would ban the head within minutes.  When the node forbids forwarding
(``AllowTcpForwarding no``) the check connects from here instead, at most every
``HEAD_CHECK_EVERY_S``.  ``ListenerCheck`` holds that per-node state.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

import paramiko

from mlbench_daemon.ssh import internals
from mlbench_daemon.ssh.channels import close_channel
from mlbench_daemon.ssh.connection import Connection, classify, remaining
from mlbench_daemon.ssh_errors import SSHError, Unreachable
from mlbench_daemon.vocabulary import SSHReason as R

log = logging.getLogger(__name__)

CHECK_IDENT = b"SSH-2.0-mlbench-daemon-check\r\n"
MAX_BANNER = 8192  # sshd may send text lines before its SSH- line (RFC 4253 4.2)
# A listener check made from here ends in a pre-auth disconnect that fail2ban's sshd
# filter (aggressive, ddos) counts as a failure; it bans at 5 within 10 minutes by
# default, so from here a node's listener is checked at most this often.
HEAD_CHECK_EVERY_S = 180.0


def _disconnect_packet(text: bytes) -> bytes:
    """An unencrypted SSH_MSG_DISCONNECT (reason 11, by application), valid before kex."""

    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    payload = bytes([1]) + struct.pack(">I", 11) + string(text) + string(b"")
    pad = 8 - (5 + len(payload)) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + pad, pad) + payload + bytes(pad)


CHECK_BYE = CHECK_IDENT + _disconnect_packet(b"mlbench-daemon listener check")


def _read_banner(recv: Callable[[int], bytes], where: str, timeout: float) -> str:
    """Read until sshd's ``SSH-`` line; Unreachable("no-banner") if it does not come."""
    buf = b""
    while True:
        try:
            data: bytes | None = recv(1024)
        except TimeoutError:
            data = None
        if data is None:
            raise Unreachable(R.NO_BANNER, f"{where}: no SSH banner within {timeout:g} s")
        if not data:
            raise Unreachable(
                R.NO_BANNER, f"{where}: connection closed before the SSH banner ({buf[:80]!r})"
            )
        buf += data
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(b"SSH-"):
                return line.rstrip(b"\r").decode(errors="replace")
        if len(buf) > MAX_BANNER:
            raise Unreachable(R.NO_BANNER, f"{where}: no SSH- line in the first {MAX_BANNER} bytes")


def _exchange_banners(
    stream: socket.socket | paramiko.Channel,
    where: str,
    timeout: float,
    deadline: float,
    start: float,
) -> float:
    """On a fresh connection to sshd (a socket from here, or a direct-tcpip channel from
    the node): its banner, then our identification and goodbye -> seconds since `start`."""
    try:
        stream.settimeout(max(0.01, remaining(deadline)))
        _read_banner(stream.recv, where, timeout)
        stream.sendall(CHECK_BYE)
        return time.monotonic() - start
    except SSHError:
        raise
    except Exception as e:
        raise classify(e, where) from e


def _forward_failure(exc: paramiko.ChannelException, where: str) -> Unreachable:
    """A direct-tcpip open the node refused for another reason than a failed connect."""
    return Unreachable(R.SSH_ERROR, f"{where}: the node refused the check channel: {exc.text}")


@dataclasses.dataclass
class Route:
    """How one node's listener is checked."""

    forwarding: bool = True  # through the node's connection (until it refuses)
    # (monotonic, error or None, seconds) of the last check made from here
    head_check: tuple[float, SSHError | None, float] | None = None


class ListenerCheck:
    """The listener checks of a pool's nodes, and how each node's is made."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, int], Route] = {}
        self._lock = threading.Lock()

    def route(self, ip: str, port: int) -> Route:
        with self._lock:
            return self._routes.setdefault((ip, port), Route())

    def forget(self, ip: str, port: int) -> None:
        with self._lock:
            self._routes.pop((ip, port), None)

    def check(self, conn: Connection, timeout: float) -> float:
        """Seconds for a fresh TCP connect to the node's sshd and its banner (see the module
        docstring); bounded by `timeout`.  Raises Unreachable: connection-refused,
        no-banner, connect-timeout, ..."""
        start = time.monotonic()
        deadline = start + timeout
        route = self.route(conn.ip, conn.port)
        t = conn.transport
        if t is not None and route.forwarding and conn.is_connected:
            where = f"{conn.where} (new connection, made from the node)"
            try:
                chan = t.open_channel(
                    "direct-tcpip",
                    (conn.ip, conn.port),
                    ("127.0.0.1", 0),
                    timeout=remaining(deadline),
                )
            except paramiko.ChannelException as e:
                why = internals.open_failure(e)
                if why == "prohibited":
                    log.warning(
                        "%s: the node forbids TCP forwarding; its listener is checked from here",
                        conn.where,
                    )
                    route.forwarding = False
                elif why == "connect-failed":
                    # paramiko drops sshd's own text ("Connection refused"): ask from here,
                    # which also tells a stopped listener from an address the node does not
                    # have (NAT between us and it: then check from here from now on)
                    took = self._connect_for_banner(conn, deadline, timeout, start)
                    log.warning(
                        "%s: the node cannot connect to its own address, but we can; "
                        "its listener is checked from here",
                        conn.where,
                    )
                    route.forwarding = False
                    return took
                else:
                    raise _forward_failure(e, where) from None
            except Exception as e:
                raise classify(e, where) from e
            else:
                try:
                    return _exchange_banners(chan, where, timeout, deadline, start)
                finally:
                    close_channel(chan)
        return self._check_here(conn, route, deadline, timeout, start)

    def _check_here(
        self, conn: Connection, route: Route, deadline: float, timeout: float, start: float
    ) -> float:
        last = route.head_check
        if last is not None and time.monotonic() - last[0] < HEAD_CHECK_EVERY_S:
            if last[1] is not None:
                raise last[1]
            return last[2]
        try:
            took = self._connect_for_banner(conn, deadline, timeout, start)
        except SSHError as e:
            route.head_check = (time.monotonic(), e, 0.0)
            raise
        route.head_check = (time.monotonic(), None, took)
        return took

    @staticmethod
    def _connect_for_banner(
        conn: Connection, deadline: float, timeout: float, start: float
    ) -> float:
        where = f"{conn.where} (new connection)"
        try:
            sock = socket.create_connection(
                (conn.ip, conn.port), timeout=max(0.01, remaining(deadline))
            )
        except Exception as e:
            raise classify(e, where) from e
        with sock:
            return _exchange_banners(sock, where, timeout, deadline, start)
