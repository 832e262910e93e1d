"""Roll-call benchmark on a namespace cluster (needs root).

Runs a job whose rank 1 sleeps before MPI_Allreduce while the others wait in it (one
rank per host), then times `GET /api/mpi_jobs/<id>/ranks` on 4 and on 16 hosts against
what a person would do by hand in the same run: `ssh node eu-stack -1 -p PID` (gdb
where eu-stack is missing) through OpenSSH for every rank at once (the pids given for
free).  The waiting ranks spin in MPI_Allreduce (OpenMPI busy-polls), so 16 ranks keep
a 2-core machine's load far above 2 while it runs.  Prints the median
and range of each, with the machine's load average beside each figure.  Target: ratio
<= 1.0 on 4 hosts, <= 0.5 on 16, and at most 2 s on 16 hosts.

    python3 -m bench.rollcall [--rounds 5] [--sizes 4 16]   (from the repository root)
"""

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import settle, spread
from tests.cluster import MPI_ARGS, MPIRUN, Cluster
from tests.helpers import call_port as call
from tests.helpers import served, wait_for

STALL_C = Path(__file__).resolve().parent.parent / "tests" / "data" / "rollcall" / "stall.c"
# what a person would type on each node: eu-stack where installed (as the daemon prefers
# it), else gdb
TOOL = (
    ["eu-stack", "-1"]
    if shutil.which("eu-stack")
    else ["gdb", "-nx", "-batch", "-q", "-iex", "set debuginfod enabled off", "-ex", "bt"]
)
SETTLE_S = 0.5


def start_job(c, port, prog, hosts):
    body = {"program": [str(prog), "3600"], "nodes": [h.name for h in hosts], "wait": False}
    status, job = call(port, "POST", "/api/mpi_jobs/", body)
    assert status == 202, job

    def ready():
        _, rec = call(port, "GET", f"/api/mpi_jobs/{job['id']}")
        assert rec["state"] in ("pending", "running"), rec
        if rec["state"] != "running":
            return False
        _, answer = call(port, "GET", f"/api/mpi_jobs/{job['id']}/ranks")
        waiting = [r for r in answer["ranks"] if r["rank"] != 1]
        return len(answer["ranks"]) == len(hosts) and all(
            any("Allreduce" in f for f in r["stack"]) for r in waiting
        )

    wait_for(ready, timeout=300, what="every rank in place")
    return job["id"]


def compare(c, port, job_id, rounds):
    by_name = {h.name: h for h in c.workers}
    ours, theirs, loads_ours, loads_theirs = [], [], [], []

    def by_daemon():
        loads_ours.append(os.getloadavg()[0])
        t = time.perf_counter()
        status, answer = call(port, "GET", f"/api/mpi_jobs/{job_id}/ranks")
        ours.append(time.perf_counter() - t)
        assert status == 200 and [s["rank"] for s in answer["suspects"]] == [1], answer
        return answer

    answer = by_daemon()
    ours.clear()
    loads_ours.clear()
    targets = [(by_name[r["node"]], r["pid"]) for r in answer["ranks"]]

    def by_hand():
        loads_theirs.append(os.getloadavg()[0])
        t = time.perf_counter()
        procs = [
            subprocess.Popen(
                c.ssh_argv(h, [*TOOL, "-p", str(pid)]),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            for h, pid in targets
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        theirs.append(time.perf_counter() - t)
        assert all(b"#0 " in o for o in outs), [o[-300:] for o in outs]

    for i in range(rounds):
        for run in (by_hand, by_daemon) if i % 2 == 0 else (by_daemon, by_hand):
            time.sleep(SETTLE_S)
            run()
    return ours, theirs, loads_ours, loads_theirs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16])
    args = ap.parse_args()
    n_max = max(args.sizes)
    print(f"building a {n_max}-host cluster ...", flush=True)
    with Cluster(workers=n_max, extra=0) as c:
        prog = c.dir / "bin" / "stall"
        subprocess.run(
            ["mpicc", "-g", "-O0", "-o", str(prog), str(STALL_C)], check=True, timeout=120
        )
        with served(
            c,
            log={"level": "warning"},
            ssh={"probe_interval_s": 5.0, "max_connects": 16},
            mpi={"mpirun": MPIRUN, "args": MPI_ARGS, "cancel_grace_s": 1.0},
        ) as daemon:
            print(
                f"\nroll-call vs `ssh node {TOOL[0]} ... -p PID` for every rank at once, "
                f"{args.rounds} rounds each, {os.cpu_count()} CPUs"
            )
            for n in args.sizes:
                settle(daemon, n_max)
                job_id = start_job(c, daemon.port, prog, c.workers[:n])
                try:
                    ours, theirs, lo, lt = compare(c, daemon.port, job_id, args.rounds)
                finally:
                    call(daemon.port, "DELETE", f"/api/mpi_jobs/{job_id}")
                mo, mt = statistics.median(ours), statistics.median(theirs)
                ms = [x * 1000 for x in ours], [x * 1000 for x in theirs]
                print(
                    f"{n:3d} hosts: roll-call {spread(ms[0], '{:.0f}')} ms (load "
                    f"{spread(lo, '{:.2f}')})   by hand {spread(ms[1], '{:.0f}')} ms (load "
                    f"{spread(lt, '{:.2f}')})   ratio {mo / mt:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
