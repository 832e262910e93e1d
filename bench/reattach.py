"""Re-attach catch-up on a namespace cluster (needs root).

A job on one master writes N bytes and ends while the daemon is down (kill -9); the
daemon is started again and its follower catches the log up from the master's output
file.  Measured from the log's first new byte to its last (the daemon's start-up is not
counted), against `ssh master cat` of the same bytes (a copy of the job's file, so the
page cache is warm for both) into a file on the state directory's filesystem, run right
after in the same repeat.  Each repeat starts on a settled cluster (every worker Running,
then --settle seconds) and prints the machine's 1-minute load beside its figures; the
summary gives the median and range of each size's ratio, and the daemon's CPU seconds
while it caught up.

Target (issue 21): ratio >= 1.0 (daemon MB/s over `ssh master cat` MB/s).

    python3 -m bench.reattach [--repeats 3] [--gigabytes 0.25 1] [--settle 3]
        (from the repository root)
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import time

from bench.jobs import RSS, rss_kb, wait_state
from tests.cluster import Cluster
from tests.helpers import call_port as call
from tests.helpers import served, wait_hosts_running

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """User + system CPU seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def catch_up(c, daemon, nbytes, settle_s, profile=None):
    """One repeat -> (daemon MB/s, ssh cat MB/s, daemon CPU s, RSS growth MB, load)."""
    master, port = c.workers[0], daemon.port
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
    deadline = time.monotonic() + 600
    while not (remote / "rc").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    final = (remote / "out").stat().st_size
    same = c.dir / "bench-log"
    shutil.copy(remote / "out", same)
    os.chmod(same, 0o644)
    log = daemon.state / "logs" / f"{job['id']}.log"
    before = log.stat().st_size if log.exists() else 0
    time.sleep(settle_s)  # the job's writer and the copy are over
    load = os.getloadavg()[0]
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
    copy = daemon.state / "openssh-copy"
    t = time.perf_counter()
    with open(copy, "wb") as out:
        subprocess.run(c.ssh_argv(master, ["cat", str(same)]), stdout=out, timeout=600, check=True)
    theirs = time.perf_counter() - t
    assert copy.stat().st_size == final
    copy.unlink()
    same.unlink()
    log.unlink()  # the next repeat's 1 GB must fit on the disk too
    wait_hosts_running(port, len(c.workers), process=daemon.process)
    return (final - before) / ours / 1e6, final / theirs / 1e6, cpu, growth, load


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gigabytes", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--settle", type=float, default=3.0)
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
                ratios, cpus = [], []
                for i in range(args.repeats):
                    ours, theirs, cpu, growth, load = catch_up(
                        c, daemon, nbytes, args.settle, args.profile and f"{args.profile}.{i}"
                    )
                    ratios.append(ours / theirs)
                    cpus.append(cpu)
                    print(
                        f"  #{i + 1}: daemon {ours:6.1f} MB/s (CPU {cpu:.2f} s, RSS +{growth:.1f}"
                        f" MB)   ssh master cat {theirs:6.1f} MB/s   ratio {ours / theirs:.3f}"
                        f"   load {load:.2f}",
                        flush=True,
                    )
                print(
                    f"  ratio median {statistics.median(ratios):.3f} range "
                    f"{min(ratios):.3f}-{max(ratios):.3f}   daemon CPU median "
                    f"{statistics.median(cpus):.2f} s  (target >= 1.0)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
