"""Node-status benchmark on a 32-host namespace cluster (needs root).

Prints, with the baseline measured in the same run:

- a forced full re-probe through the API (`GET /api/nodes/?refresh=1`), warm
  (persistent connections open) and cold (every connection dropped first),
  against a parallel OpenSSH sweep (`ssh -o BatchMode=yes host true` to every
  host at once, the way Horovod checks hosts);
- `GET /api/nodes/` latency p50/p99 with one client, and requests/s with 32
  concurrent clients (keep-alive connections, separate client processes).

Targets: warm <= 0.05x the sweep, cold <= 0.5x, p50 <= 2 ms, >= 1000 req/s
with zero errors.

    python3 -m bench.nodes [--hosts 32] [--rounds 5]   (from the repository root)
"""

import argparse
import http.client
import json
import multiprocessing
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import Cluster, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def get(conn, path):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    return r.status, body


def openssh_sweep(c):
    """Every host at once with OpenSSH, as a person or Horovod would check them."""
    t = time.perf_counter()
    procs = [
        subprocess.Popen(
            c.ssh_argv(h, ["true"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for h in c.workers
    ]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t
    assert codes == [0] * len(codes), f"OpenSSH sweep failed: {codes}"
    return elapsed


def refresh(conn, n):
    t = time.perf_counter()
    status, body = get(conn, "/api/nodes/?refresh=1")
    elapsed = time.perf_counter() - t
    nodes = json.loads(body)
    running = sum(1 for x in nodes if x["phase"] == "Running")
    assert status == 200 and running == n, (
        f"refresh: HTTP {status}, {running}/{n} Running: {nodes[:2]}"
    )
    return elapsed


def _client(port, deadline, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ok = errors = 0
    while time.monotonic() < deadline:
        try:
            status, _ = get(conn, "/api/nodes/")
            ok += status == 200
            errors += status != 200
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out.put((ok, errors))


def wrk(port, clients, seconds):
    """req/s and errors from wrk (a C load generator), which leaves the CPU to the daemon."""
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(clients),
            "-d",
            f"{max(1, round(seconds))}s",
            f"http://127.0.0.1:{port}/api/nodes/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|timeout) (\d+)", out))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return rps, errors


def throughput(port, clients, seconds):
    """req/s of `clients` keep-alive clients in separate Python processes."""
    out = multiprocessing.Queue()
    deadline = time.monotonic() + seconds
    procs = [
        multiprocessing.Process(target=_client, args=(port, deadline, out)) for _ in range(clients)
    ]
    t = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 30) for _ in procs]
    elapsed = time.perf_counter() - t
    for p in procs:
        p.join(10)
    ok = sum(r[0] for r in results)
    return ok / elapsed, sum(r[1] for r in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the load run")
    args = ap.parse_args()

    print(f"building a {args.hosts}-host cluster ...", flush=True)
    c = Cluster(workers=args.hosts, extra=0).build()
    work = Path(tempfile.mkdtemp(prefix="mlbench-bench-"))
    daemon = None
    try:
        port = free_port()
        cfg = c.write_config(
            work / "cfg.toml",
            work / "state",
            server={"port": port, "threads": 8},
            ssh={"probe_interval_s": 60.0, "connect_timeout_s": 5.0, "max_connects": 32},
            discovery={"refresh_s": 60.0},
        )
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlbench_daemon",
                "serve",
                "--config",
                str(cfg),
                "--log-level",
                "warning",
            ]
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(conn, "/healthz")[0] == 200:
                    break
            except OSError:
                conn.close()
                if time.monotonic() > deadline:
                    raise SystemExit("daemon did not come up") from None
                time.sleep(0.2)

        n = len(c.workers)
        sweep, warm, cold = [], [], []
        refresh(conn, n)  # connections open
        for _ in range(args.rounds):
            sweep.append(openssh_sweep(c))
            warm.append(refresh(conn, n))
            # cold: the hosts drop every connection (sshd restarted), so the
            # daemon must reconnect to all of them inside this refresh
            for h in c.workers:
                c.stop_sshd(h)
                c.start_sshd(h)
            cold.append(refresh(conn, n))
            warm.append(refresh(conn, n))

        lat = []
        for _ in range(2000):
            t = time.perf_counter()
            status, _ = get(conn, "/api/nodes/")
            lat.append(time.perf_counter() - t)
            assert status == 200
        lat.sort()
        load = wrk if shutil.which("wrk") else throughput
        rps, errors = load(port, 32, args.seconds)

        med = statistics.median
        s = med(sweep)
        print(f"\n{n} hosts, medians of {args.rounds} rounds")
        print(f"  OpenSSH parallel sweep (baseline)  {s * 1000:8.1f} ms")
        print(
            f"  forced re-probe, warm              {med(warm) * 1000:8.1f} ms   "
            f"ratio {med(warm) / s:.3f}  (target <= 0.05)"
        )
        print(
            f"  forced re-probe, cold              {med(cold) * 1000:8.1f} ms   "
            f"ratio {med(cold) / s:.3f}  (target <= 0.5)"
        )
        print(
            f"  GET /api/nodes/ 1 client           p50 {lat[len(lat) // 2] * 1000:.2f} ms   "
            f"p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms  (target p50 <= 2 ms)"
        )
        print(
            f"  GET /api/nodes/ 32 clients         {rps:8.0f} req/s, {errors} errors  "
            "(target >= 1000, 0)"
            f"  [load from {load.__name__}]"
        )
    finally:
        if daemon:
            stop_process(daemon)
        c.teardown()


if __name__ == "__main__":
    main()
