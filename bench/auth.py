"""Auth overhead of named tokens on a namespace cluster (needs root).

Two daemons serve the same cluster at once: the baseline with the single
`server.token_file`, and one with a `server.tokens_file` of 1,000 named tokens
(the request carries the last one added).  Each repeat times --requests
`GET /api/nodes/` on one keep-alive connection to each, the two daemons taking
turns request by request (so both see the same machine), and prints both p50s,
their ratio and the machine's 1-minute load; the summary gives the median and
range of the ratio over the repeats.

Target (issue 24): p50 with 1,000 tokens <= 1.1x the single token's.

    python3 -m bench.auth [--repeats 5] [--requests 2000] [--tokens 1000]
        (from the repository root)
"""

import argparse
import hashlib
import http.client
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from mlbench_daemon import tokens
from mlbench_daemon.vocabulary import Role
from tests.cluster import Cluster
from tests.helpers import HANG, Served, free_port, stop_process, wait_for


def fill(path, count):
    """A tokens file of `count` viewers with their own ids, salts and hashes (written at
    once: `token add` would rewrite and sync the file `count` times)."""
    entries = []
    for n in range(count):
        salt = secrets.token_bytes(16)
        digest = hashlib.sha256(salt + secrets.token_urlsafe(32).encode()).hexdigest()
        entry = {"id": f"{n:012x}", "name": f"user{n}", "role": "viewer", "salt": salt.hex()}
        entries.append({**entry, "hash": digest, "created": "", "revoked": None})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"tokens": entries}, f)


def start(cluster, work, name, **server):
    port = free_port()
    config = cluster.write_config(
        work / f"{name}.toml", work / f"{name}-state", server={"port": port, **server},
        log={"level": "warning"},
    )  # fmt: skip
    daemon = Served(config, work / f"{name}-state", port, None)
    daemon.start()
    return daemon


def running(conn, token, count):
    try:
        conn.request("GET", "/api/nodes/", headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        nodes = json.loads(r.read())
    except (OSError, http.client.HTTPException):
        conn.close()  # not serving yet: the next request opens a new connection
        return False
    return r.status == 200 and sum(n["phase"] == "Running" for n in nodes) == count


def timed_get(conn, token):
    t = time.perf_counter()
    conn.request("GET", "/api/nodes/", headers={"Authorization": f"Bearer {token}"})
    r = conn.getresponse()
    r.read()
    elapsed = time.perf_counter() - t
    assert r.status == 200, r.status
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=3)
    args = ap.parse_args()
    cluster = Cluster(workers=args.workers, extra=0).build()
    work = Path(tempfile.mkdtemp(prefix="mlbench-bench-auth-"))
    daemons = []
    try:
        single = "single-token-" + "x" * 32
        (work / "token").write_text(single + "\n")
        (work / "token").chmod(0o600)
        table = str(work / "tokens.json")
        fill(table, args.tokens - 1)
        named = tokens.add(table, "last", Role.VIEWER)
        daemons = [
            start(cluster, work, "single", token_file=str(work / "token")),
            start(cluster, work, "table", tokens_file=table),
        ]
        conns = [http.client.HTTPConnection("127.0.0.1", d.port, timeout=HANG) for d in daemons]
        secrets = [single, named]
        for conn, token in zip(conns, secrets, strict=True):
            wait_for(lambda c=conn, t=token: running(c, t, args.workers), what="Running nodes")
        print(f"machine: {os.cpu_count()} CPUs; GET /api/nodes/ x {args.requests} per daemon "
              f"per repeat, {args.workers} nodes, tokens table of {args.tokens}")  # fmt: skip
        ratios = []
        for repeat in range(args.repeats):
            times = [[], []]
            for i in range(args.requests):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for k in order:
                    times[k].append(timed_get(conns[k], secrets[k]))
            p50 = [statistics.median(t) * 1000 for t in times]
            ratios.append(p50[1] / p50[0])
            load = os.getloadavg()[0]
            print(f"repeat {repeat + 1}: single p50 {p50[0]:.3f} ms, {args.tokens} tokens p50 "
                  f"{p50[1]:.3f} ms, ratio {ratios[-1]:.3f}  (load {load:.2f})")  # fmt: skip
        print(f"ratio (p50 with {args.tokens} tokens / single token): median "
              f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; "
              f"target <= 1.1  (load {os.getloadavg()[0]:.2f})")  # fmt: skip
    finally:
        for d in daemons:
            stop_process(d.process)
        cluster.teardown()


if __name__ == "__main__":
    main()
