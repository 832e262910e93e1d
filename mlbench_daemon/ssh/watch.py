"""The probe loop: one long-lived channel per node answering one line per probe round.

Opening channels is what a probe round used to cost: an exec of `true` and a
``direct-tcpip`` listener check are about 17 encrypted packets, each parsed in Python,
and a timer thread per exec (about 1.2-2 ms of the daemon's CPU per node and round).
Here the persistent connection runs one small python3 loop (``SCRIPT``, fixed text)
for its whole life; a round is one line each way (two packets):

- the head writes ``p T`` (a plain round) or ``l T`` (with a listener check), T the
  seconds the node may spend;
- the node looks at its own sshd listener without connecting to it: the listening
  socket on the session's local port in ``/proc/net/tcp{,6}`` and its accept queue.
  It connects to the listener (banner, identification, disconnect: what
  ``listener.py`` does over ``direct-tcpip``) when asked, and at once when that
  socket is gone or holds unaccepted connections (a hung listener);
- it answers ``ok`` with those facts, its load, and the ``/proc`` counters a run's
  samples need (CPU jiffies, memory, network bytes).

sshd writes nothing to its log for a round without a listener check, so the node's
auth log gets two lines per listener check instead of per round.  The check comes
from the node's own address, which fail2ban never bans (``ignoreself``), and needs no
forwarding.  A loop proves the session is alive, not that a new command can start
(the user's process limit reached, a hung home directory): the registry still runs
`true` on the session every ``EXEC_EVERY_S``.  A node without python3 has no loop
(``round`` answers None): the caller checks it the old way.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import paramiko

from mlbench_daemon.ssh import internals
from mlbench_daemon.ssh.channels import close_channel, exec_command
from mlbench_daemon.ssh.connection import Connection, classify, remaining
from mlbench_daemon.ssh.listener import CHECK_BYE, MAX_BANNER
from mlbench_daemon.ssh_errors import ListenerDown, SSHError, Unreachable
from mlbench_daemon.vocabulary import SSHReason as R

KEEPALIVE = "keepalive@openssh.com"
KEEPALIVE_S = 1.0  # at most this much of a round is kept for the keepalive's answer
MISSING = 127  # the shell's exit code for a command not found (no python3 there)
MAX_LINE = 4096

# argv[1]: the listener check's goodbye (hex); argv[2]: the port we connect to, used when
# SSH_CONNECTION does not say the session's local address and port.
# The first line names the loop in the node's process list (`ps`), for its operators and
# for the tests that look for what a job left behind.
MARK = "mlbench-daemon probe loop"
SCRIPT = (
    f"# {MARK}\n"
    + r"""import os, socket, sys
bye = bytes.fromhex(sys.argv[1])
c = os.environ.get("SSH_CONNECTION", "").split()
addr = (c[2], int(c[3])) if len(c) == 4 else ("127.0.0.1", int(sys.argv[2]))
def listening():
    n = q = 0
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for r in rows:
            p = r.split()
            if p[3] == "0A" and int(p[1].rsplit(":", 1)[1], 16) == addr[1]:
                n, q = n + 1, max(q, int(p[4].split(":")[1], 16))
    return n, q
def banner(t):
    try:
        s = socket.create_connection(addr, t)
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "timeout" if isinstance(e, socket.timeout) else "error:%s" % e.errno
    with s:
        s.settimeout(t)
        d = b""
        try:
            while not any(x.startswith(b"SSH-") for x in d.split(b"\n")[:-1]):
                r = s.recv(1024)
                if not r:
                    return "closed"
                d += r
                if len(d) > MAX_BANNER:
                    return "garbage"
            s.sendall(bye)
        except socket.timeout:
            return "nobanner"
        except OSError as e:
            return "error:%s" % e.errno
    return "ok"
def rows(path):
    try:
        with open(path) as f:
            return [r.split() for r in f.read().splitlines()]
    except OSError:
        return []
while True:
    line = sys.stdin.buffer.readline().split()
    if not line:
        break
    n, q = listening()
    b = banner(float(line[1])) if line[0] == b"l" or not n or q else "-"
    cpu = [int(x) for x in (rows("/proc/stat") or [[]])[0][1:9]]
    mem = {r[0]: r[1] for r in rows("/proc/meminfo")[:3] if len(r) > 1}
    net = [r for r in rows("/proc/net/dev")[2:] if len(r) > 9 and r[0] != "lo:"]
    rx = sum(int(r[1]) for r in net)
    tx = sum(int(r[9]) for r in net)
    load = ((rows("/proc/loadavg") or [[]])[0] or ["-1"])[0]
    busy = sum(cpu) - sum(cpu[3:5])
    sys.stdout.write("ok %d %d %s %s %d %d %s %s %d %d\n" % (
        n, q, b, load, busy, sum(cpu), mem.get("MemAvailable:", "-1"),
        mem.get("MemTotal:", "-1"), rx, tx))
    sys.stdout.flush()
""".replace("MAX_BANNER", str(MAX_BANNER))
)


def loop_argv(port: int) -> list[str]:
    """The loop's command.  -E -S: no PYTHON* variables, no site packages: it needs
    neither, and it starts in about half the time (every reconnect of a node starts one)."""
    return ["python3", "-E", "-S", "-c", SCRIPT, CHECK_BYE.hex(), str(port)]


# the node's listener check outcome -> (reason, what it saw)
BANNER = {
    "refused": (R.CONNECTION_REFUSED, "connection refused"),
    "timeout": (R.CONNECT_TIMEOUT, "TCP connect timed out"),
    "closed": (R.NO_BANNER, "connection closed before the SSH banner"),
    "nobanner": (R.NO_BANNER, "no SSH banner in time"),
    "garbage": (R.NO_BANNER, f"no SSH- line in the first {MAX_BANNER} bytes"),
}


@dataclasses.dataclass(frozen=True)
class Answer:
    """One round's answer: the node's view of its sshd listener, and its counters."""

    seconds: float  # the round trip
    listening: int  # listening sockets on sshd's port (0: the listener is gone)
    backlog: int  # connections the listener has not accepted yet
    checked: bool  # the node connected to its listener this round (and it answered)
    load1: float
    cpu_busy: int  # jiffies since boot, all CPUs (for rates between two answers)
    cpu_total: int
    mem_available_kb: int
    mem_total_kb: int
    net_rx_bytes: int  # every interface but lo
    net_tx_bytes: int


def parse(line: bytes, seconds: float, where: str) -> Answer:
    """The loop's answer line -> Answer; Unreachable with the node's reason when its
    listener check failed."""
    w = line.decode(errors="replace").split()
    if len(w) != 11 or w[0] != "ok":
        raise Unreachable(R.SSH_ERROR, f"{where}: the probe loop answered {line[:100]!r}")
    banner = w[3]
    if banner not in ("ok", "-"):
        reason, saw = BANNER.get(banner, (R.CONNECTION_LOST, f"connect failed ({banner})"))
        raise ListenerDown(reason, f"{where} (new connection, made from the node): {saw}")
    try:
        numbers = [int(x) for x in w[1:3]] + [float(w[4])] + [int(x) for x in w[5:]]
    except ValueError:
        raise Unreachable(R.SSH_ERROR, f"{where}: the probe loop answered {line[:100]!r}") from None
    listening, backlog, load1, *counters = numbers
    return Answer(seconds, int(listening), int(backlog), banner == "ok", load1, *map(int, counters))


@dataclasses.dataclass
class Loop:
    """The probe loop of one connection."""

    chan: paramiko.Channel | None = None
    connects: int = 0  # the connection's `connects` when the loop started
    missing: bool = False  # it cannot run on this connection (no python3): rounds answer None
    buf: bytes = b""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    exec_at: float = -1e18  # monotonic: the last new exec that worked on this session
    checked_at: float = -1e18  # monotonic: the node's last listener check that worked
    last: tuple[float, Answer] | None = None  # the newest answer and its time (epoch)

    def live(self, conn: Connection) -> bool:
        chan = self.chan
        return (
            chan is not None
            and not chan.closed
            and self.connects == conn.connects
            and conn.is_connected
        )


class Watches:
    """The probe loops of a pool's connections."""

    def __init__(self) -> None:
        self._loops: dict[tuple[str, int], Loop] = {}
        self._lock = threading.Lock()

    def loop(self, ip: str, port: int) -> Loop:
        with self._lock:
            return self._loops.setdefault((ip, port), Loop())

    def forget(self, ip: str, port: int) -> None:
        with self._lock:
            loop = self._loops.pop((ip, port), None)
        if loop is not None and loop.chan is not None:
            close_channel(loop.chan)

    def ages(self, conn: Connection) -> tuple[float, float] | None:
        """(seconds since the last new exec on conn's session, since the node's last
        listener check) while its loop runs; None when it does not."""
        loop = self.loop(conn.ip, conn.port)
        if not loop.live(conn):
            return None
        now = time.monotonic()
        return now - loop.exec_at, now - loop.checked_at

    def last(self, ip: str, port: int) -> tuple[float, Answer] | None:
        """The newest answer of (ip, port)'s loop and when it came (epoch seconds); None
        before the first.  Read, never asked: a run's node samples are these counters."""
        with self._lock:
            loop = self._loops.get((ip, port))
        return None if loop is None else loop.last

    def executed(self, conn: Connection) -> None:
        """A new command just ran on conn's session (`true`)."""
        self.loop(conn.ip, conn.port).exec_at = time.monotonic()

    def round(self, conn: Connection, *, listener: bool, timeout: float) -> Answer | None:
        """One round on conn's loop (started first if needed: a new exec, connecting if
        needed) -> Answer, or None when no loop can run there.  Bounded by `timeout`.
        Raises Unreachable: the node's listener check failed (its reason), the loop or the
        connection did not answer in time, the connection is lost."""
        start = time.monotonic()
        deadline = start + timeout
        loop = self.loop(conn.ip, conn.port)
        if not loop.lock.acquire(timeout=timeout):
            raise Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: the last probe round is stuck")
        try:
            if loop.missing and loop.connects == conn.connects and conn.is_connected:
                return None
            if not loop.live(conn):
                self._start(conn, loop, deadline)
            self._ask(conn, loop, listener, deadline)
            return self._answer(conn, loop, start, deadline)
        finally:
            loop.lock.release()

    def many(
        self, rounds: list[tuple[Connection, bool]], timeout: float
    ) -> list[Answer | SSHError]:
        """One round on each (connection, listener) whose loop runs, all asked before any
        answer is read: the answers arrive meanwhile, so reading them seldom waits (a wait
        and wake-up per node cost the daemon about as much as the round's two packets).
        Bounded by `timeout` overall; one Answer or SSHError per item, in order."""
        start = time.monotonic()
        deadline = start + timeout
        out: list[Answer | SSHError | None] = []
        asked = []
        for conn, listener in rounds:
            loop = self.loop(conn.ip, conn.port)
            if not loop.lock.acquire(blocking=False):
                out.append(Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: a probe round is stuck"))
                continue
            try:
                if not loop.live(conn):
                    raise Unreachable(R.CONNECTION_LOST, f"{conn.where}: its probe loop ended")
                self._ask(conn, loop, listener, deadline)
            except SSHError as e:
                loop.lock.release()
                out.append(e)
                continue
            asked.append((len(out), conn, loop))
            out.append(None)
        for i, conn, loop in asked:
            try:
                out[i] = self._answer(conn, loop, start, deadline)
            except SSHError as e:
                out[i] = e
            finally:
                loop.lock.release()
        return [x if x is not None else Unreachable(R.SSH_ERROR, "no answer") for x in out]

    @staticmethod
    def _ask(conn: Connection, loop: Loop, listener: bool, deadline: float) -> None:
        # the answer is due by `answer_by`; the rest of the time is for the keepalive
        answer_by = deadline - min(KEEPALIVE_S, remaining(deadline) / 3)
        ask = f"{'l' if listener else 'p'} {max(0.1, remaining(answer_by) - 0.2):.2f}\n"
        chan = loop.chan
        assert chan is not None
        try:
            chan.settimeout(max(0.01, remaining(deadline)))
            chan.sendall(ask.encode())
        except Exception as e:
            Watches._stop(loop)
            if not conn.is_connected:
                conn.close()
            raise classify(e, f"{conn.where} (probe loop)") from e

    @staticmethod
    def _answer(conn: Connection, loop: Loop, start: float, deadline: float) -> Answer | None:
        chan = loop.chan
        assert chan is not None
        answer_by = deadline - min(KEEPALIVE_S, (deadline - start) / 3)
        try:
            chan.settimeout(max(0.01, remaining(answer_by)))
            line = Watches._line(chan, loop, conn.where)
        except TimeoutError:
            Watches._stop(loop)
            raise Watches._silent(conn, deadline) from None
        except SSHError:
            raise
        except Exception as e:
            Watches._stop(loop)
            if not conn.is_connected:
                conn.close()
            raise classify(e, f"{conn.where} (probe loop)") from e
        if line is None:
            code = internals.exit_status(chan, remaining(deadline))
            Watches._stop(loop)
            if code == MISSING:
                loop.missing = True
                return None
            if not conn.is_connected:
                conn.close()
                raise Unreachable(R.CONNECTION_LOST, f"{conn.where}: connection lost")
            raise Unreachable(R.SSH_ERROR, f"{conn.where}: the probe loop ended ({code})")
        now = time.monotonic()
        answer = parse(line, now - start, conn.where)
        if answer.checked:
            loop.checked_at = now
        loop.last = (time.time(), answer)
        return answer

    @staticmethod
    def _start(conn: Connection, loop: Loop, deadline: float) -> None:
        Watches._stop(loop)
        chan, release = exec_command(conn, loop_argv(conn.port), deadline, stdin=True, probe=True)
        release()  # the loop's channel is not a probe slot: it lives with the connection
        loop.chan, loop.buf, loop.missing, loop.connects = chan, b"", False, conn.connects
        loop.exec_at = time.monotonic()

    @staticmethod
    def _silent(conn: Connection, deadline: float) -> Unreachable:
        """No answer by the deadline: is it the loop (hung on a file system?) or the link?
        A keepalive (``keepalive@openssh.com``; any reply, even a refusal, proves the
        session) tells them apart; a silent connection is closed (reconnect next time)."""
        answered = conn.global_request(KEEPALIVE, deadline)
        if answered is None:
            conn.close()
            return Unreachable(R.CONNECT_TIMEOUT, f"{conn.where}: no answer from the node in time")
        return Unreachable(
            R.COMMAND_TIMEOUT,
            f"{conn.where}: the session answers, but its probe loop did not in time "
            "(a hung file system or process table?)",
        )

    @staticmethod
    def _line(chan: paramiko.Channel, loop: Loop, where: str) -> bytes | None:
        """The next answer line; None at EOF; TimeoutError when none comes in time."""
        while b"\n" not in loop.buf:
            data = chan.recv(MAX_LINE)
            if not data:
                return None
            loop.buf += data
            if len(loop.buf) > MAX_LINE:
                Watches._stop(loop)
                raise Unreachable(R.SSH_ERROR, f"{where}: the probe loop's answer is too long")
        line, _, loop.buf = loop.buf.partition(b"\n")
        return line

    @staticmethod
    def _stop(loop: Loop) -> None:
        if loop.chan is not None:
            close_channel(loop.chan)
        loop.chan, loop.buf = None, b""
