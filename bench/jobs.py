"""Job benchmark on a namespace cluster (needs root).

Prints, with the baseline measured in the same run:

- launch: a synchronous `POST /api/mpi_jobs/` of the short MPI program on 4
  and on 16 hosts, against the same mpirun typed through OpenSSH
  (`ssh master mpirun --host ... prog`), as a person at a terminal would;
- log throughput: a job writing 1 GB, followed into the daemon's log, against
  `ssh master cat` of the same bytes; and the daemon's RSS growth while it
  streams.

Targets: launch ratio <= 0.9; throughput >= 0.8x OpenSSH; RSS growth < 50 MB.

    python3 bench/jobs.py [--rounds 5] [--gigabytes 1]
"""

import argparse
import http.client
import json
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import MPI_ARGS, MPIRUN, Cluster  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, body=None, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def openssh(c, argv, timeout=600):
    return subprocess.run(
        ["ssh", "-F", "none", "-i", str(c.client_key), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={c.known_hosts}",
         "-l", c.user, c.workers[0].ip, shlex.join(argv)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout)


def launch(c, port, n, rounds):
    hosts = c.workers[:n]
    names = [h.name for h in hosts]
    mpirun = [MPIRUN, *MPI_ARGS, "--host", ",".join(h.ip for h in hosts), str(c.mpi_program)]
    ours, theirs = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        r = openssh(c, mpirun)
        theirs.append(time.perf_counter() - t)
        assert r.returncode == 0 and f"allreduce ok {n}".encode() in r.stdout, r.stdout[-500:]
        t = time.perf_counter()
        status, job = call(port, "POST", "/api/mpi_jobs/", {"nodes": names})
        ours.append(time.perf_counter() - t)
        assert status == 200 and job["exit_code"] == 0, job
        assert f"allreduce ok {n}" in job["response"], job["response"][-500:]
    return statistics.median(ours), statistics.median(theirs)


def throughput(c, port, daemon_pid, nbytes):
    """Seconds for the daemon to follow an nbytes job log, and OpenSSH's cat of it."""
    master = c.workers[0]
    base = rss_kb(daemon_pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_kb(daemon_pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    status, job = call(port, "POST", "/api/mpi_jobs/",
                       {"nodes": [master.name], "program": [str(c.mpi_program), "--bytes", str(nbytes)],
                        "wait": False})
    assert status == 202, job
    while True:
        status, job = call(port, "GET", f"/api/mpi_jobs/{job['id']}")
        if job["state"] not in ("pending", "running"):
            break
        time.sleep(0.05)
    ours = time.perf_counter() - t
    done.set()
    sampler.join()
    assert job["state"] == "succeeded", job
    status, chunk = None, None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/api/mpi_jobs/{job['id']}/logs?offset={nbytes}&limit=1")
    r = conn.getresponse()
    r.read()
    size = int(r.getheader("X-Next-Offset"))
    assert size >= nbytes, f"log holds {size} bytes, want >= {nbytes}"
    # the same bytes, already on the master's disk, through OpenSSH
    remote = job.get("remote_dir") or f".mlbench-daemon/jobs/{job['id']}"
    t = time.perf_counter()
    r = subprocess.run(
        ["ssh", "-F", "none", "-i", str(c.client_key), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={c.known_hosts}",
         "-l", c.user, master.ip, shlex.join(["cat", f"{remote}/out"])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600)
    theirs = time.perf_counter() - t
    assert len(r.stdout) >= nbytes, len(r.stdout)
    return ours, theirs, size, (peak[0] - base) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gigabytes", type=float, default=1.0)
    args = ap.parse_args()

    print("building a 16-host cluster ...", flush=True)
    c = Cluster(workers=16, extra=0).build()
    work = Path(tempfile.mkdtemp(prefix="mlbench-bench-"))
    daemon = None
    try:
        port = free_port()
        cfg = c.write_config(work / "cfg.toml", work / "state", server={"port": port},
                             ssh={"probe_interval_s": 5.0, "max_connects": 16})
        daemon = subprocess.Popen([sys.executable, "-m", "mlbench_daemon", "serve",
                                   "--config", str(cfg), "--log-level", "warning"])
        deadline = time.monotonic() + 30
        while True:
            try:
                _, nodes = call(port, "GET", "/api/nodes/?refresh=1", timeout=30)
                if sum(n["phase"] == "Running" for n in nodes) == 16:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("daemon did not see 16 Running hosts")
            time.sleep(0.2)

        print(f"\nlaunch, medians of {args.rounds} rounds")
        for n in (4, 16):
            ours, theirs = launch(c, port, n, args.rounds)
            print(f"  {n:2d} hosts: POST {ours * 1000:7.1f} ms   ssh+mpirun {theirs * 1000:7.1f} ms"
                  f"   ratio {ours / theirs:.2f}  (target <= 0.9)")

        nbytes = int(args.gigabytes * 1e9)
        ours, theirs, size, growth = throughput(c, port, daemon.pid, nbytes)
        print(f"\nlog throughput, {size / 1e9:.2f} GB")
        print(f"  daemon follow (job start to end) {size / ours / 1e6:7.1f} MB/s")
        print(f"  ssh master cat                   {size / theirs / 1e6:7.1f} MB/s")
        print(f"  ratio {theirs / ours:.2f}  (target >= 0.8)")
        print(f"  daemon RSS growth while streaming {growth:.1f} MB  (target < 50)")
    finally:
        if daemon and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        c.teardown()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
