"""The head's cost of `rank_output` (jobs/ranklog.py), no cluster needed.

A synthetic tagged stream, as OpenMPI 4 `--tag-output` prints it (16 ranks taking turns,
100-byte lines, one in eight cut mid-line with the next rank's tag after it), is
appended to a job's log in 32 KiB chunks (what the follower gets from SSH), once as the
follower does for any job (append only: the baseline) and once as it does for a
rank_output job (append, then `RankLogs.advance()`; `advance(final=True)` at the end).
Both in the same repeat on the same filesystem; the figure is the ratio of the two
times, with the median and range over repeats and the 1-minute load beside each.

    python3 -m bench.ranklog [--megabytes 256] [--repeats 5] [--dir DIR]
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=float, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the state dirs go (default: a temp dir)")
    args = p.parse_args()
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
