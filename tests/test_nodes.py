"""nodes.Registry with the real Discovery (cluster dnsmasq) and the real ssh.Pool."""

import contextlib
import os
import time
from pathlib import Path

import pytest

from mlbench_daemon import config, nodes
from mlbench_daemon.discovery import REASONS, Discovery, natural_key
from mlbench_daemon.nodes import NodeStatus, Registry
from mlbench_daemon.ssh import Pool
from tests.cluster.cluster import sh, sshd_tree
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
        "hostname",
        "discovery_note",
    ]
    assert j["discovery_note"] == ""
    assert j["name"] == h.name and j["ip"] == h.ip and j["phase"] == "Running"
    # each test host has its own host name (its UTS namespace): the one asked at connect
    assert j["hostname"] == cluster.ssh(h, ["uname", "-n"]).stdout.strip() == h.name
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
        # every way a round reaches the pool: a node's own probe, or the sweep's batch
        for name in ("probe", "watch", "watch_many"):
            mocker.patch.object(reg.pool, name, side_effect=RuntimeError("bug"))
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


def test_an_idle_refresh_pass_asks_only_for_the_member_list(cluster, tmp_path):
    """TTL 0 ("do not cache") must not make the daemon poll every second, and unchanged
    members' records are not re-read every pass (counted with dnsmasq's --log-queries)."""
    cluster.set_dns_ttl(0)
    refresh = 2.0
    discovery = {"refresh_s": refresh, "recheck_s": 3600.0}
    with running_registry(cluster, tmp_path, discovery=discovery) as reg:
        assert wait_for(lambda: len(reg.nodes()) == 3)
        time.sleep(0.5)  # the first pass's queries are logged
        before = len(cluster.dns_queries())
        t0 = time.monotonic()
        time.sleep(8)
        window = time.monotonic() - t0
        asked = cluster.dns_queries()[before:]
        assert {q[0] for q in asked} == {"SRV"}, asked
        assert len(asked) <= window / refresh + 2, asked

        before = len(cluster.dns_queries())
        new = cluster.add_host()
        t0 = time.monotonic()
        assert wait_for(lambda: new.name in by_name(reg), timeout=3 * refresh + 5)
        print(f"new member shown after {time.monotonic() - t0:.2f} s (refresh_s {refresh})")
        time.sleep(0.5)
        others = [q for q in cluster.dns_queries()[before:] if q[0] != "SRV"]
        assert {q[1] for q in others} == {new.fqdn}, others  # only the change is read
        assert len(others) <= 2, others  # its A (unless it came as additional) and TXT


def test_members_records_are_rechecked_every_recheck_s(cluster, tmp_path):
    refresh, recheck = 0.5, 2.0
    discovery = {"refresh_s": refresh, "recheck_s": recheck}
    with running_registry(cluster, tmp_path, discovery=discovery) as reg:
        assert wait_for(lambda: len(reg.nodes()) == 3)
        time.sleep(0.5)
        before = len(cluster.dns_queries())
        t0 = time.monotonic()
        time.sleep(3 * recheck)
        window = time.monotonic() - t0
        txt = [q[1] for q in cluster.dns_queries()[before:] if q[0] == "TXT"]
        for h in cluster.hosts:  # every member re-read at least once per recheck_s ...
            assert txt.count(h.fqdn) >= 2, (h.fqdn, txt)
            # ... and not every pass
            assert txt.count(h.fqdn) <= window / (recheck / 2) + 1, (h.fqdn, txt)


# --- a truthful phase: new logins, not just the old session -----------------------------

PROBE, VERIFY = 1.0, 2.0
TRUTH = {"probe_interval_s": PROBE, "verify_interval_s": VERIFY, "connect_timeout_s": 2.0}


def wait_state(reg, h, phase, reason, bound):
    """Wait (a generous multiple of the promised bound) until h shows phase/reason."""
    t0 = time.monotonic()

    def shown():
        s = by_name(reg)[h.name]
        return (s.phase, s.reason) == (phase, reason)

    ok = wait_for(shown, timeout=3 * bound + 5)
    took = time.monotonic() - t0
    assert ok, (by_name(reg)[h.name], f"bound {bound} s")
    print(f"{h.name}: {phase}/{reason} after {took:.2f} s (bound {bound:g} s)")
    return by_name(reg)[h.name]


def all_running(reg, n=3):
    return lambda: len(reg.nodes()) == n and all(s.phase == "Running" for s in reg.nodes())


@pytest.mark.parametrize(
    "fault, undo, phase, reason, bound",
    [
        ("stop_listener", "start_listener", "Unknown", "connection-refused", PROBE + 1),
        ("freeze_listener", "thaw", "Unknown", "no-banner", PROBE + 2.0),
        ("rotate_host_key", "restore_host_key", "Failed", "host-key-changed", VERIFY + PROBE),
        ("revoke_key", "restore_key", "Failed", "auth-failed", VERIFY + PROBE),
    ],
)
def test_a_live_session_does_not_hide_a_node_new_logins_cannot_reach(
    cluster, tmp_path, caplog, fault, undo, phase, reason, bound
):
    a, b = cluster.workers[:2]
    with running_registry(cluster, tmp_path, ssh=TRUTH) as reg:
        assert wait_for(all_running(reg))
        connects = reg.pool.connection(a.ip, 22).connects
        getattr(cluster, fault)(a)
        s = wait_state(reg, a, phase, reason, bound)
        if phase == "Unknown":
            assert "an existing session still works but new logins fail" in s.message, s.message
        else:
            assert "existing session still works" in s.message, s.message
        # it is the old session that still works: never dropped, never replaced
        assert reg.pool.connection(a.ip, 22).connects == connects
        assert by_name(reg)[b.name].phase == "Running"
        getattr(cluster, undo)(a)
        wait_state(reg, a, "Running", "ok", VERIFY + PROBE)
    # the node's reason says it once; no paramiko traceback beside it
    loud = [r for r in caplog.records if r.name.startswith("paramiko") and r.levelno >= 30]
    assert not loud, [r.getMessage() for r in loud]


def test_a_live_probe_loop_does_not_hide_a_node_where_new_commands_cannot_start(
    cluster, tmp_path, monkeypatch
):
    """The user's process limit reached on one node: its probe loop, started before,
    still answers every round; the `true` each EXEC_EVERY_S cannot fork, so the node
    is not Running, and it is again once processes can start."""
    exec_every = 2.0
    monkeypatch.setattr(nodes, "EXEC_EVERY_S", exec_every)  # default 60 s
    a, b = cluster.workers[:2]

    def nproc(soft=None):
        """The soft process limit of a's sshd processes (the listener, which new sessions
        inherit, and the live sessions), set by each one's owner (no privilege needed up
        to the hard limit); None: back to the hard limit."""
        for pid in sshd_tree(a.init_pid):
            try:
                st = os.stat(f"/proc/{pid}")
                limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
            except FileNotFoundError:
                continue  # a session that ended since the tree was listed
            hard = next(x.split()[3] for x in limits if x.startswith("Max processes"))
            owner = ["setpriv", f"--reuid={st.st_uid}", f"--regid={st.st_gid}", "--clear-groups"]
            limit = f"--nproc={hard if soft is None else soft}:{hard}"
            sh([*owner, "prlimit", f"--pid={pid}", limit], check=False)

    # no fresh login is due meanwhile: only the `true` on the session can show it
    with running_registry(cluster, tmp_path, ssh={**TRUTH, "verify_interval_s": 600.0}) as reg:
        assert wait_for(all_running(reg))
        assert wait_for(lambda: reg.pool.watch_ages(a.ip, 22) is not None)  # its loop runs
        nproc(0)
        try:
            s = wait_state(reg, a, "Unknown", "ssh-error", exec_every + PROBE)
            assert "did not start" in s.message, s.message
            assert by_name(reg)[b.name].phase == "Running"
        finally:
            nproc()
        wait_state(reg, a, "Running", "ok", VERIFY + PROBE)


def test_fresh_logins_are_spread_and_forced_rounds_make_none(cluster, tmp_path):
    verify = 6.0
    with running_registry(
        cluster, tmp_path, ssh={"probe_interval_s": 0.5, "verify_interval_s": verify}
    ) as reg:
        logins = []
        real = reg.pool.verify_login

        def recording(ip, port, host=None):
            logins.append((reg._started, ip))
            return real(ip, port, host)

        reg.pool.verify_login = recording
        assert wait_for(all_running(reg))
        # the sessions' own logins were the first fresh logins
        assert reg.logins.count == 3 and logins == []
        # the probe loops start the round after the connect (slow on a loaded machine)
        assert wait_for(lambda: all(reg.pool.watch_ages(h.ip, 22) for h in cluster.workers))
        before = len(logins)
        for _ in range(5):  # ?refresh=1: sessions and listeners, no full logins
            reg.refresh(timeout=10)
        assert len(logins) - before <= 1, logins  # at most one slot came meanwhile
        time.sleep(2 * verify + 1)
        per_node = {ip: [r for r, i in logins if i == ip] for ip in {i for _, i in logins}}
        assert sorted(per_node) == sorted(h.ip for h in cluster.workers), logins
        assert all(1 <= len(r) <= 3 for r in per_node.values()), logins
        rounds = [r for r, _ in logins]
        assert len(set(rounds)) == len(rounds), f"two nodes logged in in one round: {logins}"
        assert all(s.phase == "Running" for s in reg.nodes())
