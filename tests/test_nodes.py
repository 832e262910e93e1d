"""nodes.Registry with the real Discovery (cluster dnsmasq) and the real ssh.Pool."""

import contextlib
import time

import pytest

from mlbench_daemon import config
from mlbench_daemon.discovery import REASONS, Discovery, natural_key
from mlbench_daemon.nodes import NodeStatus, Registry
from mlbench_daemon.ssh import Pool
from tests.helpers import wait_for

CONNECT_TIMEOUT = 2.0


def load_cfg(cluster, tmp_path, ssh=None, discovery=None):
    ssh = {
        "connect_timeout_s": CONNECT_TIMEOUT,
        "probe_interval_s": 1.0,
        "use_system_known_hosts": False,
        **(ssh or {}),
    }
    path = cluster.write_config(
        tmp_path / "daemon.toml",
        tmp_path / "state",
        ssh=ssh,
        discovery={"refresh_s": 1.0, **(discovery or {})},
    )
    return config.load(path, environ={})


@contextlib.contextmanager
def running_registry(cluster, tmp_path, start=True, **sections):
    cfg = load_cfg(cluster, tmp_path, **sections)
    pool = Pool(cfg.ssh)
    reg = Registry(cfg, Discovery(cfg.discovery, ssh_port=cfg.ssh.port), pool)
    if start:
        reg.start()
    try:
        yield reg
    finally:
        reg.stop()
        pool.close()


def by_name(reg):
    return {s.node.name: s for s in reg.nodes()}


def test_all_workers_running_in_natural_order(cluster, tmp_path):
    with running_registry(cluster, tmp_path) as reg:
        assert reg.wait_first_pass(15)
        assert wait_for(lambda: all(s.phase == "Running" for s in reg.nodes()))
        got = reg.nodes()
        assert [s.node.name for s in got] == sorted(
            (h.name for h in cluster.workers), key=natural_key
        )
        assert not reg.stale and reg.alive()
        s = got[0]
        assert (s.reason, s.node.ip) == ("ok", cluster.workers[0].ip)
        assert s.latency_ms > 0 and s.last_probe is not None


def test_to_json_shape(cluster, tmp_path):
    with running_registry(cluster, tmp_path) as reg:
        assert wait_for(lambda: reg.nodes() and reg.nodes()[0].phase == "Running")
        j = reg.nodes()[0].to_json()
    h = cluster.workers[0]
    assert list(j)[:4] == ["name", "labels", "phase", "ip"]
    assert list(j) == [
        "name",
        "labels",
        "phase",
        "ip",
        "label_map",
        "host",
        "port",
        "namespace",
        "reason",
        "message",
        "last_probe",
        "latency_ms",
    ]
    assert j["name"] == h.name and j["ip"] == h.ip and j["phase"] == "Running"
    assert j["labels"] == str(dict(sorted(h.labels.items())))
    assert j["label_map"] == h.labels and j["namespace"] == "default" and j["port"] == 22
    assert j["last_probe"].endswith("Z") and isinstance(j["latency_ms"], float)
    pending = NodeStatus(reg.nodes()[0].node).to_json()
    assert (pending["phase"], pending["reason"], pending["last_probe"], pending["latency_ms"]) == (
        "Pending",
        "not-probed-yet",
        None,
        None,
    )


def test_selector_filters(cluster, tmp_path):
    with running_registry(cluster, tmp_path, discovery={"selector": ""}) as reg:
        assert wait_for(lambda: len(reg.nodes()) == len(cluster.hosts))
        dash = [h.name for h in cluster.hosts if h.labels["component"] == "dashboard"]
        assert [s.node.name for s in reg.nodes("component=dashboard")] == dash
        assert len(reg.nodes("component!=dashboard")) == len(cluster.workers)


def test_frozen_host_does_not_stall_others_and_readers_never_wait(cluster, tmp_path):
    frozen = cluster.workers[1]
    cluster.freeze(frozen)
    with running_registry(cluster, tmp_path) as reg:
        others = {h.name for h in cluster.workers} - {frozen.name}
        # the healthy hosts are Running while the frozen one is still being probed
        assert wait_for(
            lambda: all(by_name(reg).get(n) and by_name(reg)[n].phase == "Running" for n in others)
        )
        slowest = 0.0
        for _ in range(50):
            start = time.monotonic()
            reg.nodes()
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.02)
        assert slowest < 1.0
        assert wait_for(lambda: by_name(reg)[frozen.name].phase == "Unknown")
        s = by_name(reg)[frozen.name]
        assert s.reason in ("no-banner", "connect-timeout"), s
        assert s.latency_ms is None
        cluster.thaw(frozen)
        assert wait_for(lambda: by_name(reg)[frozen.name].phase == "Running")


def test_phases_follow_faults(cluster, tmp_path):
    a, b, c = cluster.workers[:3]
    with running_registry(cluster, tmp_path, ssh={"probe_interval_s": 60.0}) as reg:
        assert reg.wait_first_pass(15)
        assert wait_for(lambda: all(s.phase == "Running" for s in reg.nodes()))
        cluster.stop_sshd(a)
        cluster.replace_host_key(b)
        cluster.cut_link(c)
        # probe_interval is 60 s: only refresh() can make these visible now
        for _ in range(3):  # a dead old connection may be noticed one round before the new state
            start = time.monotonic()
            reg.refresh(timeout=10)
            assert time.monotonic() - start < 10
        s = by_name(reg)
        assert (s[a.name].phase, s[a.name].reason) == ("Unknown", "connection-refused")
        assert (s[b.name].phase, s[b.name].reason) == ("Failed", "host-key-changed")
        assert s[c.name].phase == "Unknown" and s[c.name].reason in (
            "connect-timeout",
            "network-unreachable",
        ), s[c.name]


def test_refresh_is_bounded(cluster, tmp_path):
    cluster.freeze(cluster.workers[0])
    with running_registry(cluster, tmp_path) as reg:
        start = time.monotonic()
        reg.refresh(timeout=0.3)
        assert time.monotonic() - start < 1.5


def test_dns_down_keeps_last_list_and_says_stale(cluster, tmp_path):
    with running_registry(cluster, tmp_path) as reg:
        assert wait_for(lambda: len(reg.nodes()) == len(cluster.workers) and not reg.stale)
        before = [s.node for s in reg.nodes()]
        cluster.stop_dns()
        assert wait_for(lambda: reg.stale)
        assert reg.stale_reason in REASONS
        assert [s.node for s in reg.nodes()] == before
        start = time.monotonic()
        reg.nodes()
        assert time.monotonic() - start < 1.0
        cluster.start_dns()
        assert wait_for(lambda: not reg.stale)
        assert reg.stale_reason == ""


def test_dns_down_at_start_is_empty_and_stale(cluster, tmp_path):
    cluster.stop_dns()
    with running_registry(cluster, tmp_path) as reg:
        assert reg.wait_first_pass(15)
        assert reg.nodes() == [] and reg.stale and reg.stale_reason in REASONS


def test_membership_changes_show_up(cluster, tmp_path):
    with running_registry(cluster, tmp_path) as reg:
        assert wait_for(lambda: all(s.phase == "Running" for s in reg.nodes()) and reg.nodes())
        new = cluster.add_host()
        assert wait_for(lambda: new.name in by_name(reg))
        assert wait_for(lambda: by_name(reg)[new.name].phase == "Running")
        gone = cluster.workers[0]
        assert reg.pool.connection(gone.ip, 22).is_connected
        cluster.unpublish(gone)
        assert wait_for(lambda: gone.name not in by_name(reg))
        # its connection was dropped: the pool holds a new, unconnected one if asked
        assert not reg.pool.connection(gone.ip, 22).is_connected


def test_new_members_start_pending(cluster, tmp_path):
    slow = cluster.workers[2]
    cluster.freeze(slow)  # its first probe takes the whole connect timeout
    with running_registry(cluster, tmp_path) as reg:
        assert wait_for(lambda: slow.name in by_name(reg), timeout=10)
        s = by_name(reg)[slow.name]
        assert (s.phase, s.reason, s.last_probe) == ("Pending", "not-probed-yet", None)


def test_alive_and_stop(cluster, tmp_path):
    now = [1000.0]
    cfg = load_cfg(cluster, tmp_path)
    pool = Pool(cfg.ssh)
    reg = Registry(cfg, Discovery(cfg.discovery), pool, clock=lambda: now[0])
    assert not reg.alive()  # not started
    reg.start()
    try:
        assert reg.wait_first_pass(15)
        assert reg.alive()
        now[0] += 1e6  # as if both loops had been stuck for days
        assert not reg.alive()
    finally:
        start = time.monotonic()
        reg.stop()
        assert time.monotonic() - start < 10
        pool.close()
    assert not reg.alive()
    assert not any(t.is_alive() for t in reg._threads)


def test_probe_failures_never_kill_the_loop(cluster, tmp_path, mocker):
    with running_registry(cluster, tmp_path) as reg:
        assert wait_for(lambda: reg.nodes() and all(s.phase == "Running" for s in reg.nodes()))
        mocker.patch.object(reg.pool, "probe", side_effect=RuntimeError("bug"))
        reg.refresh(timeout=10)
        assert all((s.phase, s.reason) == ("Unknown", "ssh-error") for s in reg.nodes())
        mocker.stopall()
        reg.refresh(timeout=10)
        assert all(s.phase == "Running" for s in reg.nodes())
        assert reg.alive()


@pytest.mark.parametrize("bad", ["=v", "a,,b"])
def test_bad_selector_is_rejected(cluster, tmp_path, bad):
    with running_registry(cluster, tmp_path, start=False) as reg:
        with pytest.raises(ValueError):
            reg.nodes(bad)
