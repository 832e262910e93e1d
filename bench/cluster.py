"""How long the namespace test cluster takes to build and to tear down (needs root).

    python3 -m bench.cluster [--sizes 3 32] [--rounds 3]   (from the repository root)

Prints the median and range of the build and teardown time per size, and the load.
Build includes the namespaces, bridge, cluster user and keys, one sshd per host (until
each accepts TCP), dnsmasq, and compiling the MPI program.
"""

import argparse
import time

from bench.common import load, spread
from tests.cluster import Cluster


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 32])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for n in args.sizes:
        builds, teardowns, loads = [], [], []
        for _ in range(args.rounds):
            loads.append(load())
            t = time.perf_counter()
            c = Cluster(workers=n, extra=1).build()
            builds.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.teardown()
            teardowns.append(time.perf_counter() - t)
        print(
            f"{n:3d} workers (+1 dashboard host): build {spread(builds, '{:.2f}')} s, "
            f"teardown {spread(teardowns, '{:.2f}')} s  ({args.rounds} rounds; load "
            f"{spread(loads, '{:.2f}')})"
        )


if __name__ == "__main__":
    main()
