"""512 hosts: the test cluster's zone served by NSD and read by zone transfer, every node
brought to Running by the real Registry and Pool, then one fault of each kind on a few
hosts, each shown with its own reason while the others stay Running.

Marked slow: `pytest -m slow tests` runs it (not CI's default stage: see README.md,
"Run the tests", for how long it takes).
"""

import os
import time

import pytest

from mlbench_daemon import config
from mlbench_daemon.discovery import Discovery
from mlbench_daemon.nodes import Registry
from mlbench_daemon.ssh import Pool
from tests.cluster.cluster import ZONE
from tests.cluster.memory import cluster_size
from tests.helpers import wait_for

# minutes, not the suite's 300 s hang bound: building 512 hosts and probing each one cold
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

HOSTS = int(os.environ.get("MLBENCH_SCALE_HOSTS", "512"))
PROBE, VERIFY = 5.0, 30.0

# fault, phase, reason (tests/test_nodes.py checks each one's bound at 3 hosts)
FAULTS = [
    ("stop_sshd", "Unknown", "connection-refused"),
    ("stop_listener", "Unknown", "connection-refused"),
    ("freeze_listener", "Unknown", "no-banner"),
    ("rotate_host_key", "Failed", "host-key-changed"),
    ("revoke_key", "Failed", "auth-failed"),
]


def test_512_hosts_come_up_running_and_show_each_fault(make_cluster, tmp_path):
    t0 = time.monotonic()
    cluster = make_cluster(workers=HOSTS, extra=0, dns="nsd")
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
        assert reg.wait_first_pass(60)
        running = lambda: [s for s in reg.nodes() if s.phase == "Running"]  # noqa: E731
        assert wait_for(lambda: len(running()) == HOSTS, timeout=900, what="all Running"), (
            f"{len(running())} of {HOSTS} Running"
        )
        up = time.monotonic() - t1
        print(f"{HOSTS} hosts: built in {built:.0f} s, all Running {up:.0f} s later")
        print(cluster_size(cluster))
        victims = cluster.workers[1 : 1 + len(FAULTS)]
        for (fault, _, _), h in zip(FAULTS, victims, strict=True):
            getattr(cluster, fault)(h)

        def shown():
            by_name = {s.node.name: s for s in reg.nodes()}
            return all(
                (by_name[h.name].phase, by_name[h.name].reason) == (phase, reason)
                for (_, phase, reason), h in zip(FAULTS, victims, strict=True)
            )

        assert wait_for(shown, timeout=3 * (VERIFY + PROBE) + 60, what="every fault shown"), [
            (s.node.name, s.phase, s.reason) for s in reg.nodes() if s.phase != "Running"
        ]
        # the others are Running (one may miss a round on a loaded machine, and come back)
        victim_names = {h.name for h in victims}
        others = lambda: [  # noqa: E731
            (s.node.name, s.phase, s.reason)
            for s in reg.nodes()
            if s.node.name not in victim_names and s.phase != "Running"
        ]
        assert wait_for(lambda: not others(), timeout=60, what="the others Running"), others()
    finally:
        reg.stop()
        pool.close()
