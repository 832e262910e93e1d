"""The job code on this machine alone, for the fast logic tests (no root, no network).

- ``LocalPool`` implements the pool's interface (``run``, ``stream``, ``probe``) by
  running each command here as the login shell would run the remote one
  (``sh -c quote(argv)`` in the cluster user's home), so the real remote scripts
  (LAUNCH, FOLLOW, STATUS, TERMINATE, SWEEP) do the work with the real sh, tail,
  flock and kill.  ``cut(ip)`` makes a "host" unreachable (new commands fail,
  its streams drop) until ``heal(ip)``.  This is the one stand-in for SSH: the
  cluster tests stay the proof that the same scripts work over real sshd.
- ``MPIRUN``: a stand-in for mpirun that drops its options and runs the program.
- ``ManualClock``: time moves only when a test calls ``advance()``; waits and
  timers follow it, so timeouts and ``mpi.lost_after_s`` need no sleeping.
- ``SkipClock``: real wall time that a test can move on by ``skip()`` (webhooks).
- ``StaticRegistry``: a fixed node table (the registry's reader interface).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlbench_daemon import config
from mlbench_daemon.discovery import Node
from mlbench_daemon.jobs import Jobs
from mlbench_daemon.nodes import NodeStatus
from mlbench_daemon.ssh import Result, quote
from mlbench_daemon.ssh_errors import CommandTimeout, Unreachable
from mlbench_daemon.store import Store
from mlbench_daemon.vocabulary import Phase
from tests.cluster import to_toml
from tests.helpers import HANG, wait_for

MPIRUN = """#!/bin/sh
# Stands in for mpirun on the local pool: drops mpirun's options, runs the program once.
while [ $# -gt 0 ]; do
  case "$1" in -x|--host|-np) shift 2;; --mca) shift 3;; --tag-output) shift;; *) break;; esac
done
exec "$@"
"""


class LocalStream:
    def __init__(self, pool: LocalPool, ip: str, proc: subprocess.Popen) -> None:
        self.pool, self.ip, self.proc = pool, ip, proc
        self.dropped = False
        self.exit_code: int | None = None

    def __iter__(self) -> LocalStream:
        return self

    def __next__(self) -> bytes:
        try:
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
        except (OSError, ValueError):  # closed by another thread (the daemon stopping)
            self.dropped = True
            data = b""
        if data and not self.dropped:
            return data
        self.close()
        if self.dropped:
            raise Unreachable("connection-lost", f"{self.ip}: connection lost (cut by the test)")
        self.exit_code = self.proc.wait(HANG)
        raise StopIteration

    def drop(self) -> None:
        self.dropped = True
        self._kill()

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self._kill()
            self.proc.wait(HANG)
        self.proc.stdout.close()
        with self.pool.lock:
            self.pool.streams.discard(self)


class LocalPool:
    """ssh.Pool's interface, running every command here in `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.lock = threading.Lock()
        self.down: set[str] = set()
        self.streams: set[LocalStream] = set()
        self.calls: list[tuple[str, list[str]]] = []
        # fault(ip, argv) -> a Result to answer instead of running argv, or None
        self.fault: Callable[[str, list[str]], Result | None] = lambda ip, argv: None

    def _reach(self, ip: str, argv: list[str]) -> None:
        with self.lock:
            self.calls.append((ip, argv))
            if ip in self.down:
                raise Unreachable("connection-refused", f"{ip}:22: connection refused (test)")

    def run(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", timeout: float
    ) -> Result:
        self._reach(ip, argv)
        answer = self.fault(ip, argv)
        if answer is not None:
            return answer
        try:
            p = subprocess.run(
                ["sh", "-c", quote(argv)],
                cwd=self.home,
                input=stdin,
                capture_output=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise CommandTimeout(
                f"{ip}: {quote(argv)[:200]} did not finish in {timeout:g} s"
            ) from None
        return Result(p.returncode, p.stdout, p.stderr)

    def stream(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", idle_timeout: float
    ) -> LocalStream:
        self._reach(ip, argv)
        proc = subprocess.Popen(
            ["sh", "-c", quote(argv)],
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        s = LocalStream(self, ip, proc)
        with self.lock:
            self.streams.add(s)
        return s

    def probe(self, ip: str, port: int, host: str | None = None) -> float:
        self._reach(ip, ["true"])
        return 0.001

    def cut(self, ip: str) -> None:
        """The host becomes unreachable: its streams drop, new commands fail."""
        with self.lock:
            self.down.add(ip)
            streams = [s for s in self.streams if s.ip == ip]
        for s in streams:
            s.drop()

    def heal(self, ip: str) -> None:
        with self.lock:
            self.down.discard(ip)

    def ran(self, script: str) -> int:
        """How many commands ran a given remote script (by its text)."""
        with self.lock:
            return sum(1 for _, argv in self.calls if script in argv)


class ManualClock:
    """The job code's Clock on a time that moves only by ``advance()``."""

    def __init__(self) -> None:
        self.now = 0.0
        self._cv = threading.Condition()
        self._timers: list[ManualTimer] = []

    def time(self) -> float:
        return 1_800_000_000.0 + self.now

    def monotonic(self) -> float:
        return self.now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        with self._cv:
            deadline = self.now + seconds
            while not event.is_set() and self.now < deadline:
                self._cv.wait(0.005)  # the event is not ours to be notified by: poll it
        return event.is_set()

    def timer(self, seconds: float, action: Callable[[], object]) -> ManualTimer:
        t = ManualTimer(self.now + max(0.0, seconds), action)
        with self._cv:
            self._timers.append(t)
        return t

    def advance(self, seconds: float) -> None:
        """Move time on; timers now due fire, each in its own thread (as threading.Timer)."""
        with self._cv:
            self.now += seconds
            due = [t for t in self._timers if t.due <= self.now]
            self._timers = [t for t in self._timers if t.due > self.now]
            self._cv.notify_all()
        for t in due:
            if not t.cancelled:
                threading.Thread(target=t.action, daemon=True).start()

    @contextlib.contextmanager
    def ticking(self, step: float = 0.5) -> Iterator[None]:
        """Advance by `step` every 10 ms (real) in the background, for calls that block
        on the job threads (a cancel waits for the job to end, which may take a pause:
        a killed job's process group can linger as a zombie until it is reaped)."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(0.01):
                self.advance(step)

        t = threading.Thread(target=tick, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    def pending_timers(self) -> list[float]:
        """Seconds until each live timer fires."""
        with self._cv:
            return sorted(t.due - self.now for t in self._timers if not t.cancelled)


class SkipClock:
    """Wall time that runs on as usual and also jumps by ``skip()``: for code that takes
    ``now`` and ``wait(event, seconds)`` and compares with times other code took from
    ``time.time()`` (webhooks' outbox rows), so a test can pass a long outage at once."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def time(self) -> float:
        return time.time() + self.skipped

    def wait(self, event: threading.Event, seconds: float) -> bool:
        deadline = self.time() + seconds
        while not event.wait(min(0.01, max(0.0, deadline - self.time()))):
            if self.time() >= deadline:  # a skip ends the wait within 10 ms
                return False
        return True

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


@dataclasses.dataclass
class ManualTimer:
    due: float
    action: Callable[[], object]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class StaticRegistry:
    """The registry's reader interface over a fixed table of (name, ip) hosts."""

    def __init__(self, hosts: list[tuple[str, str]]) -> None:
        self.statuses = [
            NodeStatus(Node(name, name, ip, 22, "default", {"app": "t"}), phase=Phase.RUNNING)
            for name, ip in hosts
        ]

    stale, stale_reason = False, ""  # (the API's readers: /api/nodes, /healthz)

    def nodes(self, selector: object = None) -> list[NodeStatus]:
        return list(self.statuses)

    def nodes_json(self) -> str:
        return json.dumps([s.to_json() for s in self.statuses])

    def discovery_age_s(self) -> float | None:
        return 0.0

    def refresh(self, timeout: float) -> None:
        pass

    def wait_first_pass(self, timeout: float) -> bool:
        return True


class LocalJobs:
    """Jobs wired to a LocalPool, a ManualClock and a StaticRegistry of `hosts` hosts."""

    def __init__(
        self,
        tmp: Path,
        hosts: int = 2,
        store: Callable[[str], Store] = Store,
        server: dict[str, object] | None = None,
        webhooks: dict | None = None,
        **mpi: object,
    ) -> None:
        """`mpi`: settings of the [mpi] section; `server`: of [server] (e.g. a short
        ``cancel_answer_s`` for a test whose cancel must answer 202 after it)."""
        self.tmp = tmp
        self.home = tmp / "home"
        self.home.mkdir(exist_ok=True)
        mpirun = tmp / "mpirun"
        mpirun.write_text(MPIRUN)
        mpirun.chmod(0o755)
        path = tmp / "daemon.toml"
        # the stand-in is no real launcher: it has no --version to detect a flavour from
        settings = {
            "mpirun": str(mpirun),
            "flavour": "openmpi4",
            "program": ["true"],
            "cancel_grace_s": 0.5,
            **mpi,
        }
        path.write_text(
            to_toml(
                {
                    "discovery": {"service": "local.invalid"},
                    "state": {"dir": str(tmp / "state")},
                    "mpi": settings,
                    **({"server": server} if server else {}),
                    **({"webhooks": webhooks} if webhooks else {}),
                }
            )
        )
        self.cfg = config.load(path, environ={})
        self.pool = LocalPool(self.home)
        self.clock = ManualClock()
        self.registry = StaticRegistry([(f"w-{i}", f"127.77.0.{i + 1}") for i in range(hosts)])
        self.store = store(self.cfg.state.dir)
        self.jobs = Jobs(self.cfg, self.registry, self.pool, self.store, clock=self.clock)

    def start(self) -> LocalJobs:
        self.jobs.start()
        return self

    def restart(self) -> LocalJobs:
        """The daemon stops and a new one starts on the same state (remote jobs run on)."""
        self.jobs.stop()
        self.jobs = Jobs(self.cfg, self.registry, self.pool, self.store, clock=self.clock)
        return self.start()

    def state(self, job_id: str) -> str:
        return self.jobs.get(job_id)["state"]

    def wait_state(self, job_id: str, *states: str) -> dict:
        wait_for(lambda: self.state(job_id) in states, what=f"job {job_id} {states}")
        return self.jobs.get(job_id)

    def run_clock_until_final(self, job_id: str, step: float) -> dict:
        """Advance the clock by `step` (letting the job threads act) until the job is final."""
        deadline = time.monotonic() + HANG
        while self.state(job_id) in ("pending", "running"):
            assert time.monotonic() < deadline, f"job {job_id} never ended"
            self.clock.advance(step)
            time.sleep(0.01)
        return self.jobs.wait(job_id)

    def close(self) -> None:
        self.jobs.stop()
        for pid_file in self.home.glob(".mlbench-daemon/jobs/*/pid"):  # jobs left running
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.store.close()


def sh(script: str, *args: str) -> list[str]:
    """A job program: a shell script (run once by the stand-in mpirun)."""
    return ["/bin/sh", "-c", script, "sh", *args]


def gate(path: Path) -> list[str]:
    """A job that prints "started", waits until `path` exists, then prints "done"."""
    return sh('echo started; while [ ! -e "$1" ]; do sleep 0.01; done; echo done', str(path))


def settle(seconds: float = 0.05) -> None:
    """Give the job threads a moment (for asserting that something did NOT happen)."""
    time.sleep(seconds)
