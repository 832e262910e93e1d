"""One persistent SSH connection, and what every part of the package shares.

Connect: TCP connect, banner, key exchange and auth share one deadline of
``ssh.connect_timeout_s`` (paramiko's own banner/handshake/auth timeouts are set
from what is left of it).  Failures are mapped to ``Unreachable`` / ``Untrusted``
in one place, ``classify()``.  A connection that failed is closed; the next use
reconnects (and counts a reconnect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from mlbench_daemon import config
from mlbench_daemon.config import ConfigError
from mlbench_daemon.known_hosts import KnownHosts, known_names
from mlbench_daemon.ssh import internals
from mlbench_daemon.ssh_errors import SSHError, Unreachable, Untrusted
from mlbench_daemon.vocabulary import SSHReason as R

log = logging.getLogger(__name__)

DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")  # under ~/.ssh when ssh.key_file is empty
# Per-channel receive window and the largest packet we accept.  Following 1 GB of job
# output on the test cluster: 32 KiB packets (paramiko's default) cost the daemon
# 5.0-5.6 s of CPU, 128 KiB 4.4-4.7 s (sshd then sends about 64 KiB per packet);
# 2-16 MiB windows made no clear difference and 64 MiB was much slower.
WINDOW_SIZE = 16 * 2**20
MAX_PACKET_SIZE = 2**17
TCP_USER_TIMEOUT_S = 30  # unacknowledged data for this long kills the socket (frozen peer)


def classify(exc: BaseException, where: str = "") -> SSHError:
    """Map any exception from socket/paramiko to an SSHError (the one place this is done)."""
    if isinstance(exc, SSHError):
        return exc
    at = f"{where}: " if where else ""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, paramiko.BadHostKeyException):
        return Untrusted(R.HOST_KEY_CHANGED, f"{at}{text}")
    if isinstance(exc, paramiko.AuthenticationException):
        if "timeout" in text.lower():  # paramiko's auth wait raises this type on timeout
            return Unreachable(R.CONNECT_TIMEOUT, f"{at}no answer to authentication in time")
        return Untrusted(R.AUTH_FAILED, f"{at}authentication failed: {text}")
    if isinstance(exc, paramiko.SSHException):
        if "banner" in text.lower():
            return Unreachable(R.NO_BANNER, f"{at}no SSH banner: {text}")
        if "timeout" in text.lower():
            return Unreachable(R.CONNECT_TIMEOUT, f"{at}{text}")
        return Unreachable(R.SSH_ERROR, f"{at}{text}")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(R.CONNECTION_REFUSED, f"{at}connection refused")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Unreachable(R.CONNECT_TIMEOUT, f"{at}timed out")
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError)):
        return Unreachable(R.CONNECTION_LOST, f"{at}connection lost: {text}")
    if isinstance(exc, OSError):
        if exc.errno in (
            errno.ENETUNREACH,
            errno.EHOSTUNREACH,
            errno.EHOSTDOWN,
            errno.EADDRNOTAVAIL,
        ):
            return Unreachable(R.NETWORK_UNREACHABLE, f"{at}{text}")
        if exc.errno == errno.ETIMEDOUT:
            return Unreachable(R.CONNECT_TIMEOUT, f"{at}{text}")
        return Unreachable(R.CONNECTION_LOST, f"{at}{text}")
    return Unreachable(R.SSH_ERROR, f"{at}{type(exc).__name__}: {text}")


def load_client_key(key_file: str) -> paramiko.PKey | None:
    """The client key, loaded once; ``ssh.key_file`` empty = the first of ~/.ssh/id_*."""
    paths = [key_file] if key_file else [os.path.expanduser(f"~/.ssh/{n}") for n in DEFAULT_KEYS]
    for p in paths:
        if not key_file and not os.path.exists(p):
            continue
        try:
            return paramiko.PKey.from_path(p)
        except (OSError, paramiko.SSHException, ValueError) as e:
            raise ConfigError(f"ssh.key_file: cannot load {p}: {e}") from None
    return None


class Watchdog:
    """Call `action` if the with-block has not finished after `seconds`; `.fired` tells."""

    def __init__(self, seconds: float, action: Callable[[], object]) -> None:
        self.fired = False
        self._action = action
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        try:
            self._action()
        except Exception as e:  # closing over a transport that died meanwhile (EOFError)
            log.debug("watchdog action %r: %r", self._action, e)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


@dataclasses.dataclass(frozen=True)
class Login:
    """What every connection of a pool logs in with, and the pool's bound on connects."""

    cfg: config.Ssh
    client_key: paramiko.PKey | None
    known_hosts: KnownHosts
    connects: threading.BoundedSemaphore


class Connection:
    """One persistent SSH connection to (ip, port): opens lazily, closes in one place."""

    def __init__(
        self,
        login: Login,
        ip: str,
        port: int,
        on_reconnect: Callable[[Connection], None] | None = None,
    ) -> None:
        self.login, self.ip, self.port = login, ip, port
        self.on_reconnect = on_reconnect
        self.host: str | None = None
        self.where = f"{ip}:{port}"
        self.transport: paramiko.Transport | None = None
        self.connects = 0
        self.uname: tuple[int, str | None] = (0, None)  # (connects when asked, `uname -n`)
        self.channels = threading.BoundedSemaphore(login.cfg.max_channels)
        self.probe_channel = threading.BoundedSemaphore(1)
        self._requests = threading.Lock()  # one global request at a time (internals)
        self._open_lock = threading.Lock()
        self._lock = threading.Lock()

    @property
    def is_connected(self) -> bool:
        t = self.transport
        return t is not None and t.is_active() and t.is_authenticated()

    def open(self, deadline: float) -> paramiko.Transport:
        """The live transport, connecting first if needed (bounded by `deadline`)."""
        t = self.transport
        if t is not None and self.is_connected:
            return t
        if not self._open_lock.acquire(timeout=remaining(deadline)):
            raise Unreachable(
                R.CONNECT_TIMEOUT, f"{self.where}: another connect did not finish in time"
            )
        try:
            if self.transport is not None and self.is_connected:
                return self.transport
            self.close()
            if not self.login.connects.acquire(timeout=remaining(deadline)):
                raise Unreachable(R.CONNECT_TIMEOUT, f"{self.where}: too many connects in flight")
            try:
                t = self.new_transport(deadline)
            finally:
                self.login.connects.release()
            with self._lock:
                self.transport = t
            self.connects += 1
            if self.connects > 1 and self.on_reconnect is not None:
                self.on_reconnect(self)
            return t
        finally:
            self._open_lock.release()

    def global_request(
        self, kind: str, deadline: float, data: tuple[internals.Field, ...] = ()
    ) -> bool | None:
        """Global request `kind` on the live transport -> True (accepted), False (refused),
        None (no answer by `deadline`, or not connected); serialised per connection."""
        reply = self.global_reply(kind, deadline, data)
        return reply if reply is None or reply is False else True

    def global_reply(
        self, kind: str, deadline: float, data: tuple[internals.Field, ...] = ()
    ) -> paramiko.Message | bool | None:
        """`global_request`, with the reply's message when it is accepted (a forward of
        port 0 says there which port the server chose).  Every global request of the
        daemon goes through here (the probe loop's keepalive, the reverse forwards):
        paramiko has one reply slot per transport, so two at once would take each other's."""
        t = self.transport
        if t is None or not self.is_connected:
            return None
        if not self._requests.acquire(timeout=remaining(deadline)):
            return None
        try:
            return internals.global_request(t, kind, remaining(deadline), data)
        finally:
            self._requests.release()

    def local_address(self) -> str | None:
        """This end's address of the live connection: an address of ours the node reaches
        (None when not connected)."""
        t = self.transport
        if t is None or not self.is_connected:
            return None
        sock = t.sock
        if not isinstance(sock, socket.socket):
            return None
        try:
            return str(sock.getsockname()[0])
        except OSError:
            return None

    def connect_kwargs(self, deadline: float) -> dict[str, Any]:
        """Everything a connect depends on, gathered in one place."""
        cfg = self.login.cfg
        return dict(
            timeout=remaining(deadline),
            user=cfg.user,
            pkey=self.login.client_key,
            names=known_names(self.ip, self.port, self.host),
            keepalive=cfg.keepalive_s,
        )

    def new_transport(self, deadline: float) -> paramiko.Transport:
        """A new logged-in transport (not stored here), bounded by `deadline`."""
        kw = self.connect_kwargs(deadline)
        sock = transport = None
        try:
            sock = socket.create_connection((self.ip, self.port), timeout=kw["timeout"])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_S * 1000
                )
            transport = paramiko.Transport(
                sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
            )
            left = remaining(deadline)
            transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = left
            self._prefer_known_key_types(transport, kw["names"])
            internals.tune(transport)
            transport.start_client(timeout=remaining(deadline))
            done = transport.completion_event
            if done is None or not done.is_set():  # start_client returns quietly on timeout
                if transport.remote_version:
                    raise Unreachable(
                        R.CONNECT_TIMEOUT, f"{self.where}: key exchange did not finish in time"
                    )
                raise Unreachable(
                    R.NO_BANNER, f"{self.where}: no SSH banner within the connect timeout"
                )
            self.login.known_hosts.verify(
                transport.get_remote_server_key(), kw["names"], self.where
            )
            if kw["pkey"] is None:
                raise Untrusted(
                    R.AUTH_FAILED,
                    f"{self.where}: no client key (ssh.key_file empty, no ~/.ssh/id_*)",
                )
            transport.auth_timeout = max(0.1, remaining(deadline))
            if transport.auth_publickey(kw["user"], kw["pkey"]):
                raise Untrusted(R.AUTH_FAILED, f"{self.where}: server wants more than a public key")
            if kw["keepalive"]:
                transport.set_keepalive(max(1, int(kw["keepalive"])))
            internals.slow_transport_poll(sock)
            return transport
        except BaseException as e:
            if transport is not None:
                transport.close()
            elif sock is not None:
                sock.close()
            if isinstance(e, Exception):
                raise classify(e, self.where) from e
            raise

    def _prefer_known_key_types(self, transport: paramiko.Transport, names: list[str]) -> None:
        known = self.login.known_hosts.preferred_types(names)
        if not known:
            return
        base = {"rsa-sha2-512": "ssh-rsa", "rsa-sha2-256": "ssh-rsa"}
        opts = transport.get_security_options()
        types = list(opts.key_types)
        opts.key_types = [t for t in types if base.get(t, t) in known] + [
            t for t in types if base.get(t, t) not in known
        ]

    def close(self) -> None:
        """Close the connection (idempotent, never blocks for long); the next use reconnects.
        The socket is shut down first: that ends the transport thread's wait on it at once
        (closing alone leaves it until its poll timeout, ``internals.TRANSPORT_POLL_S``,
        with the TCP connection still open to the node meanwhile)."""
        with self._lock:
            t, self.transport = self.transport, None
        if t is not None:
            if isinstance(t.sock, socket.socket):
                with contextlib.suppress(OSError):
                    t.sock.shutdown(socket.SHUT_RDWR)
            t.close()
