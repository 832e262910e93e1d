"""What a test cluster holds in memory, for the scale test and bench.nodes."""

from pathlib import Path

from .cluster import _children


def memory_mb(pids, field):
    """Sum of `field` ("Rss:" counts shared pages in each process, "Pss:" shares them
    out) over pids, in MB."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(ln.split()[1]) for ln in rollup.splitlines() if ln.startswith(field))
    return total / 1024


def cluster_size(cluster):
    """What the cluster holds in memory, as one line: every process under each host's
    init (init, the sshd listener, and per connection from the head one privileged and one
    user sshd, with the probe loop's python3 under it) and the DNS server's."""
    kids = _children()
    per_host = []
    for h in cluster.hosts:
        tree, todo = [], [h.init_pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo.extend(kids.get(p, []))
        per_host.append(tree)
    procs = sum(len(t) for t in per_host)
    pids = [p for t in per_host for p in t]
    rss, pss = memory_mb(pids, "Rss:"), memory_mb(pids, "Pss:")
    dns = [cluster.dns_pid, *kids.get(cluster.dns_pid, [])]
    mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").open()}
    return (
        f"{len(cluster.hosts)} hosts: {procs} processes under their inits, RSS {rss:.0f} MB,"
        f" PSS {pss:.0f} MB ({pss / len(cluster.hosts):.2f} MB per host);"
        f" {cluster.dns} PSS {memory_mb(dns, 'Pss:'):.1f} MB;"
        f" machine: {mem['MemAvailable'] / 1024:.0f} of {mem['MemTotal'] / 1024:.0f} MB available"
    )
