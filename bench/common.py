"""What every bench shares: wait until the cluster and the daemon are settled, repeat a
measurement, and report each figure with its median, range and the machine's load.

A figure measured while the daemon still probes 128 hosts cold, or while the kernel
still writes back the previous repeat's gigabyte, is a figure of that, not of the thing
measured (bench.web once gave 0.47 and 370 for the same ratio so).  So `settle` waits
for every worker Running and probed, the daemon's own CPU quiet (or steady: its level no
longer falling) and (optionally) the page cache written back, then returns the 1-minute
load, which each repeat prints beside its figures.
"""

import os
import statistics
import time

from mlbench_daemon.config import SETTINGS
from tests.helpers import call_port, wait_hosts_running

TICK = os.sysconf("SC_CLK_TCK")
QUIET_CORE = 0.15  # the daemon uses at most this share of one core: its start-up is over
QUIET_MACHINE = 0.5  # cores busy on the whole machine: the last cluster's teardown is over
STEADY = 0.25  # or two windows in a row agree within this (128 hosts idle at load 50: 29%)
QUIET_WINDOW_S = 2.0
SETTLE_TIMEOUT_S = 120.0


def load():
    """The machine's 1-minute load average (2 cores here, shared with other work)."""
    return os.getloadavg()[0]


def cpu_s(pid):
    """User + system CPU seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu():
    """(busy, total) jiffies of the whole machine, all CPUs."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def settle(daemon, workers, *, sync=False, quiet_core=QUIET_CORE, timeout=SETTLE_TIMEOUT_S):
    """Until `workers` nodes are Running, each probed (``last_probe`` set), and the
    daemon's CPU over a window of QUIET_WINDOW_S is under `quiet_core` of a core or within
    STEADY of the window before (its idle level on a loaded machine), and the machine's
    likewise under QUIET_MACHINE cores or steady; with `sync`, dirty
    pages written back first (a bench that wrote a gigabyte must not make the next path
    pay its writeback).  -> the load after.  A daemon that never settles is reported, not
    waited for forever."""
    deadline = time.monotonic() + timeout
    wait_hosts_running(daemon.port, workers, timeout=timeout, process=daemon.process)
    while True:
        _, nodes = call_port(daemon.port, "GET", "/api/nodes/", timeout=30)
        if all(n["last_probe"] for n in nodes):
            break
        if time.monotonic() > deadline:
            raise SystemExit("bench: some node was never probed")
        time.sleep(0.2)
    if sync:
        os.sync()
    # the daemon's CPU and the machine's (a cluster torn down or built just before, a
    # browser starting), each quiet or steady
    pid, before = daemon.process.pid, None
    while True:
        c0, (b0, _), t0 = cpu_s(pid), machine_cpu(), time.perf_counter()
        time.sleep(QUIET_WINDOW_S)
        took = time.perf_counter() - t0
        use = ((cpu_s(pid) - c0) / took, (machine_cpu()[0] - b0) / TICK / took)
        quiet = (quiet_core, QUIET_MACHINE)
        if all(
            u <= q or (was is not None and abs(u - was) <= STEADY * was)
            for u, was, q in zip(use, before or (None, None), quiet, strict=True)
        ):
            break
        if time.monotonic() > deadline:
            print(
                f"  (not settled: the daemon uses {use[0]:.0%} of a core,"
                f" the machine {use[1]:.2f} cores)",
                flush=True,
            )
            break
        before = use
    return load()


def spread(values, fmt="{:.3f}"):
    """'median M (range LO-HI)' of `values`."""
    return (
        f"median {fmt.format(statistics.median(values))} "
        f"(range {fmt.format(min(values))}-{fmt.format(max(values))})"
    )


class Figures:
    """Repeats of named figures, each with the load it was measured at."""

    def __init__(self):
        self.values, self.loads = {}, {}

    def add(self, name, value, at_load):
        self.values.setdefault(name, []).append(value)
        self.loads.setdefault(name, []).append(at_load)

    def line(self, name, fmt="{:.3f}", target=""):
        """One figure's summary: median, range, repeats and the load over them."""
        v, ld = self.values[name], self.loads[name]
        goal = f"  (target {target})" if target else ""
        return (
            f"{name}: {spread(v, fmt)} over {len(v)} repeats; "
            f"load {spread(ld, '{:.2f}')} on {os.cpu_count()} cores{goal}"
        )


def default(section, key):
    return next(d for s, k, _, d, _ in SETTINGS if (s, k) == (section, key))


def defaults(**ssh):
    """Config sections with the daemon's default intervals (not the test cluster's short
    ones), and only warnings logged."""
    names = (
        "probe_interval_s",
        "verify_interval_s",
        "listener_interval_s",
        "connect_timeout_s",
        "keepalive_s",
    )
    return {
        "log": {"level": "warning"},
        "discovery": {k: default("discovery", k) for k in ("refresh_s", "timeout_s", "recheck_s")},
        "ssh": {**{k: default("ssh", k) for k in names}, **ssh},
    }
