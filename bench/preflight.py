"""Preflight benchmark on a namespace cluster (needs root).

Prints, with the baseline measured in the same run: `POST /api/preflight/` (every
check, TCP included) on 4 and on 16 hosts, against one run of the short MPI program
typed through OpenSSH (`ssh master mpirun --host ... prog`), as a person checking
the cluster by hand would.  Target: ratio <= 1.5.

    python3 -m bench.preflight [--rounds 5]   (from the repository root)
"""

import argparse
import statistics
import subprocess
import time

from bench.common import load, settle, spread
from tests.cluster import MPI_ARGS, MPIRUN, Cluster
from tests.helpers import call_port as call
from tests.helpers import served

SETTLE_S = 0.5


def compare(c, port, n, rounds):
    hosts = c.workers[:n]
    mpirun = [MPIRUN, *MPI_ARGS, "--host", ",".join(h.ip for h in hosts), str(c.mpi_program)]
    ours, theirs, loads = [], [], []

    def by_openssh():
        t = time.perf_counter()
        r = subprocess.run(c.ssh_argv(hosts[0], mpirun), capture_output=True, timeout=600)
        theirs.append(time.perf_counter() - t)
        assert r.returncode == 0 and f"allreduce ok {n}".encode() in r.stdout, r.stdout[-500:]

    def by_preflight():
        t = time.perf_counter()
        status, answer = call(port, "POST", "/api/preflight/", {"nodes": [h.name for h in hosts]})
        ours.append(time.perf_counter() - t)
        assert status == 200 and answer["ok"], answer
        assert sum(c["check"] == "tcp" and c["ok"] for c in answer["checks"]) == n - 1, answer

    for i in range(rounds):
        for run in (by_openssh, by_preflight) if i % 2 == 0 else (by_preflight, by_openssh):
            time.sleep(SETTLE_S)
            loads.append(load())
            run()
    return ours, theirs, loads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    print("building a 16-host cluster ...", flush=True)
    with (
        Cluster(workers=16, extra=0) as c,
        served(
            c, log={"level": "warning"}, ssh={"probe_interval_s": 5.0, "max_connects": 16}
        ) as daemon,
    ):
        print(f"\npreflight vs one `ssh master mpirun` of the short program, "
              f"medians of {args.rounds} rounds")  # fmt: skip
        for n in (4, 16):
            settle(daemon, len(c.workers))
            ours, theirs, loads = compare(c, daemon.port, n, args.rounds)
            ratio = statistics.median(ours) / statistics.median(theirs)
            print(
                f"{n:3d} hosts: preflight {spread([x * 1000 for x in ours], '{:.1f}')} ms   "
                f"ssh+mpirun {spread([x * 1000 for x in theirs], '{:.1f}')} ms   "
                f"ratio {ratio:.3f}  (target <= 1.5)   load {spread(loads, '{:.2f}')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
