"""Discovery past one DNS message: time and CPU of one discovery pass at 512 and 2,000
members, DNS only (no sshd), each design against the same NSD on loopback (no root).

Designs, each on its own copy of the members (SRV + A + two-key TXT per member):

* `srv`: today's default, one SRV name; its answer must fit one message (NSD gives none
  past about 700 members, so it is skipped there);
* `shards`: the members split over several service names of at most --shard members,
  one Discovery per name (what a sharded config would run each pass);
* `transfer`: `discovery.transfer_zone`, a copy of the zone kept by AXFR then IXFR;
* `transfer-knot`: the same served by Knot DNS, which answers IXFR with the changes only;
* `transfer-bind`: the same served by BIND 9, which also answers IXFR with the changes
  only, but loads no zone whose SRV set is over 64 KB (about 1,300 members).

For each: `cold` (a new Discovery's first pass: every name read), `idle` (a pass with
nothing changed), `one change` (one member left or came back, the zone reloaded before
the timed pass). Wall time and this process's CPU per pass, and NSD's own CPU
(NSD or Knot, from /proc) beside it: median and range over --repeats, with the load average beside
each line. NSD 4.6 answers an IXFR for an older serial with the whole zone, so its
`transfer / one change` is a full transfer; a server that keeps IXFR journals (NSD >= 4.7
with store-ixfr, Knot, BIND) sends only the change.

    python3 -m bench.discovery [--members 512 2000] [--repeats 5] [--shard 500]
"""

import argparse
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

from bench.common import cpu_s
from mlbench_daemon.config import SETTINGS
from mlbench_daemon.discovery import Discovery, DiscoveryError
from tests.cluster.nsd import NSD, Bind, Knot, free_port

ZONE = "cluster.local"
NS = "default.svc.cluster.local"


def records(services, without=None):
    """{service: [member index]} -> the zone's lines (member `without` left out)."""
    lines = []
    for svc, members in services.items():
        for i in members:
            if i == without:
                continue
            host = f"w-{i}.{svc}."
            lines.append(f"_ssh._tcp.{svc}. 60 IN SRV 0 0 22 {host}")
            lines.append(f"{host} 60 IN A 10.{i // 65536}.{i // 256 % 256}.{i % 256}")
            lines.append(f'{host} 60 IN TXT "component=worker" "rack=r{i % 16}"')
    return lines


def discovery(port, service, **kw):
    values = {k: d for s, k, _, d, _ in SETTINGS if s == "discovery"}
    # a deadline long enough for a cold pass of query mode (one TXT query per member)
    values.update(service=service, nameservers=[f"127.0.0.1:{port}"], timeout_s=120.0, **kw)
    return Discovery(types.SimpleNamespace(**values))


def nsd_cpu(server):
    """NSD's CPU seconds so far (its processes: the main one and its children)."""
    total = 0.0
    for pid in [server.proc.pid, *_children(server.proc.pid)]:
        try:
            total += cpu_s(pid)
        except FileNotFoundError:
            continue
    return total


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for kid in map(int, kids):
            out += [kid, *_children(kid)]
    return out


def timed(server, passes):
    """(wall s, our CPU s, NSD CPU s) of running every pass once."""
    w, c, n = time.perf_counter(), time.process_time(), nsd_cpu(server)
    for p in passes:
        p.discover()
    return time.perf_counter() - w, time.process_time() - c, nsd_cpu(server) - n


def ms(values, width):
    """'median (min-max)' of sorted seconds, in ms."""
    med = statistics.median(values) * 1e3
    return f"{med:{width}.1f} ms ({values[0] * 1e3:.1f}-{values[-1] * 1e3:.1f})"


def run(design, n, shard, repeats, tmp):
    if design == "shards":
        services = {
            f"s{k}.{NS}": range(k * shard, min(n, (k + 1) * shard)) for k in range(-(-n // shard))
        }
    else:
        services = {f"workers.{NS}": range(n)}
    kind = {"transfer-knot": Knot, "transfer-bind": Bind}.get(design, NSD)
    server = kind(Path(tmp) / f"{design}{n}", "127.0.0.1", free_port(), ttl=60)
    server.write({ZONE: records(services)})
    try:
        server.start()
    except RuntimeError as e:  # BIND past 64 KB of one RRset: "ran out of space"
        why = [line for line in str(e).splitlines() if "zone" in line and "failed" in line]
        server.stop()
        return f"{design:8s} {n:5d} members: the server serves no zone ({(why or [str(e)])[-1]})"
    figures = {"cold": [], "idle": [], "one change": []}
    try:
        for r in range(repeats):
            kw = {"transfer_zone": ZONE} if design.startswith("transfer") else {}
            passes = [discovery(server.port, svc, **kw) for svc in services]
            try:
                figures["cold"].append(timed(server, passes))
            except DiscoveryError as e:
                tail = server.log()[-400:].replace("\n", " | ")
                return f"{design:8s} {n:5d} members: no list ({e}); server log: {tail}"
            figures["idle"].append(timed(server, passes))
            gone = r % 2 == 0  # member w-7 leaves, then comes back
            server.write({ZONE: records(services, without=7 if gone else None)})
            server.reload()
            figures["one change"].append(timed(server, passes))
            assert (passes[0].discover()[0][7].name != "w-7") == gone
    finally:
        server.stop()
    lines = []
    for what, runs in figures.items():
        wall, cpu, nsd = (sorted(col) for col in zip(*runs, strict=True))
        lines.append(
            f"{design:8s} {n:5d} members, {what:10s}: wall {ms(wall, 7)}, daemon CPU {ms(cpu, 7)}"
            f", server CPU {statistics.median(nsd) * 1e3:5.0f} ms; "
            f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, nargs="+", default=[512, 2000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shard", type=int, default=500)
    designs = ["srv", "shards", "transfer", "transfer-knot", "transfer-bind"]
    ap.add_argument("--designs", nargs="+", choices=designs, default=designs)
    a = ap.parse_args()
    print(f"median (range) of {a.repeats} repeats, one pass each")
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.members:
            for design in a.designs:
                print(run(design, n, a.shard, a.repeats, tmp), flush=True)


if __name__ == "__main__":
    main()
