"""The live demo: a real 3-host cluster, the daemon on it, a real MPI job via REST and CLI."""

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.cluster import Cluster, free_port, stop_process
from tests.helpers import serve_argv

ROOT = Path(__file__).resolve().parent.parent


def say(text):
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def http(method, url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def wait_healthy(url, daemon, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"demo: the daemon exited with {daemon.returncode}")
        try:
            return http("GET", f"{url}/healthz", timeout=2)
        except OSError:
            time.sleep(0.2)
    raise SystemExit("demo: the daemon did not come up")


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say("building a 3-worker cluster (+1 dashboard host) in network namespaces")
    cluster = Cluster(workers=3, extra=1).build()
    work = Path(tempfile.mkdtemp(prefix="mlbench-demo-"))
    daemon = None
    try:
        for h in cluster.hosts:
            print(f"  {h.name:36} {h.ip:15} {h.labels}")
        print(f"  DNS {cluster.nameserver} publishes {cluster.service}")
        port = free_port()
        config = cluster.write_config(
            work / "mlbench-daemon.toml", work / "state", server={"host": "127.0.0.1", "port": port}
        )
        url = f"http://127.0.0.1:{port}"
        say(f"starting: mlbench-daemon serve --config {config}")
        daemon = subprocess.Popen(
            serve_argv(config),
            stderr=open(work / "daemon.log", "wb"),
        )
        print(json.dumps(wait_healthy(url, daemon)[1]))

        say(f"curl {url}/api/nodes/")
        _, nodes = http("GET", f"{url}/api/nodes/?refresh=1")
        print(json.dumps(nodes, indent=2))

        say(
            f"curl -X POST {url}/api/mpi_jobs/   "
            "(empty body: the configured MPI program on all Running workers)"
        )
        status, job = http("POST", f"{url}/api/mpi_jobs/")
        print(f"HTTP {status}")
        print(json.dumps(job, indent=2))

        say(
            f"mlbench-daemon run --url {url} -- {cluster.mpi_program} --argv 'hello world' --exit 3"
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlbench_daemon",
                "run",
                "--url",
                url,
                "--",
                str(cluster.mpi_program),
                "--argv",
                "hello world",
                "--exit",
                "3",
            ]
        )
        print(f"(the CLI exited with {r.returncode}: the job's own exit code)")

        say(f"mlbench-daemon jobs --url {url}")
        subprocess.run([sys.executable, "-m", "mlbench_daemon", "jobs", "--url", url])

        say("where to look next")
        print(f"  daemon log:      {work / 'daemon.log'}")
        print(f"  job store:       {work / 'state'} (SQLite + one log file per job)")
        print(f"  metrics:         curl {url}/metrics")
        print(f"  API description: curl {url}/api/openapi.json")
        print("  README.md:       deploying on a real cluster, the API, troubleshooting")
        if sys.stdin.isatty() and "--keep" in sys.argv:
            input("\nthe cluster and daemon stay up until you press Enter... ")
    finally:
        say("tearing down")
        if daemon:
            stop_process(daemon)
        cluster.teardown()
        print("  cluster removed (namespaces, sshd, dnsmasq, cluster user)")


if __name__ == "__main__":
    main()
