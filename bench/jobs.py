"""Job benchmark on a namespace cluster (needs root).

Prints, with the baseline measured in the same run:

- launch, for each MPI launcher installed (OpenMPI 4, OpenMPI 5, MPICH's Hydra):
  a synchronous `POST /api/mpi_jobs/` of the short MPI program on 4 and on 16
  hosts, against the same launcher typed through OpenSSH (`ssh master mpirun
  --host ... prog`), as a person at a terminal would; and each one's overhead
  beyond the launcher's own run time (it is run through a small wrapper that
  records when it starts and ends, in both paths);
- log throughput: a job writing 1 GB, start to end, against the same job run
  through `ssh master mpirun`; and 1 GB already written, streamed into the
  daemon's log on re-attach after a kill -9, against `ssh master cat` of the
  same bytes into a file on the same filesystem; the daemon's RSS growth while
  it streams.

Targets: launch ratio <= 0.9; throughput >= 0.8x OpenSSH; RSS growth < 50 MB.

    python3 -m bench.jobs [--rounds 5] [--gigabytes 1] [--flavours openmpi4 mpich]
        (from the repository root)
"""

import argparse
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench.common import settle
from mlbench_daemon.jobs import flavour
from tests.cluster import MPI_ARGS, MPIRUN, MPIS, Cluster
from tests.helpers import call_port as call
from tests.helpers import served

SETTLE_S = 0.5


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def openssh(c, argv, timeout=600):
    return subprocess.run(
        c.ssh_argv(c.workers[0], argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=timeout,
    )


def timed_mpirun(c, launcher=MPIRUN):
    """A wrapper that appends the launcher's own start and end times to a file, so that
    each path's overhead beyond the launcher itself can be told apart from its
    run-to-run variation (hundreds of ms on a busy 2-core machine)."""
    times = c.home / "mpirun-times"
    wrapper = c.home / f"timed-{Path(launcher).parent.parent.name}-{Path(launcher).name}"
    wrapper.write_text(f"""#!/bin/sh
echo "$(date +%s.%N)" >> {times}
{launcher} "$@"
r=$?
echo "$(date +%s.%N)" >> {times}
exit $r
""")
    wrapper.chmod(0o755)
    return wrapper, times


def mpirun_seconds(times):
    start, end = map(float, times.read_text().split())
    times.unlink()
    return end - start


def launch(c, port, n, rounds, wrapper, times, name="openmpi4"):
    hosts = c.workers[:n]
    names = [h.name for h in hosts]
    f, m = flavour.get(name), MPIS[name]
    # the argv the daemon runs, typed by hand
    mpirun = f.argv(
        str(wrapper), m.args, [h.ip for h in hosts], None, [], [str(c.program_for(name))]
    )
    ours, theirs, ours_over, theirs_over = [], [], [], []

    def by_openssh():
        t = time.perf_counter()
        r = openssh(c, mpirun)
        theirs.append(time.perf_counter() - t)
        theirs_over.append(theirs[-1] - mpirun_seconds(times))
        assert r.returncode == 0 and f"allreduce ok {n}".encode() in r.stdout, r.stdout[-500:]

    def by_post():
        t = time.perf_counter()
        status, job = call(port, "POST", "/api/mpi_jobs/", {"nodes": names})
        ours.append(time.perf_counter() - t)
        ours_over.append(ours[-1] - mpirun_seconds(times))
        assert status == 200 and job["exit_code"] == 0, job
        assert f"allreduce ok {n}" in job["response"], job["response"][-500:]

    # Each path goes first in every other round, and each starts on a settled machine
    # (the previous run's 16 remote sessions and the daemon's clean-up have ended).
    for i in range(rounds):
        for run in (by_openssh, by_post) if i % 2 == 0 else (by_post, by_openssh):
            time.sleep(SETTLE_S)
            run()
    med = statistics.median
    return med(ours), med(theirs), med(ours_over), med(theirs_over)


class RSS:
    """Peak resident memory of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid):
        self.pid, self.base = pid, rss_kb(pid)
        self.peak, self._done = self.base, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._done.wait(0.02):
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except OSError:
                return

    def growth_mb(self):
        self._done.set()
        self._thread.join()
        return (self.peak - self.base) / 1024


def wait_state(port, job_id, states, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        _status, job = call(port, "GET", f"/api/mpi_jobs/{job_id}")
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def live_stream(c, port, daemon_pid, nbytes, wrapper):
    """A job writing nbytes, start to end: via the daemon, and via ssh + mpirun at a terminal."""
    master = c.workers[0]
    rss = RSS(daemon_pid)
    t = time.perf_counter()
    status, job = call(
        port,
        "POST",
        "/api/mpi_jobs/",
        {
            "nodes": [master.name],
            "program": [str(c.mpi_program), "--bytes", str(nbytes)],
            "wait": False,
        },
    )
    assert status == 202, job
    job = wait_state(port, job["id"], ("succeeded", "failed", "lost", "cancelled"))
    ours = time.perf_counter() - t
    assert job["state"] == "succeeded", job
    growth = rss.growth_mb()
    mpirun = [
        str(wrapper),
        *MPI_ARGS,
        "--host",
        master.ip,
        str(c.mpi_program),
        "--bytes",
        str(nbytes),
    ]
    t = time.perf_counter()
    r = openssh(c, mpirun)
    theirs = time.perf_counter() - t
    assert r.returncode == 0 and len(r.stdout) >= nbytes
    return ours, theirs, growth


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gigabytes", type=float, default=1.0)
    ap.add_argument("--flavours", nargs="+", choices=list(MPIS), default=list(MPIS))
    args = ap.parse_args()

    print("building a 16-host cluster ...", flush=True)
    with Cluster(workers=16, extra=0) as c:
        log = {"level": "warning"}
        ssh = {"probe_interval_s": 5.0, "verify_interval_s": 300.0, "max_connects": 16}
        print(
            f"\nlaunch, medians of {args.rounds} rounds (overhead = total minus the launcher's "
            "own time)"
        )
        for name in args.flavours:
            m = MPIS[name]
            if not c.program_for(name).exists():
                print(f"  {name}: {m.launcher} not installed, skipped")
                continue
            fwrapper, ftimes = timed_mpirun(c, m.launcher)
            # named: auto would ask `<wrapper> --version` once per master, which the
            # wrapper would time as a run
            mpi = {"mpirun": str(fwrapper), "args": list(m.args), "flavour": name,
                   "program": [str(c.program_for(name))]}  # fmt: skip
            with served(c, log=log, ssh=ssh, mpi=mpi) as daemon:
                print(f"  {name}:")
                for n in (4, 16):
                    at = settle(daemon, len(c.workers))
                    ours, theirs, ours_over, theirs_over = launch(
                        c, daemon.port, n, args.rounds, fwrapper, ftimes, name
                    )
                    print(
                        f"    {n:2d} hosts: POST {ours * 1000:7.1f} ms   ssh+launcher "
                        f"{theirs * 1000:7.1f} ms   ratio {ours / theirs:.3f}  (target <= 0.9)   "
                        f"load {at:.2f}"
                    )
                    print(
                        f"              overhead: POST {ours_over * 1000:5.1f} ms   ssh+launcher "
                        f"{theirs_over * 1000:5.1f} ms"
                    )

        wrapper, _ = timed_mpirun(c)
        mpi = {"mpirun": str(wrapper), "flavour": "openmpi4"}
        with served(c, log=log, ssh=ssh, mpi=mpi) as daemon:
            nbytes = int(args.gigabytes * 1e9)
            at = settle(daemon, len(c.workers), sync=True)
            ours, theirs, growth = live_stream(c, daemon.port, daemon.process.pid, nbytes, wrapper)
            print(f"\nlog throughput, a job writing {nbytes / 1e9:.2f} GB")
            print(
                f"  live, job start to end: daemon {nbytes / ours / 1e6:6.1f} MB/s   "
                f"ssh+mpirun at a terminal {nbytes / theirs / 1e6:6.1f} MB/s   "
                f"ratio {theirs / ours:.3f}   load {at:.2f}"
            )
            print(f"  daemon RSS growth while streaming {growth:.1f} MB  (target < 50)")
            # one repeat of bench.reattach's measure (which imports this module)
            from bench.reattach import catch_up

            r = catch_up(c, daemon, nbytes)
            ours_mbs, theirs_mbs, growth = r["ours"], r["theirs"], r["growth"]
            print(
                f"  written, after kill -9 + restart: daemon re-attach {ours_mbs:6.1f} MB/s"
                f"   ssh master cat {theirs_mbs:6.1f} MB/s   "
                f"ratio {ours_mbs / theirs_mbs:.3f}  (target >= 1.0; bench.reattach repeats it)"
                f"   load {r['load']:.2f}"
            )
            print(f"  daemon RSS growth while catching up {growth:.1f} MB  (target < 50)")


if __name__ == "__main__":
    main()
