"""What the daemon's node checks write to a node's sshd log, and whether fail2ban would ban
the head for it (needs root and fail2ban's `fail2ban-regex`).

Builds a 1-host namespace cluster whose sshd logs at LogLevel INFO, runs each kind of
check through the real ssh.Pool a few times, and keeps the lines each one wrote. Then,
for the default intervals (`ssh.probe_interval_s`, `ssh.verify_interval_s`), it writes
one hour of those lines as syslog (a timestamp at each check's real time, one sshd pid
per connection) and runs fail2ban's own sshd filter over it in normal, aggressive and
ddos modes. A source address is banned when it has `maxretry` failures within
`findtime` (Debian's defaults: 5 in 10 minutes); fail2ban never bans the node's own
addresses (`ignoreself`, on by default).

Kinds of check:

- probe loop round: one line each way on the session's long-lived probe loop (every probe
  interval; the node looks at its listening socket, which sshd does not log);
- listener check by the probe loop: the node connects to its own sshd, banner,
  identification + disconnect (every `ssh.listener_interval_s`);
- session probe: `true` over the persistent connection (every `nodes.EXEC_EVERY_S`; every
  probe interval on a node without python3);
- listener check, made from the node (the daemon's way): a direct-tcpip channel over the
  persistent connection to the node's own sshd, banner, identification + disconnect;
- listener check, made from the head (the fallback when the node forbids forwarding; then
  at most every `ssh.HEAD_CHECK_EVERY_S`);
- banner-only connect from the head (the naive check, for comparison);
- fresh login: key exchange, host-key check, auth, `true` (every verify interval);
- a fresh login the node refuses (key revoked, host key changed): a Failed node is
  retried once per verify interval.

    python3 -m bench.sshd_log [--probe-interval 5] [--verify-interval 300]
                              [--listener-interval 120]
    (from the repository root)
"""

import argparse
import collections
import datetime
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.common import default
from mlbench_daemon import config
from mlbench_daemon.nodes import EXEC_EVERY_S
from mlbench_daemon.ssh import HEAD_CHECK_EVERY_S, Pool, Untrusted
from tests.cluster import Cluster

MAXRETRY, FINDTIME = 5, 600  # fail2ban's defaults (jail.conf), also Debian's sshd jail
MODES = ("normal", "aggressive", "ddos")
OPS = 20


def refused(pool, h):
    try:
        pool.verify_login(h.ip, 22, h.fqdn)
    except Untrusted:
        return
    raise AssertionError("the fresh login was not refused")


def banner_only(ip, port=22):
    with socket.create_connection((ip, port), timeout=5) as s:
        s.recv(256)


def capture(log, op, n=OPS):
    """The sshd log lines each of n calls of op() wrote (a list per call)."""
    out = []
    for _ in range(n):
        start = log.stat().st_size
        op()
        # sshd writes after our side returns: wait until the log stops growing
        size, still = log.stat().st_size, 0
        while still < 5:
            subprocess.run(["sleep", "0.02"])
            new = log.stat().st_size
            still = still + 1 if new == size else 0
            size = new
        text = log.read_bytes()[start:].decode(errors="replace")
        out.append([line for line in text.splitlines() if line.strip()])
    return out


def hour_of(schedule):
    """schedule: [(interval_s, phase_s, lines_per_op)] -> syslog text for one hour."""
    t0 = datetime.datetime(2026, 11, 30, 12, 0, 0)
    events = []
    for interval, phase, per_op in schedule:
        t, i = phase, 0
        while t < 3600:
            events.append((t, per_op[i % len(per_op)]))
            t += interval
            i += 1
    events.sort(key=lambda e: e[0])
    rows = []
    for pid, (t, lines) in enumerate(events, 10000):
        stamp = (t0 + datetime.timedelta(seconds=t)).strftime("%b %d %H:%M:%S")
        rows += [f"{stamp} node sshd[{pid}]: {line}" for line in lines]
    return "\n".join(rows) + "\n", t0


def fail2ban(path, mode, t0):
    """[(ip, seconds into the hour)] of each failure fail2ban's sshd filter finds."""
    r = subprocess.run(
        ["fail2ban-regex", "-o", "row", str(path), f"sshd[mode={mode}]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = re.findall(r"\['([^']+)',\s+([\d.]+),", r.stdout)
    return [(ip, float(ts) - t0.timestamp()) for ip, ts in rows]


def worst_window(times):
    times, best, j = sorted(times), 0, 0
    for i, t in enumerate(times):
        while t - times[j] >= FINDTIME:
            j += 1
        best = max(best, i - j + 1)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe-interval", type=float, default=default("ssh", "probe_interval_s"))
    ap.add_argument("--verify-interval", type=float, default=default("ssh", "verify_interval_s"))
    ap.add_argument(
        "--listener-interval", type=float, default=default("ssh", "listener_interval_s")
    )
    args = ap.parse_args()
    if not shutil.which("fail2ban-regex"):
        raise SystemExit("needs fail2ban-regex (Debian package fail2ban)")
    P, V, L = args.probe_interval, args.verify_interval, args.listener_interval

    c = Cluster(workers=1, extra=0, sshd_log_level="INFO").build()
    work = Path(tempfile.mkdtemp(prefix="mlbench-sshd-log-"))
    try:
        h = c.hosts[0]
        cfg = config.load(
            c.write_config(
                work / "cfg.toml", work / "state", ssh={"use_system_known_hosts": False}
            ),
            environ={},
        )
        pool = Pool(cfg.ssh)
        log = h.dir / "sshd.log"
        pool.probe(h.ip, 22, h.fqdn)
        route = pool.listener.route(h.ip, 22)

        def from_head():  # one check as made when the node forbids forwarding
            route.forwarding, route.head_check = False, None
            try:
                pool.check_listener(h.ip, 22, h.fqdn)
            finally:
                route.forwarding = True

        def loop_round(listener):
            assert pool.watch(h.ip, 22, h.fqdn, listener=listener, timeout=5) is not None

        kinds = {
            "probe loop round": capture(log, lambda: loop_round(False)),
            "listener check by the probe loop": capture(log, lambda: loop_round(True)),
            "session probe": capture(log, lambda: pool.probe(h.ip, 22, h.fqdn)),
            "listener check from the node": capture(
                log, lambda: pool.check_listener(h.ip, 22, h.fqdn)
            ),
            "listener check from the head": capture(log, from_head),
            "banner-only connect from the head": capture(log, lambda: banner_only(h.ip)),
            "fresh login": capture(log, lambda: pool.verify_login(h.ip, 22, h.fqdn)),
        }
        # a broken node is retried once per verify interval: what do those attempts write?
        c.revoke_key(h)
        kinds["fresh login refused (key revoked)"] = capture(log, lambda: refused(pool, h))
        c.restore_key(h)
        c.rotate_host_key(h)
        kinds["fresh login refused (host key changed)"] = capture(log, lambda: refused(pool, h))
        c.restore_host_key(h)
        pool.close()
        assert route.forwarding, "the node refused the check channel"

        print(f"sshd LogLevel INFO; the head is {c.head_ip}, the node {h.ip}\n")
        print("lines one check writes (ports and key fingerprints elided):")
        for kind, ops in kinds.items():
            typical = statistics.median_low(len(op) for op in ops)
            op = next(op for op in ops if len(op) == typical)
            sample = [re.sub(r"port \d+|SHA256:\S+", "…", line) for line in op]
            print(f"  {kind}: {typical} line(s)")
            for line in sample:
                print(f"      {line}")

        per_hour = {
            "probe loop round": (P, 0.0),
            "listener check by the probe loop": (L, 0.1),
            "session probe": (P, 0.0),
            "listener check from the node": (P, 0.1),
            "listener check from the head": (max(P, HEAD_CHECK_EVERY_S), 0.1),
            "banner-only connect from the head": (P, 0.1),
            "fresh login": (V, 0.2),
            "fresh login refused (key revoked)": (V, 0.2),
            "fresh login refused (host key changed)": (V, 0.2),
        }
        setups = {kind: [(*per_hour[kind], kinds[kind])] for kind in kinds}
        setups["daemon defaults: loop round + loop's listener check + `true` + fresh login"] = [
            (*per_hour[k], kinds[k])
            for k in ("probe loop round", "listener check by the probe loop", "fresh login")
        ] + [(EXEC_EVERY_S, 0.3, kinds["session probe"])]
        setups["no python3 on the node: probe + listener from the node + fresh login"] = [
            (*per_hour[k], kinds[k])
            for k in ("session probe", "listener check from the node", "fresh login")
        ]
        setups["no python3, no forwarding: probe + listener from the head + fresh login"] = [
            (*per_hour[k], kinds[k])
            for k in ("session probe", "listener check from the head", "fresh login")
        ]
        print(
            f"\none hour at probe_interval_s = {P:g}, verify_interval_s = {V:g}, "
            f"listener_interval_s = {L:g}; fail2ban "
            f"bans a source with {MAXRETRY} failures within {FINDTIME} s\n"
        )
        print(f"  {'checks':70s} {'lines/h':>7s}  " + "  ".join(f"{m:>22s}" for m in MODES))
        for name, schedule in setups.items():
            text, t0 = hour_of(schedule)
            path = work / (re.sub(r"\W+", "_", name) + ".log")
            path.write_text(text)
            cells = []
            for mode in MODES:
                fails = fail2ban(path, mode, t0)
                by_ip = collections.defaultdict(list)
                for ip, t in fails:
                    by_ip[ip].append(t)
                head = by_ip.get(c.head_ip, [])
                node = by_ip.get(h.ip, [])
                banned = worst_window(head) >= MAXRETRY
                cell = f"head {len(head)}/h max{worst_window(head)}"
                cell += f" node {len(node)}" if node else ""
                cells.append(f"{cell}{' BAN' if banned else ''}")
            lines = sum(1 for line in text.splitlines() if line)
            print(f"  {name:70s} {lines:7d}  " + "  ".join(f"{x:>22s}" for x in cells))
        print(
            "\n(head N/h maxM: failures from the head's address per hour, most within any "
            f"{FINDTIME} s; node N: failures from the node's own address, which fail2ban "
            "ignores (ignoreself); BAN: the head would be banned)"
        )
    finally:
        c.teardown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
