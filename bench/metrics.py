"""Metrics benchmarks (issue 22), each against a baseline measured in the same run.

    python3 -m bench.metrics summarize [--points 100000] [--repeats 5] [--requests 20]
    python3 -m bench.metrics sampling [--hosts 32] [--window 30] [--repeats 3]

`summarize`: ``GET /api/metrics/<run>?metric_type=run&summarize=100`` over one series of
--points points, served by the daemon's app under waitress on loopback (a real
MetricStore in a temporary dir): p50 of --requests requests per repeat, against the
unsummarised GET of the same series in the same repeat (requests alternate).  Target:
p50 <= 50 ms.

`sampling` (root: builds a --hosts cluster): two daemons serve the same cluster at the
default intervals (probe 5 s, ``metrics.sample_interval_s`` 5 s), one with a live run
over every host (a dict-backed RunLookup: its nodes are sampled), one without (the
baseline); after both settle, each one's own CPU over the same --window seconds,
--repeats times.  Target: the run's daemon <= 1% of one core above the baseline.
Every figure is printed with the machine's load.
"""

import argparse
import contextlib
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Figures, cpu_s, load, settle

ROOT = Path(__file__).resolve().parent.parent


def p50_ms(conn, path, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def summarize(args):
    import waitress.server

    from mlbench_daemon import api
    from mlbench_daemon.metricstore import MetricStore, Point, format_date
    from tests.test_metrics_logic import DictRuns, Run

    with tempfile.TemporaryDirectory() as work:
        store = MetricStore(os.path.join(work, "metrics.sqlite"), queue_size=args.points + 1)
        t0 = time.time() - args.points
        for i in range(args.points):
            store.add(Point(1, "loss", str(1.0 / (i + 1)), format_date(t0 + i)))
        store.flush(timeout=120)
        app = api.make_app(None, None, metric_store=store, run_lookup=DictRuns(Run(1, "b", ())))
        server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=4)
        threading.Thread(target=server.run, daemon=True).start()
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=120)
        base = "/api/metrics/1?metric_type=run"
        figures = Figures()
        for _ in range(args.repeats):
            p50_ms(conn, base + "&summarize=100", 3)  # warm
            at = load()
            summed, whole = [], []
            for i in range(args.requests):  # alternated, so both see the same machine
                order = [(summed, "&summarize=100"), (whole, "")]
                for into, q in order if i % 2 == 0 else order[::-1]:
                    into.append(p50_ms(conn, base + q, 1))
            s, w = statistics.median(summed), statistics.median(whole)
            figures.add("GET summarize=100, p50 ms", s, at)
            figures.add("GET unsummarised, p50 ms", w, at)
            figures.add("ratio summarised / unsummarised", s / w, at)
        print(f"{args.points} points in one series:")
        print(figures.line("GET summarize=100, p50 ms", "{:.1f}", "<= 50 ms"))
        print(figures.line("GET unsummarised, p50 ms", "{:.1f}"))
        print(figures.line("ratio summarised / unsummarised", "{:.3f}"))
        server.close()
        store.close()


class Daemon:
    """A daemon subprocess (`_serve`), with or without a live run over `nodes`."""

    def __init__(self, cluster, work, name, nodes):
        from tests.helpers import free_port

        self.port = free_port()
        self.config = cluster.write_config(
            work / f"{name}.toml",
            work / name,
            server={"port": self.port},
            log={"level": "warning"},
        )
        argv = [sys.executable, "-m", "bench.metrics", "_serve", str(self.config), *nodes]
        self.process = subprocess.Popen(argv, cwd=ROOT)


def serve(args):
    """The daemon of the `sampling` bench: server.Daemon with a run over args.nodes."""
    from mlbench_daemon import config, logs, server
    from tests.test_metrics_logic import DictRuns, Run

    cfg = config.load(args.config)
    logs.setup(cfg.log.level)
    runs = (
        DictRuns(Run(1, "bench", tuple(args.nodes), created_at=time.time())) if args.nodes else None
    )
    sys.exit(server.Daemon(cfg, runs=runs).run())


def sampling(args):
    from tests.cluster import Cluster
    from tests.cluster.cluster import stop_process
    from tests.helpers import call_port

    cluster = Cluster(workers=args.hosts, extra=0).build()
    try:
        with tempfile.TemporaryDirectory(prefix="mlbench-") as tmp, contextlib.ExitStack() as stack:
            work = Path(tmp)
            os.chmod(work, 0o755)
            names = [h.name for h in cluster.workers]
            idle = Daemon(cluster, work, "idle", [])
            stack.callback(stop_process, idle.process)
            run = Daemon(cluster, work, "run", names)
            stack.callback(stop_process, run.process)
            for d in (idle, run):
                settle(d, len(names))
            figures = Figures()
            for _ in range(args.repeats):
                at = load()
                c0 = {d: cpu_s(d.process.pid) for d in (idle, run)}
                t0 = time.perf_counter()
                time.sleep(args.window)
                dt = time.perf_counter() - t0
                use = {d: (cpu_s(d.process.pid) - c0[d]) / dt * 100 for d in (idle, run)}
                figures.add("daemon with a live run, % of a core", use[run], at)
                figures.add("daemon without runs, % of a core", use[idle], at)
                figures.add("difference, % of a core", use[run] - use[idle], at)
            _, pod = call_port(run.port, "GET", f"/api/metrics/{names[-1]}", timeout=60)
            stored = {k: len(v) for k, v in pod.items()}
            print(f"{len(names)} hosts, samples every 5 s; {names[-1]}'s points: {stored}")
            print(figures.line("daemon with a live run, % of a core", "{:.2f}"))
            print(figures.line("daemon without runs, % of a core", "{:.2f}"))
            print(figures.line("difference, % of a core", "{:.2f}", "<= 1"))
    finally:
        cluster.teardown()


def main():
    p = argparse.ArgumentParser(prog="bench.metrics")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--points", type=int, default=100_000)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--requests", type=int, default=20)
    s = sub.add_parser("sampling")
    s.add_argument("--hosts", type=int, default=32)
    s.add_argument("--window", type=float, default=30.0)
    s.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("_serve")
    s.add_argument("config")
    s.add_argument("nodes", nargs="*")
    args = p.parse_args()
    {"summarize": summarize, "sampling": sampling, "_serve": serve}[args.what](args)


if __name__ == "__main__":
    main()
