"""Metrics ingest through the reverse forward (issue 22 item 4; needs root).

A 2-worker namespace cluster; the daemon (server.Daemon, in this process, bound to
loopback) gives a run its capability URL through the run_env hook: each node's
127.0.0.1:<metrics.forward_port> is a reverse forward on the daemon's SSH session.  8
posting processes (4 per node) post one point per request, each on a new connection
(as mlbench-core's ApiClient does: ``requests.post`` without a session), as fast as they
can for --seconds.  The baseline: the same posters against a bare ``http.server`` on the
head (another process) reached through the same kind of forward (another port on the
same sessions).  The two paths alternate, --repeats times each; every figure has the
machine's load beside it.

Per path: points/s (all posters), the p99 of one POST (connect to answer, as the poster
sees it), and the daemon process's CPU (share of one core) over the window.  On the
baseline path the daemon only pipes the forwarded connections, so its CPU per POST there
is what one forwarded connection costs.

The daemon's side is the real thing: a live run (POST /api/runs/, holding both nodes with
a long sleep) whose capability URL the posters use, and the real ``POST /api/metrics/``
storing every point in the metric store.  The posters send what mlbench-core's
``post_metric`` sends (a form: run_id, name, value, cumulative, date, metadata), each
poster its own series; the node's python3 has no ``requests``, so they use http.client,
one connection per POST.

    python3 -m bench.ingest [--seconds 30] [--repeats 2]   (from the repository root)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.common import Figures, cpu_s, load
from tests.cluster import Cluster
from tests.helpers import HANG, free_port, wait_for

POSTERS_PER_NODE = 4
FORWARD_PORT = 18080  # the daemon's path (metrics.forward_port)
BARE_PORT = 18081  # the baseline's path, forwarded the same way

POSTER = r"""
import datetime, http.client, json, os, sys, time, urllib.parse
host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
form = {"run_id": sys.argv[5], "name": "loss-%s-%d" % (os.uname().nodename, os.getpid()),
        "value": "0.5", "cumulative": "False", "metadata": ""}
hdrs = {"Content-Type": "application/x-www-form-urlencoded"}
lat, bad, end = [], 0, time.monotonic() + seconds
while time.monotonic() < end:
    t = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=60)
    body = urllib.parse.urlencode({**form, "date": str(datetime.datetime.utcnow())})
    c.request("POST", path, body, hdrs)
    r = c.getresponse(); r.read(); c.close()
    lat.append(time.perf_counter() - t)
    bad += r.status != 201
lat.sort()
print(json.dumps({"n": len(lat), "bad": bad,
                  "p99": lat[int(0.99 * (len(lat) - 1))] if lat else None}))
"""

BARE = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # headers and body are two writes (as waitress: no delay)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(201); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"""


def start_run(d):
    """A live run holding both nodes (a long sleep), created through the REST API as a
    client would; -> (run id, its capability path), the path as the real hook gave it."""
    given, hook = [], d.runs.run_env

    def passing(run, nodes):
        given.append(hook(run, nodes))
        return given[-1]

    d.runs.run_env = passing
    form = {"name": "ingest", "num_workers": "2", "image_name": "custom_image",
            "custom_image_name": "sleep",
            "custom_image_command": "sleep 100000", "run_all_nodes": "false"}  # fmt: skip
    req = urllib.request.Request(d.url + "/api/runs/", data=urllib.parse.urlencode(form).encode())
    with urllib.request.urlopen(req, timeout=HANG) as r:
        run_id = json.load(r)["id"]

    def started():
        with urllib.request.urlopen(f"{d.url}/api/runs/{run_id}", timeout=HANG) as r:
            return json.load(r)["state"] == "started" and bool(given)

    wait_for(started, what="the run to start")
    assert not given[0].notes, given[0].notes
    return run_id, given[0].env["MLBENCH_DASHBOARD_URL"].split("/", 1)[1]


def delete_run(d, run_id):
    req = urllib.request.Request(f"{d.url}/api/runs/{run_id}", method="DELETE")
    with urllib.request.urlopen(req, timeout=HANG) as r:
        assert r.status == 204


def phase(cluster, workers, path, seconds, run_id):
    """All posters at once on `path` (the node's URL path) -> (points/s, p99 s, bad)."""
    port = FORWARD_PORT if path.startswith("/run-cap/") else BARE_PORT
    procs = [
        subprocess.Popen(
            cluster.ssh_argv(
                w,
                ["python3", "-c", POSTER, "127.0.0.1", str(port), path, str(seconds), str(run_id)],
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in workers
        for _ in range(POSTERS_PER_NODE)
    ]
    outs = [json.loads(p.communicate(timeout=seconds + HANG)[0]) for p in procs]
    n = sum(o["n"] for o in outs)
    p99 = max(o["p99"] for o in outs if o["p99"] is not None)
    return n / seconds, p99, sum(o["bad"] for o in outs), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from mlbench_daemon import config, server

    cluster = Cluster(workers=2, extra=0).build()
    bare = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        cfg_path = cluster.write_config(
            tmp / "daemon.toml", tmp / "state", server={"port": 0}, log={"level": "warning"}
        )
        d = server.Daemon(config.load(cfg_path))
        threading.Thread(target=d.run, name="daemon", daemon=True).start()
        wait_for(lambda: d.url is not None, what="the daemon to bind")
        wait_for(
            lambda: sum(n.phase == "Running" for n in d.registry.nodes()) == 2,
            what="both nodes Running",
        )
        nodes = [s.node for s in d.registry.nodes()]
        run_id, cap_path = start_run(d)
        bare_port = free_port()
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE, str(bare_port)], stdout=subprocess.PIPE, text=True
        )
        assert bare.stdout.readline().strip() == "ready"
        for n in nodes:
            d.pool.forward(n.ip, n.port, BARE_PORT, ("127.0.0.1", bare_port))
        paths = {"daemon": f"/{cap_path}/api/metrics/", "bare": "/api/metrics/"}
        figs = Figures()
        time.sleep(2.0)
        print(f"bench.ingest: {len(nodes) * POSTERS_PER_NODE} posters for {args.seconds:g} s "
              f"per window, {args.repeats} repeats", flush=True)  # fmt: skip
        for rep in range(args.repeats):
            order = ("daemon", "bare") if rep % 2 == 0 else ("bare", "daemon")
            rates = {}
            for name in order:
                piped0, c0, t0 = d.pool.forwards.piped, cpu_s(os.getpid()), time.perf_counter()
                at = load()
                rate, p99, bad, n = phase(
                    cluster, cluster.workers, paths[name], args.seconds, run_id
                )
                cpu = (cpu_s(os.getpid()) - c0) / (time.perf_counter() - t0)
                piped = d.pool.forwards.piped - piped0
                rates[name] = rate
                figs.add(f"{name} points/s", rate, at)
                figs.add(f"{name} p99 ms", p99 * 1000, at)
                figs.add(f"{name} daemon CPU (share of a core)", cpu, at)
                figs.add(f"{name} daemon CPU ms per POST", cpu * args.seconds / n * 1000, at)
                print(f"  {name}: {rate:.0f} points/s, p99 {p99 * 1000:.1f} ms, daemon CPU "
                      f"{cpu:.0%} of a core, {piped} forwarded connections, {bad} not 201; "
                      f"load {at:.2f}", flush=True)  # fmt: skip
            figs.add("ratio daemon/bare", rates["daemon"] / rates["bare"], load())
        for name in figs.values:
            target = "0.5 or more" if name.startswith("ratio") else ""
            print(figs.line(name, "{:.3f}", target))
        delete_run(d, run_id)
        d.stop()
    finally:
        if bare is not None:
            bare.kill()
        cluster.teardown()


if __name__ == "__main__":
    main()
