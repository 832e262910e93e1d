"""The test cluster itself: records, logins, MPI, and every fault control with its undo."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import dns.exception
import dns.resolver
import dns.reversename
import pytest

from mlbench_daemon.config import SETTINGS
from mlbench_daemon.discovery import Discovery, DiscoveryError
from tests.cluster import MPI_ARGS, ClusterError, cleanup_leftovers
from tests.cluster.cluster import PREFIX, STATE_ROOT, ZONE


def resolver(c):
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [c.dns_ip]
    r.lifetime = 2
    return r


def resolve(c, name, rdtype):
    return [x.to_text() for x in resolver(c).resolve(name, rdtype)]


def banner(ip, timeout=1.0):
    """The SSH banner, b'' when the port is refused, None when it never comes."""
    try:
        s = socket.create_connection((ip, 22), timeout=timeout)
    except ConnectionRefusedError:
        return b""
    except OSError:
        return None
    with s:
        s.settimeout(timeout)
        try:
            return s.recv(64)
        except TimeoutError:
            return None


def login_ok(c, h, **kw):
    r = c.ssh(h, ["id", "-un"], timeout=15, **kw)
    return r.returncode == 0 and r.stdout.strip() == c.user


def test_dns_publishes_the_headless_service(cluster):
    assert_published(cluster)


def assert_published(c):
    srv = resolve(c, f"_ssh._tcp.{c.service}.", "SRV")
    assert sorted(srv) == sorted(f"0 0 22 {h.fqdn}." for h in c.hosts)
    assert sorted(resolve(c, f"{c.service}.", "A")) == sorted(h.ip for h in c.hosts)
    for h in c.hosts:
        assert resolve(c, f"{h.fqdn}.", "A") == [h.ip]
        assert resolve(c, dns.reversename.from_address(h.ip), "PTR") == [f"{h.fqdn}."]
        txt = resolver(c).resolve(f"{h.fqdn}.", "TXT")
        strings = sorted(s.decode() for r in txt for s in r.strings)
        assert strings == sorted(f"{k}={v}" for k, v in h.labels.items())
    # at least one published host is not a worker
    assert [h for h in c.hosts if h.labels["component"] != "worker"]
    assert len(c.workers) == 3
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(c).resolve(f"nothing-here.{c.service}.", "A")


def test_nsd_serves_the_same_zone_and_transfers_its_changes(make_cluster):
    c = make_cluster(workers=3, extra=1, dns="nsd")
    assert_published(c)
    values = {k: d for s, k, _, d, _ in SETTINGS if s == "discovery"}
    values.update(service=c.service, nameservers=[c.nameserver], transfer_zone=ZONE)
    d = Discovery(types.SimpleNamespace(**values))
    assert sorted(n.ip for n in d.discover()[0]) == sorted(h.ip for h in c.hosts)
    c.unpublish(c.hosts[1])  # reloaded in place with a new serial: an IXFR sees it
    assert sorted(n.ip for n in d.discover()[0]) == sorted(h.ip for h in c.hosts[::2] + c.hosts[3:])
    c.stop_dns()
    with pytest.raises(DiscoveryError):
        d.discover()
    c.publish(c.hosts[1])
    c.start_dns()
    assert len(d.discover()[0]) == 4
    with pytest.raises(ClusterError, match="dnsmasq"):
        c.dns_queries()


def test_every_sshd_takes_the_cluster_key_and_refuses_others(cluster):
    for h in cluster.hosts:
        assert login_ok(cluster, h)
        r = cluster.ssh(h, ["true"], key=cluster.wrong_key)
        assert r.returncode == 255 and "Permission denied" in r.stderr


def test_host_keys_are_verified(cluster, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = subprocess.run(
        cluster.ssh_argv(0, ["true"], known_hosts=empty), capture_output=True, text=True, timeout=15
    )
    assert r.returncode == 255 and "Host key verification failed" in r.stderr


def test_hosts_ssh_to_each_other_with_keys_verified(cluster):
    for a in cluster.hosts:
        for b in cluster.hosts:
            r = cluster.ssh(a, ["ssh", b.ip, "echo", "hop"])
            assert (r.returncode, r.stdout) == (0, "hop\n"), r.stderr


def run_mpi(c, hosts, *args, timeout=120):
    return c.ssh(
        hosts[0],
        ["mpirun", *MPI_ARGS, "--host", ",".join(h.ip for h in hosts), str(c.mpi_program), *args],
        timeout=timeout,
    )


def test_mpirun_over_ssh_reaches_every_host(cluster):
    r = run_mpi(cluster, cluster.workers, "--env", "HOME")
    assert r.returncode == 0, r.stderr
    n = len(cluster.workers)
    assert f"allreduce ok {n}" in r.stdout
    ranks = re.findall(r"rank (\d+) of (\d+) on (\S+): sum=(\d+)", r.stdout)
    assert sorted(int(x[0]) for x in ranks) == list(range(n))
    assert {x[2] for x in ranks} == {h.ip for h in cluster.workers}
    assert all(int(x[3]) == n * (n - 1) // 2 for x in ranks)


def test_mpi_program_reports_argv_bytes_and_exit_code(cluster):
    weird = "a b;$(x)`y`'\"\n\u00e9"
    r = run_mpi(cluster, cluster.workers[:2], "--argv", weird, "--exit", "3")
    assert r.returncode == 3
    assert f"arg 2 {weird.encode().hex()}" in r.stdout


def test_stop_and_start_sshd(cluster):
    h = cluster.hosts[1]
    cluster.stop_sshd(h)
    assert banner(h.ip) == b""
    assert not login_ok(cluster, h)
    cluster.start_sshd(h)
    assert login_ok(cluster, h)


def test_freeze_gives_tcp_but_no_banner(cluster):
    h = cluster.hosts[1]
    assert banner(h.ip).startswith(b"SSH-2.0-")
    cluster.freeze(h)
    assert banner(h.ip, timeout=1.0) is None  # TCP connects, banner never comes
    cluster.thaw(h)
    assert banner(h.ip).startswith(b"SSH-2.0-")
    assert login_ok(cluster, h)


def test_cut_link_and_restore(cluster):
    h = cluster.hosts[2]
    cluster.cut_link(h)
    assert banner(h.ip, timeout=1.0) is None
    cluster.restore_link(h)
    deadline = time.monotonic() + 10
    while not login_ok(cluster, h) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert login_ok(cluster, h)


def test_partition_cuts_only_the_head(cluster):
    h, other = cluster.hosts[2], cluster.hosts[0]
    cluster.partition(h)
    assert banner(h.ip, timeout=1.0) is None
    r = cluster.ssh(other, ["ssh", h.ip, "echo", "still-here"])
    assert r.stdout == "still-here\n", r.stderr
    cluster.heal(h)
    assert login_ok(cluster, h)


def test_stop_and_start_dns(cluster):
    cluster.stop_dns()
    with pytest.raises(dns.exception.Timeout):
        r = resolver(cluster)
        r.lifetime = 1
        r.resolve(f"{cluster.service}.", "A")
    cluster.start_dns()
    assert len(resolve(cluster, f"{cluster.service}.", "A")) == len(cluster.hosts)


def test_replace_and_restore_host_key(cluster):
    h = cluster.hosts[0]
    cluster.replace_host_key(h)
    r = cluster.ssh(h, ["true"])
    assert r.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in r.stderr
    cluster.restore_host_key(h)
    assert login_ok(cluster, h)


def test_membership_changes(cluster):
    new = cluster.add_host()
    assert login_ok(cluster, new)
    assert f"0 0 22 {new.fqdn}." in resolve(cluster, f"_ssh._tcp.{cluster.service}.", "SRV")
    assert new.ip in resolve(cluster, f"{cluster.service}.", "A")
    gone = cluster.hosts[1]
    cluster.unpublish(gone)
    srv = resolve(cluster, f"_ssh._tcp.{cluster.service}.", "SRV")
    assert f"0 0 22 {gone.fqdn}." not in srv and f"0 0 22 {new.fqdn}." in srv
    assert gone.ip not in resolve(cluster, f"{cluster.service}.", "A")
    assert login_ok(cluster, gone)  # still running, just not published
    cluster.publish(gone)
    assert gone.ip in resolve(cluster, f"{cluster.service}.", "A")


def on_host(c, h, script):
    r = c.ssh(h, ["sh", "-c", script], timeout=15)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_hosts_are_apart_names_processes_env_and_keys(cluster):
    c = cluster
    a, b = c.hosts[0], c.hosts[1]
    for h in c.hosts:
        assert on_host(c, h, "hostname").strip() == h.name
        # every host name resolves on every host
        names = " ".join(x.name for x in c.hosts)
        got = on_host(c, h, f"getent hosts {names}").split("\n")
        assert [line.split()[0] for line in got if line] == [x.ip for x in c.hosts]
    # what runs on a host is seen (and can be killed) only there
    on_host(c, a, "setsid sleep 300 </dev/null >/dev/null 2>&1 &")
    assert "sleep" in on_host(c, a, "ps -eo comm")
    assert "sleep" not in on_host(c, b, "ps -eo comm")
    assert on_host(c, b, "pkill -x sleep; echo $?").strip() == "1"
    assert "sleep" in on_host(c, a, "ps -eo comm")
    # a host's own environment for non-interactive sessions
    c.set_env(a, PATH="/nowhere:/usr/bin:/bin", MARK="a")
    assert on_host(c, a, "echo $PATH $MARK").split() == ["/nowhere:/usr/bin:/bin", "a"]
    assert "/nowhere" not in on_host(c, b, "echo $PATH $MARK")
    # a host's own authorized_keys
    c.revoke_key(a)
    r = c.ssh(a, ["true"])
    assert r.returncode == 255 and "Permission denied" in r.stderr
    assert login_ok(c, b)
    c.restore_key(a)
    assert login_ok(c, a)


@pytest.fixture
def session(cluster, tmp_path):
    """session(h) -> run(argv): commands over one established OpenSSH connection to h."""
    masters = []

    def open_session(h):
        sock = tmp_path / f"cm{len(masters)}"
        opts = ["-o", "ControlMaster=yes", "-o", f"ControlPath={sock}", "-o", "ControlPersist=no"]
        argv = cluster.ssh_argv(h, "sleep 600")
        m = subprocess.Popen(argv[:1] + opts + argv[1:], stdin=subprocess.DEVNULL)
        masters.append(m)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and m.poll() is None, "control master failed"
            time.sleep(0.02)

        def run(argv):
            cmd = cluster.ssh_argv(h, argv)
            return subprocess.run(
                [*cmd[:1], "-o", f"ControlPath={sock}", *cmd[1:]],
                capture_output=True,
                text=True,
                timeout=15,
            )

        return run

    yield open_session
    for m in masters:
        m.kill()
        m.wait()


def test_stop_listener_keeps_sessions(cluster, session):
    h = cluster.hosts[1]
    run = session(h)
    cluster.stop_listener(h)
    assert banner(h.ip) == b""
    assert not login_ok(cluster, h)
    assert run(["echo", "still"]).stdout == "still\n"
    cluster.start_listener(h)
    assert login_ok(cluster, h)
    assert run(["echo", "still"]).stdout == "still\n"


def test_freeze_listener_keeps_sessions(cluster, session):
    h = cluster.hosts[1]
    run = session(h)
    cluster.freeze_listener(h)
    assert banner(h.ip, timeout=1.0) is None
    assert run(["echo", "still"]).stdout == "still\n"
    cluster.thaw(h)
    assert banner(h.ip).startswith(b"SSH-2.0-")


def test_rotate_host_key_keeps_sessions(cluster, session):
    h = cluster.hosts[0]
    run = session(h)
    cluster.rotate_host_key(h)
    r = cluster.ssh(h, ["true"])
    assert r.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in r.stderr
    assert run(["echo", "still"]).stdout == "still\n"
    cluster.restore_host_key(h)
    assert login_ok(cluster, h)


def test_reset_undoes_every_fault(cluster):
    c = cluster
    c.freeze(0)
    c.stop_sshd(1)
    c.partition(2)
    c.cut_link(3)
    c.unpublish(3)
    c.stop_dns()
    c.add_host()
    c.reset()
    assert len(c.hosts) == 4
    for h in c.hosts:
        assert login_ok(c, h)
    c.stop_listener(0)
    c.freeze_listener(1)
    c.rotate_host_key(2)
    c.revoke_key(3)
    c.set_env(3, PATH="/nowhere")
    c.reset()
    for h in c.hosts:
        assert login_ok(c, h)
    assert "/nowhere" not in on_host(c, c.hosts[3], "echo $PATH")
    assert sorted(resolve(c, f"{c.service}.", "A")) == sorted(h.ip for h in c.hosts)


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_32_hosts_run_one_mpi_job(make_cluster):
    t0 = time.monotonic()
    c = make_cluster(workers=32)
    built = time.monotonic() - t0
    r = run_mpi(c, c.workers, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "allreduce ok 32" in r.stdout
    assert len(set(re.findall(r"on (\S+): sum=496", r.stdout))) == 32
    print(f"32-host cluster built in {built:.2f}s")


@pytest.mark.cluster  # builds and tears down namespaces itself, without the fixture
def test_teardown_and_leftover_cleanup(tmp_path):
    """A run killed before its teardown is cleaned by the next run's start."""
    script = (
        f"import sys, time; sys.path.insert(0, {os.getcwd()!r})\n"
        "from tests.cluster import Cluster\n"
        "c = Cluster(workers=2, extra=0).build()\n"
        "print(c.id, flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        run_id = p.stdout.readline().strip()
        assert run_id, "the child failed to build its cluster"
        ours = {ns for ns in _namespaces() if ns.startswith(PREFIX + run_id)}
        assert len(ours) == 3  # dns + 2 hosts
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    cleanup_leftovers()
    assert not {ns for ns in _namespaces() if ns.startswith(PREFIX + run_id)}
    assert not (STATE_ROOT / f"{PREFIX}-{run_id}").exists()
    assert not list(Path("/etc/netns").glob(f"{PREFIX}{run_id}*"))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert PREFIX + run_id not in links
    assert f"{PREFIX}{run_id}:" not in open("/etc/passwd").read()
    # and nothing of that run still runs
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            assert f"{PREFIX}-{run_id}".encode() not in cmd
