"""Every use of paramiko's internals, in one place; tests/test_internals.py has one
test per item here, so an upgrade that changes one fails naming it.

- ``tune``: ``Transport.packetizer``'s rekey limits;
- ``open_session``: replaces ``Channel.in_buffer`` with ``ChunkPipe``, which must offer
  ``BufferedPipe``'s methods and raise its ``PipeTimeout``;
- ``exit_status``: waits on ``Channel.status_event``;
- ``slow_transport_poll``: the transport thread's socket timeout
  (``Transport._active_check_timeout``) raised to ``TRANSPORT_POLL_S``;
- ``open_failure``: ``paramiko.common``'s channel-open failure codes;
- ``global_request``: ``Transport.completion_event``, ``.global_response`` and
  ``._send_user_message``;
- ``forward_handler``: ``Transport._tcp_handler``, the one callback paramiko gives every
  ``forwarded-tcpip`` channel (``request_port_forward`` sets it, and would wait for the
  server's reply without a bound).
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable

import paramiko
from paramiko.buffered_pipe import PipeTimeout

TRANSPORT_POLL_S = 5.0  # see slow_transport_poll


# AES-GCM encrypts and authenticates in one pass in C; with paramiko's default
# (AES-CTR + a separate HMAC) a log stream costs the daemon about twice the CPU.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def tune(transport: paramiko.Transport) -> None:
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


def slow_transport_poll(sock: socket.socket) -> None:
    """After the login: paramiko's transport thread wakes every 0.1 s on its socket's
    timeout, only to see whether it was closed (close() does not wait for that) and whether
    a keepalive is due: with a second instead, 128 idle connections cost the daemon a tenth
    of the CPU; at 512 connections a wake-up a second each is about 1% of a core (an
    estimate from the 128-host idle figure: about 0.5% per 100 connections, not measured
    apart at 512), so it is the probe interval's 5 s.  Data still wakes it at once, and
    ``Connection.close`` shuts the socket down, which ends the thread's wait at once."""
    sock.settimeout(TRANSPORT_POLL_S)


def open_failure(exc: paramiko.ChannelException) -> str:
    """Why the server refused a channel open: "prohibited" (forwarding not allowed),
    "connect-failed" (it could not connect where asked) or "other"."""
    if exc.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
        return "prohibited"
    if exc.code == paramiko.common.OPEN_FAILED_CONNECT_FAILED:
        return "connect-failed"
    return "other"


Field = str | int


def global_request(
    transport: paramiko.Transport, kind: str, timeout: float, data: tuple[Field, ...] = ()
) -> paramiko.Message | bool | None:
    """Send global request `kind` (then `data`: strings and uint32s) wanting a reply -> the
    reply's message after its type (accepted), False (refused), None (no reply within
    `timeout`).

    paramiko's ``global_request(wait=True)`` waits without a bound, on the one completion
    event of the transport: two requests at once share it, and a key exchange ending sets
    it too.  So callers serialise requests per connection (``Connection.global_request``),
    and a server-started rekey finishing meanwhile reads as a refusal (harmless for a
    keepalive: any answer proves the session).
    """
    event = threading.Event()
    transport.global_response = None
    transport.completion_event = event
    m = paramiko.Message()
    m.add_byte(paramiko.common.cMSG_GLOBAL_REQUEST)
    m.add_string(kind)
    m.add_boolean(True)
    for field in data:
        if isinstance(field, int):
            m.add_int(field)
        else:
            m.add_string(field)
    transport._send_user_message(m)  # type: ignore[attr-defined]
    if not event.wait(timeout):
        return None
    reply: paramiko.Message | None = transport.global_response
    return False if reply is None else reply


ForwardHandler = Callable[[paramiko.Channel, tuple[str, int], tuple[str, int]], None]


def forward_handler(transport: paramiko.Transport, handler: ForwardHandler | None) -> None:
    """Give every ``forwarded-tcpip`` channel of `transport` to `handler` (called on the
    transport's thread, after paramiko accepted the channel); None refuses them."""
    transport._tcp_handler = handler  # type: ignore[attr-defined]


def exit_status(chan: paramiko.Channel, timeout: float) -> int | None:
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


def open_session(transport: paramiko.Transport, deadline: float) -> paramiko.Channel:
    """A session channel; sshd refuses opens over MaxSessions until our last close has
    reached it (we free a slot when we send CLOSE), so a refusal is retried until `deadline`.
    (With opens in parallel paramiko may report a refusal as a bare "Unable to open channel.")"""
    pause = 0.01
    while True:
        try:
            chan = transport.open_session(timeout=max(0.01, max(0.0, deadline - time.monotonic())))
            chan.in_buffer = ChunkPipe()  # type: ignore[assignment]  # no data can be there yet
            return chan
        except paramiko.SSHException:
            if not transport.is_active() or max(0.0, deadline - time.monotonic()) < pause:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


class ChunkPipe:
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
