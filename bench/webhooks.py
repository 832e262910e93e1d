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
"""

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import Figures, cpu_s, settle
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=50)
    a = p.parse_args()
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
