"""Channels on a connection: exec, run to completion, stream, stdin.

Channel open and ``exec`` are bounded by the connect timeout; paramiko's
``exec_command`` waits without a bound for the server's reply, so a watchdog timer
closes the channel (and the connection: the host is silent) when it does not come.
``run`` is bounded by its ``timeout`` (``CommandTimeout``), ``stream`` by its
``idle_timeout`` per chunk.  At most ``ssh.max_channels`` run/stream channels per
connection at once, plus one reserved for probes, so a host whose channels are all
busy following job output is still probed (keep the sum under sshd's MaxSessions,
default 10).

Remote commands are built only by ``quote(argv)`` (``shlex.join``): the login shell
sees one word per argv item, whatever the bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import threading
import time
from collections.abc import Callable, Sequence

import paramiko

from mlbench_daemon.ssh import internals
from mlbench_daemon.ssh.connection import Connection, Watchdog, classify, remaining
from mlbench_daemon.ssh_errors import CommandTimeout, SSHError, Unreachable
from mlbench_daemon.vocabulary import SSHReason as R

log = logging.getLogger(__name__)

RECV_SIZE = 2**20


def quote(argv: Sequence[str]) -> str:
    """The only way a remote command string is built: one shell word per argv item."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError("argv must be a non-empty list of strings")
    return shlex.join(argv)


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
        code = internals.exit_status(self._chan, self.idle_timeout)
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
            close_channel(self._chan)
            self._release()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_channel(chan: paramiko.Channel) -> None:
    try:
        chan.close()
    except Exception:  # the transport is already gone: nothing left to close
        pass


def exec_command(
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
    if not slots.acquire(timeout=remaining(deadline)):
        raise Unreachable(
            R.SSH_ERROR, f"{conn.where}: all {conn.login.cfg.max_channels} channels busy"
        )
    chan = None
    try:
        chan = internals.open_session(transport, deadline)
        chan.set_combine_stderr(combine_stderr)
        with Watchdog(remaining(deadline), chan.close) as dog:
            try:
                chan.exec_command(command)
            except Exception as e:
                if dog.fired:
                    raise Unreachable(
                        R.CONNECT_TIMEOUT, f"{conn.where}: no answer to exec in time"
                    ) from None
                if isinstance(e, paramiko.SSHException) and conn.is_connected:
                    raise Unreachable(
                        R.SSH_ERROR,
                        f"{conn.where}: logged in, but the node did not start a command "
                        f"({e}: the user's process limit reached? a login shell failing?)",
                    ) from e
                raise
        return chan, slots.release
    except Exception as e:
        if chan is not None:
            close_channel(chan)
        slots.release()
        e = classify(e, conn.where)
        if e.reason in (R.CONNECT_TIMEOUT, R.CONNECTION_LOST) or not conn.is_connected:
            conn.close()  # a silent or dead connection: reconnect next time
        raise e


def run_true(conn: Connection, deadline: float) -> None:
    """Run `true` on conn (the probe channel) by deadline; raises on anything else."""
    chan, release = exec_command(conn, ["true"], deadline, probe=True, stdin=False)
    try:
        chan.settimeout(remaining(deadline))
        while chan.recv(RECV_SIZE):
            pass
        code = internals.exit_status(chan, remaining(deadline))
    finally:
        close_channel(chan)
        release()
    if code is None:
        raise Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: `true` did not finish in time")
    if code != 0:
        raise Unreachable(R.SSH_ERROR, f"{conn.where}: logged in, but `true` exited {code}")


def run(conn: Connection, argv: list[str], *, stdin: bytes = b"", timeout: float) -> Result:
    """Run argv to completion -> Result; raises CommandTimeout after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    chan, release = exec_command(
        conn,
        argv,
        min(deadline, time.monotonic() + conn.login.cfg.connect_timeout_s),
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
            r.join(remaining(deadline))
        if any(r.is_alive() for r in readers):
            raise CommandTimeout(
                f"{conn.where}: {quote(argv)[:200]} did not finish in {timeout:g} s"
            )
        if errors:  # (a failed stdin write shows here too if the link died)
            raise errors[0]
        code = internals.exit_status(chan, remaining(deadline))
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
        close_channel(chan)
        release()


def stream(
    conn: Connection,
    argv: list[str],
    *,
    stdin: bytes = b"",
    idle_timeout: float,
    ping: Callable[[], object],
) -> Stream:
    """Start argv and return a Stream of its combined output."""
    chan, release = exec_command(
        conn,
        argv,
        time.monotonic() + conn.login.cfg.connect_timeout_s,
        stdin=bool(stdin),
        combine_stderr=True,
    )
    chan.settimeout(idle_timeout)
    return Stream(conn, chan, release, idle_timeout, _Writer(chan, stdin), ping)


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
