"""Node metrics of live runs, sampled by the daemon (MLBench's pod metrics).

Every ``metrics.sample_interval_s`` each node of each live run gets four points:
``cpu`` (cores in use since the last sample), ``memory`` (MiB in use: MemTotal -
MemAvailable), ``network_in`` and ``network_out`` (MiB received and sent on every
interface but ``lo`` since the run's first sample: cumulative).

Nothing is asked of the node for them: its probe loop (ssh/watch.py) already reads
these ``/proc`` counters every probe round over the session the daemon holds, and the
pool keeps the newest answer (``counters``).  A sample is that answer, dated when it
came; a node whose loop has not answered since the last sample gets no new point, and
one without a loop (no python3 there) gets none at all.  The cost is a dictionary read
per node, whatever the interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mlbench_daemon.metricstore import Busy, CapReached, MetricStore, Point, RunLookup, format_date
from mlbench_daemon.store import StoreError

log = logging.getLogger(__name__)

USER_HZ = 100  # /proc/stat's jiffies per second (Linux's USER_HZ on every architecture)
MIB = 1 << 20
STALE_ROUNDS = 3  # an answer older than this many intervals is not a sample of now


class Counters(Protocol):
    """What a sample reads of a probe-loop answer (ssh.watch.Answer)."""

    cpu_busy: int
    mem_available_kb: int
    mem_total_kb: int
    net_rx_bytes: int
    net_tx_bytes: int


class CounterSource(Protocol):
    """The pool: a node's newest probe-loop answer and its time (epoch), asked nothing."""

    def counters(self, ip: str, port: int) -> tuple[float, Any] | None: ...


class NodeTable(Protocol):
    """The registry: the nodes it knows (``NodeStatus``: ``.node.name``, ``.ip``, ``.port``)."""

    def nodes(self) -> Sequence[Any]: ...


@dataclass
class Seen:
    """A node of a run as last sampled: the network counters at the run's first sample,
    the CPU counter and time of the last one."""

    rx0: int
    tx0: int
    busy: int
    at: float


def sample_points(run_id: int, node: str, seen: Seen | None, at: float, c: Counters) -> list[Point]:
    """The points of one answer of `node` (taken at `at`) after `seen` (None: the run's
    first sample of it: no CPU yet, the network counted from here)."""
    rx0, tx0 = (c.net_rx_bytes, c.net_tx_bytes) if seen is None else (seen.rx0, seen.tx0)
    values: list[tuple[str, float, bool]] = []
    if seen is not None and at > seen.at:
        cores = max(0, c.cpu_busy - seen.busy) / USER_HZ / (at - seen.at)
        values.append(("cpu", round(cores, 3), False))
    if c.mem_total_kb >= 0 and c.mem_available_kb >= 0:
        values.append(("memory", round((c.mem_total_kb - c.mem_available_kb) / 1024, 3), False))
    values.append(("network_in", round(max(0, c.net_rx_bytes - rx0) / MIB, 6), True))
    values.append(("network_out", round(max(0, c.net_tx_bytes - tx0) / MIB, 6), True))
    date = format_date(at)
    return [
        Point(run_id, name, str(v), date, cumulative, pod=node, posted=False)
        for name, v, cumulative in values
    ]


class NodeSampler:
    """Samples the nodes of every live run (``runs.live()``) every `interval` seconds."""

    def __init__(
        self,
        interval: float,
        runs: RunLookup,
        registry: NodeTable,
        pool: CounterSource,
        store: MetricStore,
    ) -> None:
        self.interval, self.runs, self.registry, self.pool = interval, runs, registry, pool
        self.store = store
        self._seen: dict[tuple[int, str], Seen] = {}
        self._refused: set[tuple[int, str]] = set()  # (run, why) logged once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="node-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a bug must not end the sampling of every later run
                log.exception("node sampling failed")

    def sample(self, now: float | None = None) -> int:
        """One pass over the live runs' nodes; -> the points stored."""
        now = time.time() if now is None else now
        where = {s.node.name: (s.node.ip, s.node.port) for s in self.registry.nodes()}
        stored, live = 0, set()
        for run in self.runs.live():
            for node in run.nodes:
                key = (run.id, node)
                live.add(key)
                addr = where.get(node)
                got = self.pool.counters(*addr) if addr else None
                if got is None:
                    continue
                at, counters = got
                seen = self._seen.get(key)
                if (seen is not None and at <= seen.at) or now - at > STALE_ROUNDS * self.interval:
                    continue  # no new answer since the last sample
                stored += self._store(run.id, sample_points(run.id, node, seen, at, counters))
                rx0, tx0 = (
                    (seen.rx0, seen.tx0) if seen else (counters.net_rx_bytes, counters.net_tx_bytes)
                )
                if counters.net_rx_bytes < rx0 or counters.net_tx_bytes < tx0:  # rebooted
                    rx0, tx0 = counters.net_rx_bytes, counters.net_tx_bytes
                self._seen[key] = Seen(rx0, tx0, counters.cpu_busy, at)
        for key in self._seen.keys() - live:  # runs that ended
            del self._seen[key]
        return stored

    def _store(self, run_id: int, points: list[Point]) -> int:
        n = 0
        for p in points:
            try:
                self.store.add(p)
                n += 1
            except (CapReached, Busy, StoreError) as e:
                why = type(e).__name__
                if (run_id, why) not in self._refused:
                    self._refused.add((run_id, why))
                    log.warning("run %d: node samples not stored: %s", run_id, e)
        return n
