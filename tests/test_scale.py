"""512 hosts: the test cluster's zone served by NSD and read by zone transfer, every node
brought to Running by the real Registry and Pool, then one fault of each kind on a few
hosts, each shown with its own reason while the others stay Running.

Marked slow: `pytest -m slow tests` runs it, CI's last stage (README.md, "Run the
tests", says how long it takes).
"""

import os
import time

import pytest

from mlbench_daemon import config
from mlbench_daemon.discovery import Discovery
from mlbench_daemon.nodes import Registry
from mlbench_daemon.ssh import Pool
from tests.cluster.cluster import ZONE, ClusterError
from tests.cluster.memory import cluster_size
from tests.helpers import wait_for

# minutes, not the suite's 300 s hang bound: building 512 hosts (twice, if the first build
# fails), probing each one cold, then the faults; each step below has its own bound
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

HOSTS = int(os.environ.get("MLBENCH_SCALE_HOSTS", "512"))
PROBE, VERIFY = 5.0, 30.0
# Bounds for a machine shared with other work (load 40-50 on 2 cores): on such a machine
# a node may miss a round now and then (Unknown, command-timeout, for one round), so the
# steps below wait until each node has been seen in the wanted state, not all at once.
UP_S = 1200.0  # from the first pass to every node seen Running (305 s at load 40-50)
FAULT_S = 3 * (VERIFY + PROBE) + 300.0  # every fault seen (bound: one fresh-login slot)

# fault, phase, reason (tests/test_nodes.py checks each one's bound at 3 hosts)
FAULTS = [
    ("stop_sshd", "Unknown", "connection-refused"),
    ("stop_listener", "Unknown", "connection-refused"),
    ("freeze_listener", "Unknown", "no-banner"),
    ("rotate_host_key", "Failed", "host-key-changed"),
    ("revoke_key", "Failed", "auth-failed"),
]


def build(make_cluster):
    """The 512-host cluster; built once more if the first build fails (on a loaded machine
    a few of 512 sshds can miss their start-up bound: "did not come up")."""
    try:
        return make_cluster(workers=HOSTS, extra=0, dns="nsd")
    except ClusterError as e:
        print(f"first build failed ({e}); building again")
        return make_cluster(workers=HOSTS, extra=0, dns="nsd")


def seen_until(reg, wanted, timeout, what):
    """Poll the registry until each node named in `wanted` (name -> (phase, reason), or
    name -> phase) has been seen so at least once -> seconds taken; fail naming the nodes
    never seen so, with their state now, after `timeout` s."""
    seen: set[str] = set()
    start = time.monotonic()

    def match(s):
        want = wanted[s.node.name]
        return (s.phase, s.reason) == want if isinstance(want, tuple) else s.phase == want

    def done():
        seen.update(s.node.name for s in reg.nodes() if s.node.name in wanted and match(s))
        return len(seen) == len(wanted)

    try:
        wait_for(done, timeout=timeout, what=what, interval=0.5)
    except AssertionError:
        left = [(s.node.name, s.phase, s.reason) for s in reg.nodes() if s.node.name not in seen]
        raise AssertionError(f"{what}: {len(left)} never seen: {left[:10]}") from None
    return time.monotonic() - start


def test_512_hosts_come_up_running_and_show_each_fault(make_cluster, tmp_path):
    t0 = time.monotonic()
    cluster = build(make_cluster)
    built = time.monotonic() - t0
    path = cluster.write_config(
        tmp_path / "daemon.toml",
        tmp_path / "state",
        discovery={"transfer_zone": ZONE, "refresh_s": 10.0, "timeout_s": 10.0},
        ssh={
            "probe_interval_s": PROBE,
            "verify_interval_s": VERIFY,
            "connect_timeout_s": 10.0,
            "use_system_known_hosts": False,
        },
    )
    cfg = config.load(path, environ={})
    pool = Pool(cfg.ssh)
    reg = Registry(cfg, Discovery(cfg.discovery, ssh_port=cfg.ssh.port), pool)
    reg.start()
    try:
        t1 = time.monotonic()
        assert reg.wait_first_pass(120)
        assert wait_for(lambda: len(reg.nodes()) == HOSTS, timeout=120, what="every member")
        names = [h.name for h in cluster.workers]
        up = seen_until(reg, dict.fromkeys(names, "Running"), UP_S, "every node Running")
        at_once = sum(s.phase == "Running" for s in reg.nodes())
        print(
            f"{HOSTS} hosts: built in {built:.0f} s, each seen Running {time.monotonic() - t1:.0f}"
            f" s after the start ({up:.0f} s after the first pass); {at_once} Running at once"
        )
        print(cluster_size(cluster))
        victims = cluster.workers[1 : 1 + len(FAULTS)]
        pairs = list(zip(FAULTS, victims, strict=True))
        for (fault, _, _), h in pairs:
            getattr(cluster, fault)(h)
        faults = {h.name: (phase, reason) for (_, phase, reason), h in pairs}
        took = seen_until(reg, faults, FAULT_S, "every fault shown")
        # and they stay shown: none of them is Running again
        by_name = {s.node.name: s for s in reg.nodes()}
        assert all(by_name[v].phase != "Running" for v in faults), [by_name[v] for v in faults]
        # the others are Running, each seen so after the faults
        others = {n: "Running" for n in names if n not in faults}
        back = seen_until(reg, others, 120, "the others Running")
        print(f"faults shown in {took:.0f} s, the others seen Running in {back:.0f} s more;")
        print(f"whole test {time.monotonic() - t0:.0f} s (teardown not counted)")
    finally:
        reg.stop()
        pool.close()
