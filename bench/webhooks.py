"""Webhook fan-out on a namespace cluster (needs root): --jobs jobs (`true`), each making
two events (job.started, job.succeeded: 100 events by default) for 3 receivers on
loopback (tests/receiver.py, checking every signature).

Two daemons serve the same cluster, taking turns repeat by repeat: the baseline without
hooks and one with the 3 hooks.  Each repeat submits the jobs at once (4 run at a time)
and times the last job final (both) and the last event delivered to every receiver (the
hooked one), with the daemon's CPU seconds over that window and the machine's load.
The summary gives the median and range over the repeats of each, and of the ratios
against the baseline's figures of the same repeat.

    python3 -m bench.webhooks [--repeats 3] [--jobs 50]   (from the repository root)

With `--hang` it measures instead the API while a receiver hangs: a third daemon has one
hook to a receiver that reads each POST and never answers (`webhooks.timeout_s` 60, so
every sender stays stuck); each repeat ends --jobs jobs on it and on the baseline, waits
until the hooked daemon's senders all hang, then times --requests `GET /api/nodes/` on
each, the two taking turns request by request.  It reports p50 and p99 of each and their
ratios (hanging / no hooks).

    python3 -m bench.webhooks --hang [--repeats 3] [--jobs 10] [--requests 300]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import Figures, cpu_s, load, settle
from mlbench_daemon.client import Client
from tests.cluster import Cluster
from tests.helpers import HANG, Served, call_port, free_port, stop_process
from tests.receiver import Receiver

SECRET = b"bench-secret"
RECEIVERS = 3


def start(cluster, work, name, **sections):
    port = free_port()
    config = cluster.write_config(
        work / f"{name}.toml", work / f"{name}-state", server={"port": port},
        mpi={"max_concurrent_jobs": 4, "queue_size": 1000}, log={"level": "warning"},
        **sections,
    )  # fmt: skip
    daemon = Served(config, work / f"{name}-state", port, None)
    daemon.start()
    return daemon


def round_(daemon, jobs, receivers, workers):
    """-> (seconds to every job final, to every event delivered or None, CPU s, load)."""
    at_load = settle(daemon, workers)
    before = [len(r.delivered()) for r in receivers]
    c0, t0 = cpu_s(daemon.process.pid), time.perf_counter()
    ids = []
    for _ in range(jobs):
        status, job = call_port(daemon.port, "POST", "/api/mpi_jobs/",
                                {"program": ["true"], "wait": False})  # fmt: skip
        assert status == 202, job
        ids.append(job["id"])
    left, want, deadline = set(ids), 0, time.monotonic() + HANG * 10
    while left:
        assert time.monotonic() < deadline, "jobs never ended"
        for job_id in list(left):
            _, job = call_port(daemon.port, "GET", f"/api/mpi_jobs/{job_id}")
            if job["state"] not in ("pending", "running"):
                # its end, and its start if it ran (a launch can fail at a load of 50)
                want += 1 + (job["started"] is not None)
                left.discard(job_id)
        time.sleep(0.02)
    final_s = time.perf_counter() - t0
    delivered_s = None
    if receivers:
        while any(len(r.delivered()) - b < want for r, b in zip(receivers, before, strict=True)):
            assert time.monotonic() < deadline, "events never delivered"
            time.sleep(0.01)
        delivered_s = time.perf_counter() - t0
        assert all(g["verified"] for r in receivers for g in r.got)
    return final_s, delivered_s, cpu_s(daemon.process.pid) - c0, at_load


def end_jobs(daemon, jobs):
    """Submit `jobs` jobs (`true`) and wait until every one is final."""
    ids = [
        call_port(daemon.port, "POST", "/api/mpi_jobs/", {"program": ["true"], "wait": False})[1][
            "id"
        ]
        for _ in range(jobs)
    ]
    deadline = time.monotonic() + HANG * 10
    for job_id in ids:
        while call_port(daemon.port, "GET", f"/api/mpi_jobs/{job_id}")[1]["state"] in (
            "pending", "running",
        ):  # fmt: skip
            assert time.monotonic() < deadline, "jobs never ended"
            time.sleep(0.05)


def nodes_ms(daemons, requests):
    """`requests` timed `GET /api/nodes/` on each daemon, taking turns -> [ms list] each."""
    clients = [Client(f"http://127.0.0.1:{d.port}") for d in daemons]
    times: list[list[float]] = [[] for _ in daemons]
    for _ in range(requests):
        for client, got in zip(clients, times, strict=True):
            t0 = time.perf_counter()
            assert client.call("GET", "/api/nodes/", timeout=HANG).status == 200
            got.append((time.perf_counter() - t0) * 1000)
    return times


def p99(values):
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def hang_main(a, figures, c, work, secret):
    """The API while a receiver hangs, against a daemon without hooks (module doc)."""
    hung = Receiver(SECRET).start("hang")
    hook = {"name": "hung", "url": hung.url, "secret_file": str(secret)}
    plain = start(c, work, "plain")
    hooked = start(c, work, "hanging", webhooks={"hooks": [hook], "timeout_s": 60.0})
    try:
        for rep in range(a.repeats):
            settle(plain, len(c.workers))
            at_load = settle(hooked, len(c.workers))
            end_jobs(plain, a.jobs)
            end_jobs(hooked, a.jobs)
            deadline = time.monotonic() + HANG
            while len(hung.hung) < min(4, 2 * a.jobs):  # webhooks.concurrency senders stuck
                assert time.monotonic() < deadline, "the senders never reached the receiver"
                time.sleep(0.05)
            base, hanging = nodes_ms([plain, hooked], a.requests)
            after = load()
            print(
                f"repeat {rep + 1}: GET /api/nodes/ p50/p99 no hooks {statistics.median(base):.1f}"
                f"/{p99(base):.1f} ms, receiver hanging {statistics.median(hanging):.1f}/"
                f"{p99(hanging):.1f} ms; {len(hung.hung)} POSTs hanging (load {at_load:.2f}-"
                f"{after:.2f})",
                flush=True,
            )
            figures.add("no hooks: p50 (ms)", statistics.median(base), after)
            figures.add("no hooks: p99 (ms)", p99(base), after)
            figures.add("receiver hanging: p50 (ms)", statistics.median(hanging), after)
            figures.add("receiver hanging: p99 (ms)", p99(hanging), after)
            figures.add("ratio p50", statistics.median(hanging) / statistics.median(base), after)
            figures.add("ratio p99", p99(hanging) / p99(base), after)
    finally:
        for d in (plain, hooked):
            stop_process(d.process)
        hung.stop()
    print(f"GET /api/nodes/ x {a.requests} per daemon per repeat, {len(c.workers)} hosts:")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=None, help="default: 50 (--hang: 10)")
    p.add_argument("--hang", action="store_true", help="the API while a receiver hangs")
    p.add_argument("--requests", type=int, default=300, help="--hang: GETs per daemon")
    a = p.parse_args()
    if a.hang:
        a.jobs = a.jobs or 10
        figures = Figures()
        c = Cluster(workers=3, extra=0).build()
        with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
            secret = Path(tmp) / "hook.secret"
            secret.write_bytes(SECRET)
            secret.chmod(0o600)
            try:
                hang_main(a, figures, c, Path(tmp), secret)
            finally:
                c.teardown()
        for name in figures.values:
            print("  " + figures.line(name, "{:.3f}"))
        return
    a.jobs = a.jobs or 50
    receivers = [Receiver(SECRET).start() for _ in range(RECEIVERS)]
    figures = Figures()
    c = Cluster(workers=3, extra=0).build()
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        work = Path(tmp)
        secret = work / "hook.secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        hooks = [
            {"name": f"r{n}", "url": r.url, "secret_file": str(secret)}
            for n, r in enumerate(receivers)
        ]
        plain = start(c, work, "plain")
        hooked = start(c, work, "hooked", webhooks={"hooks": hooks})
        try:
            for rep in range(a.repeats):
                base = round_(plain, a.jobs, [], len(c.workers))
                got = round_(hooked, a.jobs, receivers, len(c.workers))
                print(
                    f"repeat {rep + 1}: baseline jobs final {base[0]:.2f} s, CPU {base[2]:.2f} s"
                    f" (load {base[3]:.2f}); hooks: jobs final {got[0]:.2f} s, all "
                    f"{2 * a.jobs * RECEIVERS} deliveries {got[1]:.2f} s, CPU {got[2]:.2f} s "
                    f"(load {got[3]:.2f})",
                    flush=True,
                )
                figures.add("baseline: all jobs final (s)", base[0], base[3])
                figures.add("baseline: daemon CPU (s)", base[2], base[3])
                figures.add("hooks: all jobs final (s)", got[0], got[3])
                figures.add("hooks: all events delivered to 3 receivers (s)", got[1], got[3])
                figures.add("hooks: daemon CPU (s)", got[2], got[3])
                figures.add("ratio delivered / baseline jobs final", got[1] / base[0], got[3])
                figures.add("ratio CPU hooks / baseline", got[2] / base[2], got[3])
        finally:
            for d in (plain, hooked):
                stop_process(d.process)
            for r in receivers:
                r.stop()
            c.teardown()
    print(f"{a.jobs} jobs, {2 * a.jobs} events, {RECEIVERS} receivers:")
    for name in figures.values:
        print("  " + figures.line(name, "{:.3f}"))


if __name__ == "__main__":
    main()
