"""Re-attach catch-up on a namespace cluster (needs root).

A job on one master writes N bytes and ends while the daemon is down (kill -9); the
daemon is started again and its follower catches the log up from the master's output
file.  Measured from the log's first new byte to its last (the daemon's start-up is not
counted), against `ssh master cat` of the same bytes (a copy of the job's file, so the
page cache is warm for both) into a file on the state directory's filesystem, in the
same repeat: first in every other repeat, and each path after the page cache is written
back (`sync`), so neither pays for the other's writeback.  Each repeat starts on a
settled cluster (bench.common.settle) and prints the machine's 1-minute load beside its
figures; the summary gives the median and range of each size's ratio, both paths' CPU
seconds per GB (the daemon's from the first new byte; ssh's whole process) and their
ratio.  The job writes '0'..'9' lines, which the master's zstd packs a thousandfold
(jobs/remote.py CATCH_UP): the daemon then pays mostly for writing the log.

Target (issue 21): ratio >= 1.0 (daemon MB/s over `ssh master cat` MB/s).

    python3 -m bench.reattach [--repeats 3] [--gigabytes 0.25 1] [--profile FILE]
        (from the repository root)
"""

import argparse
import os
import resource
import shutil
import signal
import subprocess
import time

from bench.common import Figures, cpu_s, load, settle
from bench.jobs import RSS, rss_kb, wait_state
from tests.cluster import Cluster
from tests.helpers import call_port as call
from tests.helpers import served


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def openssh_cat(c, master, path, into):
    """`ssh master cat path > into` (removed after) -> (seconds, ssh's CPU s, load before)."""
    os.sync()
    at = load()
    cpu0, t = children_cpu_s(), time.perf_counter()
    with open(into, "wb") as out:
        subprocess.run(c.ssh_argv(master, ["cat", str(path)]), stdout=out, timeout=600, check=True)
    took, cpu = time.perf_counter() - t, children_cpu_s() - cpu0
    assert into.stat().st_size == path.stat().st_size
    into.unlink()
    return took, cpu, at


def catch_up(c, daemon, nbytes, ssh_first=False, profile=None):
    """One repeat -> dict of both paths' MB/s, CPU s and load, and the daemon's RSS growth."""
    master, port = c.workers[0], daemon.port
    settle(daemon, len(c.workers), sync=True)
    _status, job = call(
        port,
        "POST",
        "/api/mpi_jobs/",
        {
            "nodes": [master.name],
            "wait": False,
            "program": [str(c.mpi_program), "--bytes", str(nbytes), "--sleep", "1"],
        },
    )
    wait_state(port, job["id"], ("running",))
    daemon.process.kill()
    daemon.process.wait()
    remote = c.home / ".mlbench-daemon" / "jobs" / job["id"]
    deadline = time.monotonic() + 1800
    while not (remote / "rc").exists():
        if time.monotonic() > deadline:
            raise SystemExit("bench: the job did not end within 30 minutes")
        time.sleep(0.05)
    final = (remote / "out").stat().st_size
    same = c.dir / "bench-log"
    shutil.copy(remote / "out", same)
    os.chmod(same, 0o644)
    copy = daemon.state / "openssh-copy"
    if ssh_first:
        theirs = openssh_cat(c, master, same, copy)
    log = daemon.state / "logs" / f"{job['id']}.log"
    before = log.stat().st_size if log.exists() else 0
    os.sync()  # the job's output and the copy are on disk: the follower pays no writeback
    at = load()
    pid = daemon.start().pid
    rss = RSS(pid)
    spy = None
    if profile:  # py-spy's samples of the daemon while it catches up, in a flame-graph text
        argv = ["py-spy", "record", "--nonblocking", "--threads", "-r", "200", "-f", "raw"]
        spy = subprocess.Popen([*argv, "-o", profile, "-p", str(pid)], stdout=subprocess.DEVNULL)
    size, first, cpu0 = before, None, 0.0
    while size < final:
        size = log.stat().st_size if log.exists() else 0
        if first is None and size > before:
            first = time.perf_counter()
            cpu0 = cpu_s(pid)
            rss.base = rss_kb(pid)  # started up: count what streaming adds
        time.sleep(0.01)  # the poller shares the 2 cores; ssh cat has none
    ours = time.perf_counter() - first
    cpu = cpu_s(pid) - cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    growth = rss.growth_mb()
    job = wait_state(port, job["id"], ("succeeded", "failed", "lost", "cancelled"))
    assert job["state"] == "succeeded", job
    assert log.read_bytes() == same.read_bytes(), "the log differs from the job's output"
    log.unlink()  # the next repeat's 1 GB must fit on the disk too
    if not ssh_first:
        theirs = openssh_cat(c, master, same, copy)
    same.unlink()
    gb = (final - before) / 1e9
    return {
        "ours": (final - before) / ours / 1e6,
        "theirs": final / theirs[0] / 1e6,
        "our_cpu": cpu / gb,
        "their_cpu": theirs[1] / (final / 1e9),
        "load": at,
        "their_load": theirs[2],
        "growth": growth,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gigabytes", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--profile", help="py-spy's samples of each catch-up, into PROFILE.<n>")
    args = ap.parse_args()

    print("building a 2-host cluster ...", flush=True)
    with Cluster(workers=2, extra=0) as c:
        log = {"level": "warning"}
        ssh = {"probe_interval_s": 5.0, "verify_interval_s": 300.0}
        with served(c, log=log, ssh=ssh) as daemon:
            for gb in args.gigabytes:
                nbytes = int(gb * 1e9)
                print(f"\nre-attach catch-up of {gb:g} GB ({args.repeats} repeats)", flush=True)
                figs = Figures()
                for i in range(args.repeats):
                    r = catch_up(
                        c, daemon, nbytes, i % 2 == 1, args.profile and f"{args.profile}.{i}"
                    )
                    figs.add("ratio", r["ours"] / r["theirs"], r["load"])
                    figs.add("daemon CPU s/GB", r["our_cpu"], r["load"])
                    figs.add("ssh CPU s/GB", r["their_cpu"], r["their_load"])
                    figs.add("CPU ratio, daemon/ssh", r["our_cpu"] / r["their_cpu"], r["load"])
                    print(
                        f"  #{i + 1}: daemon {r['ours']:6.1f} MB/s (CPU {r['our_cpu']:.2f} s/GB,"
                        f" RSS +{r['growth']:.1f} MB, load {r['load']:.2f})   ssh master cat "
                        f"{r['theirs']:6.1f} MB/s (CPU {r['their_cpu']:.2f} s/GB, load "
                        f"{r['their_load']:.2f}{', first' if i % 2 else ''})   "
                        f"ratio {r['ours'] / r['theirs']:.3f}",
                        flush=True,
                    )
                print("  " + figs.line("ratio", target=">= 1.0"))
                print("  " + figs.line("daemon CPU s/GB", "{:.2f}"))
                print("  " + figs.line("ssh CPU s/GB", "{:.2f}"))
                print("  " + figs.line("CPU ratio, daemon/ssh", "{:.2f}"), flush=True)


if __name__ == "__main__":
    main()
