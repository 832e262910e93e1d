"""The live demo: a real 3-host cluster, the daemon on it, a real MPI job via REST and CLI."""

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mlbench_daemon.client import Client
from tests.cluster import Cluster
from tests.helpers import served


def say(text):
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def http(method, url, path, timeout=120):
    """-> (status, decoded answer); a job waits up to `timeout` s."""
    with Client(url).open(method, path, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say("building a 3-worker cluster (+1 dashboard host) in network namespaces")
    cluster = Cluster(workers=3, extra=1).build()
    work = Path(tempfile.mkdtemp(prefix="mlbench-demo-"))
    try:
        for h in cluster.hosts:
            print(f"  {h.name:36} {h.ip:15} {h.labels}")
        print(f"  DNS {cluster.nameserver} publishes {cluster.service}")
        say("starting the daemon, until the workers are Running")
        with served(cluster, work, stderr=open(work / "daemon.log", "wb")) as daemon:
            tour(cluster, work, daemon)
    finally:
        say("tearing down")
        cluster.teardown()
        print("  cluster removed (namespaces, sshd, dnsmasq, cluster user)")


def tour(cluster, work, daemon):
    """What the demo shows, with `daemon` serving `cluster`."""
    url = daemon.url
    say(f"started: mlbench-daemon serve --config {daemon.config}")
    print(json.dumps(http("GET", url, "/healthz")[1]))
    say(f"curl {url}/api/nodes/")
    _, nodes = http("GET", url, "/api/nodes/?refresh=1")
    print(json.dumps(nodes, indent=2))

    say(
        f"curl -X POST {url}/api/mpi_jobs/   "
        "(empty body: the configured MPI program on all Running workers)"
    )
    status, job = http("POST", url, "/api/mpi_jobs/")
    print(f"HTTP {status}")
    print(json.dumps(job, indent=2))

    say(f"mlbench-daemon run --url {url} -- {cluster.mpi_program} --argv 'hello world' --exit 3")
    cli = [sys.executable, "-m", "mlbench_daemon"]
    prog = [str(cluster.mpi_program), "--argv", "hello world", "--exit", "3"]
    r = subprocess.run([*cli, "run", "--url", url, "--", *prog])
    print(f"(the CLI exited with {r.returncode}: the job's own exit code)")

    say(f"mlbench-daemon jobs --url {url}")
    subprocess.run([*cli, "jobs", "--url", url])

    say("where to look next")
    print(f"  daemon log:      {work / 'daemon.log'}")
    print(f"  job store:       {work / 'state'} (SQLite + one log file per job)")
    print(f"  metrics:         curl {url}/metrics")
    print(f"  API description: curl {url}/api/openapi.json")
    print("  README.md:       deploying on a real cluster, the API, troubleshooting")
    if sys.stdin.isatty() and "--keep" in sys.argv:
        input("\nthe cluster and daemon stay up until you press Enter... ")


if __name__ == "__main__":
    main()
