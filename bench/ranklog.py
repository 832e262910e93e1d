"""The head's cost of `rank_output` (jobs/ranklog.py), no cluster needed.

A synthetic tagged stream, as OpenMPI 4 `--tag-output` prints it (16 ranks taking turns,
100-byte lines, one in eight cut mid-line with the next rank's tag after it), is
appended to a job's log in 32 KiB chunks (what the follower gets from SSH), once as the
follower does for any job (append only: the baseline) and once as it does for a
rank_output job (append, then `RankLogs.advance()`; `advance(final=True)` at the end).
Both in the same repeat on the same filesystem; the figure is the ratio of the two
times, with the median and range over repeats and the 1-minute load beside each.

With --cluster (root): the same end to end on a 2-host namespace cluster, OpenMPI 4,
np=2, rank 0 writing --megabytes of 100-byte lines: the daemon's CPU seconds and the
job's time from POST to final, with and without rank_output, alternating which goes
first in each repeat.

    python3 -m bench.ranklog [--megabytes 256] [--repeats 5] [--dir DIR] [--cluster]
        (from the repository root)
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

from mlbench_daemon.jobs.ranklog import RankLogs
from mlbench_daemon.store import Store

CHUNK = 32 * 1024
RANKS = 16


def stream(nbytes):
    """About `nbytes` of OpenMPI 4 tagged output."""
    pieces, size, i = [], 0, 0
    while size < nbytes:
        rank = i % RANKS
        line = (f"{i:08d} " + "x" * 90 + "\n").encode()
        if i % 8 == 7:  # a partial write: the rest of the line comes with a tag of its own
            piece = f"[1,{rank}]<stdout>:".encode() + line[:40]
            piece += f"[1,{(rank + 1) % RANKS}]<stdout>:x\n[1,{rank}]<stdout>:".encode()
            piece += line[40:]
        else:
            piece = f"[1,{rank}]<stdout>:".encode() + line
        pieces.append(piece)
        size += len(piece)
        i += 1
    return b"".join(pieces)


def one(root, data, split):
    """Seconds to take `data` in chunks as the follower does (with the split or not)."""
    store = Store(root)
    job_id = "00000000000000000001"
    ranks = RankLogs(store, job_id, "openmpi4") if split else None
    start = time.perf_counter()
    with store.log_writer(job_id) as log:
        for i in range(0, len(data), CHUNK):
            log.write(data[i : i + CHUNK])
            if ranks is not None:
                ranks.advance()
    if ranks is not None:
        ranks.advance(final=True)
    took = time.perf_counter() - start
    store.close()
    return took


def cluster(megabytes, repeats):
    """End to end through the daemon on a namespace cluster (see the docstring)."""
    from bench.jobs import wait_state
    from bench.reattach import cpu_s
    from tests.cluster import Cluster
    from tests.helpers import call_port, served

    nbytes = int(megabytes * 1e6) // 100 * 100
    rows = {True: [], False: []}
    with Cluster(workers=2, extra=0) as c, served(c, log={"level": "warning"}) as d:
        prog = [str(c.mpi_program), "--bytes", str(nbytes)]
        for r in range(repeats):
            for on in (r % 2 == 0, r % 2 != 0):
                time.sleep(2)  # a settled machine
                cpu, start = cpu_s(d.process.pid), time.perf_counter()
                body = {"program": prog, "np": 2, "rank_output": on, "wait": False}
                _, job = call_port(d.port, "POST", "/api/mpi_jobs/", body)
                job = wait_state(d.port, job["id"], ("succeeded", "failed", "lost"))
                assert job["state"] == "succeeded", job
                took, used = time.perf_counter() - start, cpu_s(d.process.pid) - cpu
                rows[on].append((took, used))
                print(
                    f"repeat {r + 1}, rank_output {on}: {took:.2f} s, daemon CPU {used:.2f} s "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    for what, i in (("time", 0), ("daemon CPU", 1)):
        ratios = [a[i] / b[i] for a, b in zip(rows[True], rows[False], strict=True)]
        print(
            f"{megabytes:g} MB end to end, {what} with/without rank_output: median "
            f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=float, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the state dirs go (default: a temp dir)")
    p.add_argument("--cluster", action="store_true", help="end to end on a namespace cluster")
    args = p.parse_args()
    if args.cluster:
        cluster(args.megabytes, args.repeats)
        return
    data = stream(int(args.megabytes * 1e6))
    mb = len(data) / 1e6
    ratios = []
    base = tempfile.mkdtemp(prefix="bench-ranklog-", dir=args.dir)
    try:
        for r in range(args.repeats):
            times = {}
            for split in (r % 2 == 0, r % 2 != 0):  # alternate which goes first
                root = os.path.join(base, f"{r}-{split}")
                times[split] = one(root, data, split)
                shutil.rmtree(root)
            ratios.append(times[True] / times[False])
            print(
                f"repeat {r + 1}: append only {mb / times[False]:.0f} MB/s, append + split "
                f"{mb / times[True]:.0f} MB/s, ratio {ratios[-1]:.2f} "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{mb:.0f} MB, {RANKS} ranks: split/append time ratio median "
        f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) over "
        f"{len(ratios)} repeats"
    )


if __name__ == "__main__":
    main()
