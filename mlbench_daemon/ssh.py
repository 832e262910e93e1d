"""The SSH pool: one persistent paramiko connection per host, host keys verified.

Every blocking step has a bound:

- connect: TCP connect, banner, key exchange and auth share one deadline of
  ``ssh.connect_timeout_s`` (paramiko's own banner/handshake/auth timeouts are
  set from what is left of it);
- channel open and ``exec``: bounded by the same connect timeout; paramiko's
  ``exec_command`` waits without a bound for the server's reply, so a watchdog
  timer closes the channel (and the connection: the host is silent) when it
  does not come;
- data: ``run`` is bounded by its ``timeout`` (``CommandTimeout``), ``stream``
  by its ``idle_timeout`` per chunk, ``probe`` by the connect timeout overall.

Failures are mapped to ``Unreachable`` / ``Untrusted`` in one place,
``classify()``.  A connection that failed is closed; the next use reconnects
(and counts a reconnect).

Channels: at most ``ssh.max_channels`` run/stream channels per connection at
once, plus one reserved for probes, so a host whose channels are all busy
following job output is still probed (keep the sum under sshd's MaxSessions,
default 10).

Remote commands are built only by ``quote(argv)`` (``shlex.join``): the login
shell sees one word per argv item, whatever the bytes.

An established connection proves nothing about the next login (sshd's listener
can be stopped, hung, re-keyed, or the key revoked while old sessions live), so
besides ``probe`` (a command on the persistent connection) there are:

- ``check_listener``: a fresh TCP connect to the node's sshd and its banner
  (no crypto), made by the node itself through the persistent connection (a
  ``direct-tcpip`` channel to the node's own address and port); after the banner
  it sends an identification string and a disconnect (reason 11, "by
  application"), so sshd logs a clean "Received disconnect ... listener check".
  Made from the node, the check's pre-auth disconnect is logged against the
  node's own address, which fail2ban never bans (``ignoreself``); made from here,
  fail2ban's sshd filter in ddos/aggressive mode counts every such disconnect as
  a failure and would ban the head within minutes.  When the node forbids
  forwarding (``AllowTcpForwarding no``) the check connects from here instead.
- ``verify_login``: a full fresh login on a new connection (key exchange with the
  host-key check, auth, then ``true``), closed at once.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import shlex
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paramiko
from paramiko.buffered_pipe import PipeTimeout

from mlbench_daemon import config
from mlbench_daemon.config import ConfigError
from mlbench_daemon.known_hosts import (
    SYSTEM_KNOWN_HOSTS,
    KnownHosts,
    KnownKey,
    fingerprint,
    known_names,
    parse_known_hosts,
)
from mlbench_daemon.ssh_errors import (
    CommandTimeout,
    SSHError,
    Unreachable,
    Untrusted,
)
from mlbench_daemon.vocabulary import SSHReason as R

log = logging.getLogger(__name__)


# paramiko.transport logs each refused channel open as an ERROR (a listener check whose
# node cannot connect to its own sshd: one every probe round), and each exception in a
# transport's thread as one ERROR record per line of its traceback (a listener that
# sends no banner: one every fresh login).  Every such failure reaches our caller as an
# exception, and the daemon reports it once, as a node's reason or a job's error.
# `--log-level debug` shows paramiko's records too (logs.py).
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

# The error classes and host-key helpers live in their own modules; they are
# re-exported here so that `from mlbench_daemon.ssh import Unreachable` keeps working.
__all__ = [
    "SYSTEM_KNOWN_HOSTS",
    "CommandTimeout",
    "KnownHosts",
    "KnownKey",
    "Pool",
    "Result",
    "SSHError",
    "Stream",
    "Unreachable",
    "Untrusted",
    "classify",
    "fingerprint",
    "known_names",
    "load_client_key",
    "parse_known_hosts",
    "quote",
]

DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")  # under ~/.ssh when ssh.key_file is empty
# Per-channel receive window and the largest packet we accept.  Following 1 GB of job
# output on the test cluster: 32 KiB packets (paramiko's default) cost the daemon
# 5.0-5.6 s of CPU, 128 KiB 4.4-4.7 s (sshd then sends about 64 KiB per packet);
# 2-16 MiB windows made no clear difference and 64 MiB was much slower.
WINDOW_SIZE = 16 * 2**20
MAX_PACKET_SIZE = 2**17
RECV_SIZE = 2**20
TCP_USER_TIMEOUT_S = 30  # unacknowledged data for this long kills the socket (frozen peer)
TRANSPORT_POLL_S = 1.0  # see _connect
CHECK_IDENT = b"SSH-2.0-mlbench-daemon-check\r\n"
MAX_BANNER = 8192  # sshd may send text lines before its SSH- line (RFC 4253 4.2)
# A listener check made from here ends in a pre-auth disconnect that fail2ban's sshd
# filter (aggressive, ddos) counts as a failure; it bans at 5 within 10 minutes by
# default, so from here a node's listener is checked at most this often.
HEAD_CHECK_EVERY_S = 180.0


# AES-GCM encrypts and authenticates in one pass in C; with paramiko's default
# (AES-CTR + a separate HMAC) a log stream costs the daemon about twice the CPU.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _tune(transport: paramiko.Transport) -> None:
    """Fast ciphers first; leave rekeying to the server.

    paramiko's own rekey (every 512 MiB) races with a busy session channel and can stall
    it for 30 s, then drop it ("Key-exchange timed out waiting for key negotiation",
    paramiko issue #822).  The workaround its users settled on: never start a rekey
    ourselves and let OpenSSH's sshd rekey by its RekeyLimit; paramiko answers those.
    """
    opts = transport.get_security_options()
    opts.ciphers = [c for c in FAST_CIPHERS if c in opts.ciphers] + [
        c for c in opts.ciphers if c not in FAST_CIPHERS
    ]
    transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = 2**62


def quote(argv: Sequence[str]) -> str:
    """The only way a remote command string is built: one shell word per argv item."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError("argv must be a non-empty list of strings")
    return shlex.join(argv)


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
        stream.settimeout(max(0.01, _remaining(deadline)))
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


class _Watchdog:
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

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class Connection:
    """One persistent SSH connection to (ip, port): opens lazily, closes in one place."""

    def __init__(self, pool: Pool, ip: str, port: int) -> None:
        self.pool, self.ip, self.port = pool, ip, port
        self.host: str | None = None
        self.where = f"{ip}:{port}"
        self.transport: paramiko.Transport | None = None
        self.connects = 0
        self.uname: tuple[int, str | None] = (0, None)  # (connects when asked, `uname -n`)
        self.channels = threading.BoundedSemaphore(pool.cfg.max_channels)
        self.probe_channel = threading.BoundedSemaphore(1)
        self.forwarding = True  # check_listener through this connection (until refused)
        # (monotonic, error or None, seconds) of the last listener check made from here
        self.head_check: tuple[float, SSHError | None, float] | None = None
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
        if not self._open_lock.acquire(timeout=_remaining(deadline)):
            raise Unreachable(
                R.CONNECT_TIMEOUT, f"{self.where}: another connect did not finish in time"
            )
        try:
            if self.transport is not None and self.is_connected:
                return self.transport
            self.close()
            if not self.pool._connects.acquire(timeout=_remaining(deadline)):
                raise Unreachable(R.CONNECT_TIMEOUT, f"{self.where}: too many connects in flight")
            try:
                t = self._connect(deadline)
            finally:
                self.pool._connects.release()
            with self._lock:
                self.transport = t
            self.connects += 1
            if self.connects > 1:
                self.pool._reconnected(self)
            return t
        finally:
            self._open_lock.release()

    def connect_kwargs(self, deadline: float) -> dict[str, Any]:
        """Everything a connect depends on, gathered in one place."""
        cfg = self.pool.cfg
        return dict(
            timeout=_remaining(deadline),
            user=cfg.user,
            pkey=self.pool.client_key,
            names=known_names(self.ip, self.port, self.host),
            keepalive=cfg.keepalive_s,
        )

    def _connect(self, deadline: float) -> paramiko.Transport:
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
            left = _remaining(deadline)
            transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = left
            self._prefer_known_key_types(transport, kw["names"])
            _tune(transport)
            transport.start_client(timeout=_remaining(deadline))
            done = transport.completion_event
            if done is None or not done.is_set():  # start_client returns quietly on timeout
                if transport.remote_version:
                    raise Unreachable(
                        R.CONNECT_TIMEOUT, f"{self.where}: key exchange did not finish in time"
                    )
                raise Unreachable(
                    R.NO_BANNER, f"{self.where}: no SSH banner within the connect timeout"
                )
            self.pool.known_hosts.verify(transport.get_remote_server_key(), kw["names"], self.where)
            if kw["pkey"] is None:
                raise Untrusted(
                    R.AUTH_FAILED,
                    f"{self.where}: no client key (ssh.key_file empty, no ~/.ssh/id_*)",
                )
            transport.auth_timeout = max(0.1, _remaining(deadline))
            if transport.auth_publickey(kw["user"], kw["pkey"]):
                raise Untrusted(R.AUTH_FAILED, f"{self.where}: server wants more than a public key")
            if kw["keepalive"]:
                transport.set_keepalive(max(1, int(kw["keepalive"])))
            # paramiko's transport thread wakes every 0.1 s on its socket's timeout, only to
            # see whether it was closed (close() does not wait for that) and whether a
            # keepalive is due: with a second instead, 128 idle connections cost the daemon
            # a tenth of the CPU.  Data still wakes it at once.
            sock.settimeout(TRANSPORT_POLL_S)
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
        known = self.pool.known_hosts.preferred_types(names)
        if not known:
            return
        base = {"rsa-sha2-512": "ssh-rsa", "rsa-sha2-256": "ssh-rsa"}
        opts = transport.get_security_options()
        types = list(opts.key_types)
        opts.key_types = [t for t in types if base.get(t, t) in known] + [
            t for t in types if base.get(t, t) not in known
        ]

    def close(self) -> None:
        """Close the connection (idempotent, never blocks for long); the next use reconnects."""
        with self._lock:
            t, self.transport = self.transport, None
        if t is not None:
            t.close()


@dataclasses.dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: bytes
    stderr: bytes


class Stream:
    """Output of a remote command as it arrives (stdout and stderr combined).

    Iterate for bytes chunks; ``.exit_code`` is set after the last one (-1 if the
    command died by a signal).  When nothing arrives for ``idle_timeout`` seconds
    the host is probed: a silent command on a live host is waited for as long as
    it runs; a failed probe (frozen or unreachable host, dead link) raises
    Unreachable(connection-lost), as does a link that dies.  ``close()`` (or
    leaving a with-block) closes the channel.
    """

    def __init__(
        self,
        conn: Connection,
        chan: paramiko.Channel,
        release: Callable[[], None],
        idle_timeout: float,
        writer: _Writer,
        ping: Callable[[], object],
    ) -> None:
        self._conn, self._chan, self._release, self._writer = conn, chan, release, writer
        self.idle_timeout, self._ping = idle_timeout, ping
        self.exit_code: int | None = None
        self._closed = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        while True:
            try:
                data = self._chan.recv(RECV_SIZE)
                break
            except TimeoutError:
                try:
                    self._ping()
                except SSHError as e:
                    self.close()
                    raise self._lost(f"no output for {self.idle_timeout:g} s and {e}") from None
            except Exception as e:
                self.close()
                raise self._lost(str(e)) from e
        if data:
            return data
        code = _exit_status(self._chan, self.idle_timeout)
        self.close()
        if code is None:
            raise self._lost("output ended without an exit status")
        self.exit_code = code
        raise StopIteration

    def _lost(self, why: str) -> Unreachable:
        alive = self._conn.is_connected
        if not alive:
            self._conn.close()
        state = "connection alive" if alive else "connection dead"
        return Unreachable(R.CONNECTION_LOST, f"{self._conn.where}: {why} ({state})")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.stop()
            _close_channel(self._chan)
            self._release()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_channel(chan: paramiko.Channel) -> None:
    try:
        chan.close()
    except Exception:  # the transport is already gone: nothing left to close
        pass


def _exit_status(chan: paramiko.Channel, timeout: float) -> int | None:
    """The exit status after EOF, None if the channel closed without one in `timeout`.

    paramiko reports -1 for "no exit-status"; that is a signal death if the
    transport is still up, and a lost connection otherwise.
    """
    if not chan.status_event.wait(timeout):
        return None
    code = chan.exit_status
    if code == -1 and not chan.get_transport().is_active():
        return None
    return code


class Pool:
    """Persistent SSH connections keyed by (ip, port), shared by all threads."""

    def __init__(
        self, cfg: config.Ssh, on_reconnect: Callable[[str, int], object] | None = None
    ) -> None:
        self.cfg = cfg
        self.client_key = load_client_key(cfg.key_file)
        self.known_hosts = KnownHosts(
            cfg.known_hosts, cfg.use_system_known_hosts, cfg.host_key_policy
        )
        self.on_reconnect = on_reconnect
        self.reconnects = 0
        self._conns: dict[tuple[str, int], Connection] = {}
        self._lock = threading.Lock()
        self._connects = threading.BoundedSemaphore(cfg.max_connects)

    # --- public API -----------------------------------------------------------------

    def probe(self, ip: str, port: int, host: str | None = None) -> float:
        """Seconds it took to log in (if needed) and run `true`; bounded by the connect timeout."""
        start = time.monotonic()
        deadline = start + self.cfg.connect_timeout_s
        conn = self.connection(ip, port, host)
        try:
            self._true(conn, deadline)
            return time.monotonic() - start
        except Exception as e:
            conn.close()
            raise classify(e, conn.where) from e

    def check_listener(
        self, ip: str, port: int, host: str | None = None, timeout: float | None = None
    ) -> float:
        """Seconds for a fresh TCP connect to the node's sshd and its banner (see the module
        docstring); bounded by `timeout` (default the connect timeout).  Raises Unreachable:
        connection-refused, no-banner, connect-timeout, ..."""
        start = time.monotonic()
        timeout = self.cfg.connect_timeout_s if timeout is None else timeout
        deadline = start + timeout
        conn = self.connection(ip, port, host)
        t = conn.transport
        if t is not None and conn.forwarding and conn.is_connected:
            where = f"{conn.where} (new connection, made from the node)"
            try:
                chan = t.open_channel(
                    "direct-tcpip", (ip, port), ("127.0.0.1", 0), timeout=_remaining(deadline)
                )
            except paramiko.ChannelException as e:
                if e.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                    log.warning(
                        "%s: the node forbids TCP forwarding; its listener is checked from here",
                        conn.where,
                    )
                    conn.forwarding = False
                elif e.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED:
                    # paramiko drops sshd's own text ("Connection refused"): ask from here,
                    # which also tells a stopped listener from an address the node does not
                    # have (NAT between us and it: then check from here from now on)
                    took = self._connect_for_banner(conn, deadline, timeout, start)
                    log.warning(
                        "%s: the node cannot connect to its own address, but we can; "
                        "its listener is checked from here",
                        conn.where,
                    )
                    conn.forwarding = False
                    return took
                else:
                    raise _forward_failure(e, where) from None
            except Exception as e:
                raise classify(e, where) from e
            else:
                try:
                    return _exchange_banners(chan, where, timeout, deadline, start)
                finally:
                    _close_channel(chan)
        return self._check_listener_here(conn, deadline, timeout, start)

    def _check_listener_here(
        self, conn: Connection, deadline: float, timeout: float, start: float
    ) -> float:
        last = conn.head_check
        if last is not None and time.monotonic() - last[0] < HEAD_CHECK_EVERY_S:
            if last[1] is not None:
                raise last[1]
            return last[2]
        try:
            took = self._connect_for_banner(conn, deadline, timeout, start)
        except SSHError as e:
            conn.head_check = (time.monotonic(), e, 0.0)
            raise
        conn.head_check = (time.monotonic(), None, took)
        return took

    def _connect_for_banner(
        self, conn: Connection, deadline: float, timeout: float, start: float
    ) -> float:
        where = f"{conn.where} (new connection)"
        try:
            sock = socket.create_connection(
                (conn.ip, conn.port), timeout=max(0.01, _remaining(deadline))
            )
        except Exception as e:
            raise classify(e, where) from e
        with sock:
            return _exchange_banners(sock, where, timeout, deadline, start)

    def verify_login(self, ip: str, port: int, host: str | None = None) -> float:
        """Seconds for a full fresh login on a new connection: key exchange with the host-key
        check, public-key auth, then `true`; closed at once.  Bounded by the connect timeout.
        Raises Untrusted (host-key-changed, host-key-unknown, auth-failed) or Unreachable."""
        start = time.monotonic()
        deadline = start + self.cfg.connect_timeout_s
        conn = Connection(self, ip, port)  # not in the pool: used once
        conn.host = host or self.connection(ip, port).host
        conn.where = f"{conn.where} (fresh login)"
        try:
            if not self._connects.acquire(timeout=_remaining(deadline)):
                raise Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: too many connects in flight")
            try:
                conn.transport = conn._connect(deadline)
            finally:
                self._connects.release()
            self._true(conn, deadline)
            return time.monotonic() - start
        except Exception as e:
            raise classify(e, conn.where) from e
        finally:
            conn.close()

    def _true(self, conn: Connection, deadline: float) -> None:
        """Run `true` on conn (the probe channel) by deadline; raises on anything else."""
        chan, release = self._exec(conn, ["true"], deadline, probe=True, stdin=False)
        try:
            chan.settimeout(_remaining(deadline))
            while chan.recv(RECV_SIZE):
                pass
            code = _exit_status(chan, _remaining(deadline))
        finally:
            _close_channel(chan)
            release()
        if code is None:
            raise Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: `true` did not finish in time")
        if code != 0:
            raise Unreachable(R.SSH_ERROR, f"{conn.where}: logged in, but `true` exited {code}")

    def run(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", timeout: float
    ) -> Result:
        """Run argv to completion -> Result; raises CommandTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        conn = self.connection(ip, port)
        chan, release = self._exec(
            conn,
            argv,
            min(deadline, time.monotonic() + self.cfg.connect_timeout_s),
            stdin=bool(stdin),
        )
        writer = None
        try:
            chan.settimeout(timeout)
            out, err, errors = bytearray(), bytearray(), list[BaseException]()
            readers = [
                _thread(_drain, chan.recv, out, errors),
                _thread(_drain, chan.recv_stderr, err, errors),
            ]
            writer = _Writer(chan, stdin)
            for r in readers:
                r.join(_remaining(deadline))
            if any(r.is_alive() for r in readers):
                raise CommandTimeout(
                    f"{conn.where}: {quote(argv)[:200]} did not finish in {timeout:g} s"
                )
            if errors:  # (a failed stdin write shows here too if the link died)
                raise errors[0]
            code = _exit_status(chan, _remaining(deadline))
            if code is None:
                if conn.is_connected:
                    raise CommandTimeout(f"{conn.where}: no exit status within {timeout:g} s")
                raise Unreachable(R.CONNECTION_LOST, f"{conn.where}: connection lost while running")
            return Result(code, bytes(out), bytes(err))
        except CommandTimeout:
            raise
        except Exception as e:
            if not conn.is_connected:
                conn.close()
            raise classify(e, conn.where) from e
        finally:
            if writer is not None:
                writer.stop()
            _close_channel(chan)
            release()

    def stream(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", idle_timeout: float
    ) -> Stream:
        """Start argv and return a Stream of its combined output."""
        conn = self.connection(ip, port)
        chan, release = self._exec(
            conn,
            argv,
            time.monotonic() + self.cfg.connect_timeout_s,
            stdin=bool(stdin),
            combine_stderr=True,
        )
        chan.settimeout(idle_timeout)
        return Stream(
            conn, chan, release, idle_timeout, _Writer(chan, stdin), lambda: self.probe(ip, port)
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

    def drop(self, ip: str, port: int) -> None:
        """Forget and close the connection to (ip, port)."""
        with self._lock:
            conn = self._conns.pop((ip, port), None)
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
                conn = self._conns[(ip, port)] = Connection(self, ip, port)
            if host:
                conn.host = host
            return conn

    # --- internals ------------------------------------------------------------------

    def _reconnected(self, conn: Connection) -> None:
        with self._lock:
            self.reconnects += 1
        if self.on_reconnect is not None:
            try:
                self.on_reconnect(conn.ip, conn.port)
            except Exception:
                log.exception("on_reconnect callback failed")

    def _exec(
        self,
        conn: Connection,
        argv: list[str],
        deadline: float,
        *,
        stdin: bool,
        probe: bool = False,
        combine_stderr: bool = False,
    ) -> tuple[paramiko.Channel, Callable[[], None]]:
        """Open a session channel on `conn` and exec argv -> (channel, release); all by `deadline`.

        Without stdin the command reads /dev/null instead of waiting for our EOF:
        paramiko can send that EOF after the channel's CLOSE when the command ends
        first (paramiko#1115), and sshd then drops the whole connection.
        """
        command = quote(argv) if stdin else quote(argv) + " </dev/null"
        transport = conn.open(deadline)
        slots = conn.probe_channel if probe else conn.channels
        if not slots.acquire(timeout=_remaining(deadline)):
            raise Unreachable(
                R.SSH_ERROR, f"{conn.where}: all {self.cfg.max_channels} channels busy"
            )
        chan = None
        try:
            chan = _open_session(transport, deadline)
            chan.set_combine_stderr(combine_stderr)
            with _Watchdog(_remaining(deadline), chan.close) as dog:
                try:
                    chan.exec_command(command)
                except Exception:
                    if dog.fired:
                        raise Unreachable(
                            R.CONNECT_TIMEOUT, f"{conn.where}: no answer to exec in time"
                        ) from None
                    raise
            return chan, slots.release
        except Exception as e:
            if chan is not None:
                _close_channel(chan)
            slots.release()
            e = classify(e, conn.where)
            if e.reason in (R.CONNECT_TIMEOUT, R.CONNECTION_LOST) or not conn.is_connected:
                conn.close()  # a silent or dead connection: reconnect next time
            raise e


def _open_session(transport: paramiko.Transport, deadline: float) -> paramiko.Channel:
    """A session channel; sshd refuses opens over MaxSessions until our last close has
    reached it (we free a slot when we send CLOSE), so a refusal is retried until `deadline`.
    (With opens in parallel paramiko may report a refusal as a bare "Unable to open channel.")"""
    pause = 0.01
    while True:
        try:
            chan = transport.open_session(timeout=max(0.01, _remaining(deadline)))
            chan.in_buffer = _ChunkPipe()  # type: ignore[assignment]  # no data can be there yet
            return chan
        except paramiko.SSHException:
            if not transport.is_active() or _remaining(deadline) < pause:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


class _ChunkPipe:
    """paramiko's ``BufferedPipe`` (a channel's receive buffer), keeping each packet
    as the bytes object paramiko made of it.

    The stock pipe copies every byte three times (into an ``array``, out through
    a slice, into ``bytes``); following a job's output is bound by memory copies,
    so this pipe hands over whole packets and joins only when a read spans
    several.  Same interface and semantics (``read`` blocks, raises
    ``PipeTimeout``, returns b"" once closed and empty).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._event: threading.Event | None = None
        self._closed = False

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if data:
                self._chunks.append(bytes(data))
                self._size += len(data)
            if self._event is not None:
                self._event.set()
            self._cv.notify_all()

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._size and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PipeTimeout()
                self._cv.wait(left)
            return self._take(nbytes)

    def _take(self, nbytes: int) -> bytes:
        parts, n = [], 0
        while self._chunks and n < nbytes:
            chunk = self._chunks.popleft()
            if n + len(chunk) > nbytes:
                chunk, rest = chunk[: nbytes - n], chunk[nbytes - n :]
                self._chunks.appendleft(rest)
            parts.append(chunk)
            n += len(chunk)
        self._size -= n
        if not self._size and self._event is not None and not self._closed:
            self._event.clear()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def empty(self) -> bytes:
        with self._lock:
            return self._take(self._size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cv.notify_all()
            if self._event is not None:
                self._event.set()

    def __len__(self) -> int:
        with self._lock:
            return self._size


def _thread(target: Callable[..., object], *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _drain(recv: Callable[[int], bytes], buf: bytearray, errors: list[BaseException]) -> None:
    try:
        while data := recv(RECV_SIZE):
            buf += data
    except Exception as e:
        errors.append(e)


class _Writer:
    """Feeds stdin, then EOF, in its own thread (so output is drained meanwhile).

    sshd drops the whole connection on data or EOF for a channel it has already
    freed, and paramiko sends those outside its channel lock (paramiko#1115).
    So every send here happens under ``self._lock``, only while the window is
    open (never blocking on it) and only while the command is still running;
    ``stop()`` takes the lock before we close the channel.  What is left is
    paramiko's own CLOSE reply racing our last write when a command exits
    without reading its stdin to the end: give stdin only to commands that read
    it all.  No stdin: nothing is sent (the command reads /dev/null).
    """

    POLL_S = 0.002  # wait for window while the remote is not reading

    def __init__(self, chan: paramiko.Channel, data: bytes) -> None:
        self.chan = chan
        self._lock = threading.Lock()
        self._stopped = False
        if data:
            _thread(self._feed, memoryview(data))

    def _feed(self, view: memoryview) -> None:
        chan = self.chan
        try:
            while True:
                with self._lock:
                    if self._stopped or chan.closed or chan.exit_status_ready():
                        return
                    if not view:
                        chan.shutdown_write()
                        return
                    if chan.send_ready():
                        view = view[chan.send(bytes(view[: 2**15])) :]  # sshd's packet size
                        continue
                time.sleep(self.POLL_S)
        except Exception as e:  # the command stopped reading or the link died: readers see it
            log.debug("stdin write stopped: %s", e)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
