"""Discovery against a real dnsmasq on loopback: SRV/A/AAAA/PTR/TXT, labels, errors, TTLs,
plus selector and natural-sort unit and property tests."""

import logging
import os
import signal
import socket
import subprocess
import time
import types

import dns.message
import dns.name
import dns.nameserver
import dns.resolver
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlbench_daemon import metrics
from mlbench_daemon.config import parse_nameserver
from mlbench_daemon.discovery import (
    Discovery,
    DiscoveryError,
    Node,
    Requirement,
    Selector,
    namespace_of,
    natural_key,
    negative_ttl,
)
from tests.cluster.nsd import KNOTD_BIN, NAMED_BIN, NSD, NSD_BIN, Bind, Knot
from tests.cluster.nsd import free_port as nsd_port

DNSMASQ = "/usr/sbin/dnsmasq"
ZONE = "default.svc.cluster.local"
SVC = f"workers.{ZONE}"  # the SRV service
SRV = f"_ssh._tcp.{SVC}"

pytestmark = pytest.mark.skipif(not os.path.exists(DNSMASQ), reason="dnsmasq not installed")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    try:
        r.resolve("ready.probe.cluster.local.", "A", lifetime=0.2)
    except dns.resolver.NXDOMAIN:
        return True
    except dns.exception.DNSException:
        return False
    return True


@pytest.fixture
def dnsmasq(tmp_path, request):
    """start(*records) -> port of a dnsmasq on 127.0.0.1 serving those records
    (authoritative-like for cluster.local and 127.in-addr.arpa: unknown names are NXDOMAIN)."""

    def start(*records, ttl=300):
        for _ in range(5):
            port = free_udp_port()
            argv = [
                DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}",
                "--pid-file=", "--conf-file=/dev/null", "--user=root",
                "--local=/cluster.local/", "--local=/127.in-addr.arpa/", "--local=/lab.test/",
                f"--local-ttl={ttl}", *records,
            ]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            request.addfinalizer(lambda p=proc: (p.kill(), p.wait(), p.stderr.close()))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proc.poll() is None and not answers(port):
                time.sleep(0.02)
            if proc.poll() is None and answers(port):
                start.proc = proc
                return port
            err = proc.stderr.read().decode() if proc.poll() is not None else "no answer within 5 s"
            if "in use" not in err:
                raise RuntimeError(f"dnsmasq did not start: {err}")
        raise RuntimeError("no free port for dnsmasq")

    return start


def hosts_file(tmp_path, *lines) -> str:
    path = tmp_path / f"hosts{len(list(tmp_path.iterdir()))}"
    path.write_text("".join(line + "\n" for line in lines))
    return f"--addn-hosts={path}"


def cfg(port, service=SVC, **kw):
    values = dict(
        service=service, srv="_ssh._tcp", nameservers=[f"127.0.0.1:{port}"], namespace="default",
        selector="", refresh_s=10, timeout_s=2.0, recheck_s=0.0, label_rules=[], transfer_zone="",
        negative_ttl_min_s=30.0, negative_ttl_max_s=600.0, negative_ttl_fallback_s=60.0,
        max_txt_bytes=4096, max_txt_keys=64, max_label_value=128,
    )  # fmt: skip
    values.update(kw)
    return types.SimpleNamespace(**values)


def discover(port, service=SVC, ssh_port=22, **kw):
    return Discovery(cfg(port, service, **kw), ssh_port=ssh_port).discover()


# --- SRV path --------------------------------------------------------------------------


def test_srv_members_hosts_ports_and_addresses(dnsmasq, tmp_path):
    port = dnsmasq(
        f"--srv-host={SRV},w-10.{SVC},2210",
        f"--srv-host={SRV},w-2.{SVC},2202",
        f"--srv-host={SRV},w-1.{SVC},2201",
        f"--srv-host={SRV},w-1.{SVC},2201",  # duplicate target: one member
        f"--srv-host={SRV}",  # target "." (service not offered): ignored
        hosts_file(
            tmp_path, f"127.77.0.1 w-1.{SVC}", f"127.77.0.10 w-10.{SVC}"
        ),  # in the additional section
        f"--host-record=w-2.{SVC},fd00::2",  # IPv6 only
    )
    nodes, ttl = discover(port)
    assert [(n.name, n.host, n.ip, n.port, n.namespace) for n in nodes] == [
        ("w-1", f"w-1.{SVC}", "127.77.0.1", 2201, "default"),
        ("w-2", f"w-2.{SVC}", "fd00::2", 2202, "default"),
        ("w-10", f"w-10.{SVC}", "127.77.0.10", 2210, "default"),
    ]
    assert ttl == 300
    assert all(n.labels == {} and n.labels_str == "{}" for n in nodes)


def test_srv_target_address_queried_when_not_in_additional(dnsmasq):
    # --address answers A queries but dnsmasq does not put it in the SRV additional section
    port = dnsmasq(f"--srv-host={SRV},w-1.{SVC},2222", f"--address=/w-1.{SVC}/127.77.0.5")
    (node,), _ = discover(port)
    assert (node.name, node.ip, node.port) == ("w-1", "127.77.0.5", 2222)


def test_dual_stack_target_prefers_ipv4(dnsmasq):
    port = dnsmasq(f"--srv-host={SRV},w-1.{SVC},22", f"--host-record=w-1.{SVC},127.77.0.7,fd00::7")
    (node,), _ = discover(port)
    assert node.ip == "127.77.0.7"


def test_target_without_address_is_dropped_with_warning(dnsmasq, tmp_path, caplog):
    port = dnsmasq(
        f"--srv-host={SRV},w-1.{SVC},22",
        f"--srv-host={SRV},gone.{SVC},22",
        hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}"),
    )
    with caplog.at_level(logging.WARNING, logger="mlbench_daemon.discovery"):
        nodes, _ = discover(port)
    assert [n.name for n in nodes] == ["w-1"]
    assert any(f"gone.{SVC}" in r.getMessage() for r in caplog.records)


def test_txt_labels(dnsmasq, tmp_path):
    port = dnsmasq(
        f"--srv-host={SRV},w-1.{SVC},22",
        hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}"),
        # one TXT record, one string per comma piece; bytes so that one string is not UTF-8
        os.fsencode(f"--txt-record=w-1.{SVC},app=mlbench,gpu,zone=zé,app=dup,=ignored,url=a=b,")
        + b"raw=\xff",
    )
    (node,), _ = discover(port)
    assert node.labels == {"app": "mlbench", "gpu": "", "zone": "zé", "url": "a=b", "raw": "\ufffd"}
    assert (
        node.labels_str
        == "{'app': 'mlbench', 'gpu': '', 'raw': '\ufffd', 'url': 'a=b', 'zone': 'zé'}"
    )


def test_label_rules_win_over_txt_and_apply_in_order(dnsmasq, tmp_path):
    port = dnsmasq(
        f"--srv-host={SRV},w-1.{SVC},22",
        f"--srv-host={SRV},w-2.{SVC},22",
        hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}", f"127.77.0.2 w-2.{SVC}"),
        f"--txt-record=w-1.{SVC},component=txt,app=mlbench",
    )
    rules = [
        {"match": "w-*", "labels": {"component": "worker", "release": "worn-mouse"}},
        {"match": "w-2", "labels": {"release": "other"}},
        {"match": "W-1", "labels": {"case": "sensitive"}},  # never matches
    ]
    nodes, _ = discover(port, label_rules=rules)
    assert [dict(n.labels) for n in nodes] == [
        {"app": "mlbench", "component": "worker", "release": "worn-mouse"},
        {"component": "worker", "release": "other"},
    ]
    assert (
        nodes[0].labels_str == "{'app': 'mlbench', 'component': 'worker', 'release': 'worn-mouse'}"
    )


def test_ttl_is_the_shortest_of_the_answers_used(dnsmasq, tmp_path):
    port = dnsmasq(
        f"--srv-host={SRV},w-1.{SVC},22",
        f"--srv-host={SRV},w-2.{SVC},22",
        hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}"),
        f"--host-record=w-2.{SVC},127.77.0.2,7",
        ttl=120,
    )
    assert discover(port)[1] == 7


# --- fallback: A/AAAA of the service + PTR ----------------------------------------------


def test_fallback_to_service_addresses_named_by_ptr(dnsmasq, tmp_path):
    # first name on a hosts line = the PTR name; the service name is an alias (A only)
    port = dnsmasq(
        hosts_file(tmp_path, f"127.77.0.2 w-2.{SVC} {SVC}", f"127.77.0.11 w-11.{SVC} {SVC}"),
        f"--txt-record=w-2.{SVC},component=worker",
    )
    nodes, ttl = discover(port, ssh_port=2022)
    assert [(n.name, n.host, n.ip, n.port, dict(n.labels)) for n in nodes] == [
        ("w-2", f"w-2.{SVC}", "127.77.0.2", 2022, {"component": "worker"}),
        ("w-11", f"w-11.{SVC}", "127.77.0.11", 2022, {}),
    ]
    assert ttl == 300


def test_fallback_without_ptr_names_nodes_by_ip(dnsmasq):
    # 127.77.0.20 has no PTR (NXDOMAIN); fd00::20's reverse zone is REFUSED: both named by IP
    port = dnsmasq(f"--address=/{SVC}/127.77.0.20", f"--address=/{SVC}/fd00::20")
    rules = [{"match": "127.77.*", "labels": {"v": "4"}}]
    nodes, _ = discover(port, label_rules=rules)
    assert [(n.name, n.host, n.ip, n.port, dict(n.labels)) for n in nodes] == [
        ("127.77.0.20", "127.77.0.20", "127.77.0.20", 22, {"v": "4"}),
        ("fd00::20", "fd00::20", "fd00::20", 22, {}),
    ]


def test_fallback_dual_stack_host_is_one_node_on_ipv4(dnsmasq, tmp_path):
    port = dnsmasq(hosts_file(tmp_path, f"fd00::1 w-1.{SVC} {SVC}", f"127.77.0.1 w-1.{SVC} {SVC}"))
    (node,), _ = discover(port)
    assert (node.name, node.ip) == ("w-1", "127.77.0.1")


def test_two_hosts_with_one_first_label_keep_one_with_warning(dnsmasq, tmp_path, caplog):
    port = dnsmasq(
        f"--srv-host={SRV},w-1.a.{ZONE},2201",
        f"--srv-host={SRV},w-1.b.{ZONE},2202",
        hosts_file(tmp_path, f"127.77.0.1 w-1.a.{ZONE}", f"127.77.0.2 w-1.b.{ZONE}"),
    )
    with caplog.at_level(logging.WARNING, logger="mlbench_daemon.discovery"):
        (node,), _ = discover(port)
    assert (node.host, node.port) == (f"w-1.a.{ZONE}", 2201)
    assert "share the name w-1" in caplog.text


# --- namespace -------------------------------------------------------------------------


def test_namespace_from_service_name_or_config(dnsmasq, tmp_path):
    port = dnsmasq(
        hosts_file(
            tmp_path,
            "127.77.0.1 w-1.lab.test workers.lab.test",
            "127.77.0.2 x.team-a.svc.cluster.local",
        )
    )
    (node,), _ = discover(port, service="workers.lab.test", namespace="research")
    assert node.namespace == "research"
    (node,), _ = discover(port, service="x.team-a.svc.cluster.local.", namespace="research")
    assert node.namespace == "team-a"


def test_namespace_of():
    assert namespace_of("svc.ns.svc.cluster.local", "d") == "ns"
    assert namespace_of("svc.ns.svc.cluster.local.", "d") == "ns"
    assert namespace_of("svc.ns.SVC.example", "d") == "ns"
    assert namespace_of("svc.ns.svc", "d") == "d"  # no zone
    assert namespace_of("workers.lab.test", "d") == "d"


# --- errors ----------------------------------------------------------------------------


def test_nxdomain(dnsmasq):
    port = dnsmasq()
    with pytest.raises(DiscoveryError) as e:
        discover(port, service=f"missing.{ZONE}")
    assert e.value.reason == "nxdomain"
    assert f"_ssh._tcp.missing.{ZONE}." in str(e.value) and f" missing.{ZONE}." in str(e.value)


def test_names_are_absolute_never_searched(dnsmasq, tmp_path):
    port = dnsmasq(f"--srv-host={SRV},w-1.{SVC},22", hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}"))
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    resolver.search = [dns.name.from_text("svc.cluster.local")]
    resolver.use_search_by_default = True
    with pytest.raises(DiscoveryError) as e:  # "workers.default" + search domain would find it
        Discovery(cfg(port, service="workers.default"), resolver=resolver).discover()
    assert e.value.reason == "dns-error"  # dnsmasq refuses names outside its local zones
    assert "_ssh._tcp.workers.default." in str(e.value)


def test_no_members(dnsmasq):
    port = dnsmasq(f"--srv-host={SRV},gone.{SVC},22", f"--srv-host={SRV}")
    with pytest.raises(DiscoveryError) as e:
        discover(port)
    assert e.value.reason == "no-members"
    assert SRV in str(e.value)


def test_service_name_exists_without_addresses_is_no_members(dnsmasq):
    port = dnsmasq(f"--txt-record={SVC},just=text")
    with pytest.raises(DiscoveryError) as e:
        discover(port)
    assert e.value.reason == "no-members"


def test_refused_is_dns_error(dnsmasq):
    port = dnsmasq()
    with pytest.raises(DiscoveryError) as e:
        discover(port, service="workers.elsewhere.example")
    assert e.value.reason == "dns-error"
    assert "SRV _ssh._tcp.workers.elsewhere.example." in str(e.value) and "REFUSED" in str(e.value)


def test_timeout_on_a_silent_server():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError) as e:
            discover(silent.getsockname()[1], timeout_s=0.5)
        elapsed = time.monotonic() - t0
    assert e.value.reason == "dns-timeout"
    assert f"SRV {SRV}." in str(e.value)
    assert 0.4 <= elapsed <= 1.5


def test_timeout_on_a_stopped_dnsmasq_then_recovery(dnsmasq, tmp_path):
    port = dnsmasq(f"--srv-host={SRV},w-1.{SVC},22", hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}"))
    d = Discovery(cfg(port, timeout_s=0.5))
    os.kill(dnsmasq.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError) as e:
            d.discover()
        assert e.value.reason == "dns-timeout"
        assert time.monotonic() - t0 <= 1.5
    finally:
        os.kill(dnsmasq.proc.pid, signal.SIGCONT)
    time.sleep(0.1)  # let dnsmasq drain the queries queued while stopped
    assert [n.name for n in d.discover()[0]] == ["w-1"]


def test_discovery_error_reason():
    e = DiscoveryError("nxdomain", "no such name")
    assert (e.reason, str(e)) == ("nxdomain", "no such name")


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, host, port",
    [("127.0.0.1", "127.0.0.1", 53), ("127.0.0.1:5353", "127.0.0.1", 5353), ("::1", "::1", 53),
     ("[::1]:5353", "::1", 5353), ("[::1]", "::1", 53)],
)  # fmt: skip
def test_parse_nameserver(text, host, port):
    assert parse_nameserver(text) == (host, port)


@pytest.mark.parametrize(
    "text", ["", "dns.example", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "[::1]x"]
)
def test_parse_nameserver_rejects(text):
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_empty_service_rejected():
    with pytest.raises(ValueError, match=r"discovery\.service"):
        Discovery(cfg(53, service=""))


# --- Node ------------------------------------------------------------------------------


def test_node_labels_read_only_hashable_by_value():
    a = Node("w-1", "w-1.x", "127.77.0.1", 22, "default", {"b": "2", "a": "1"})
    b = Node("w-1", "w-1.x", "127.77.0.1", 22, "default", {"a": "1", "b": "2"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.labels == {"a": "1", "b": "2"} and list(a.labels) == ["a", "b"]
    assert a.labels_str == "{'a': '1', 'b': '2'}"
    with pytest.raises(TypeError):
        a.labels["c"] = "3"
    with pytest.raises(TypeError):
        a.labels.update(c="3")
    assert Node("w-1", "w-1", "127.77.0.1", 22, "default").labels == {}


# --- natural sort ----------------------------------------------------------------------


def test_natural_key():
    names = ["w-10", "w-2", "w-1", "a", "w-1b", "w-01", "W-3", "127.77.0.20", "fd00::20"]
    expected = ["127.77.0.20", "a", "fd00::20", "w-01", "w-1", "w-1b", "w-2", "W-3", "w-10"]
    assert sorted(names, key=natural_key) == expected


@given(st.lists(st.text(alphabet="ab-0123456789", max_size=8)))
def test_natural_key_is_a_total_order(names):
    ordered = sorted(names, key=natural_key)
    assert sorted(ordered, key=natural_key) == ordered
    assert sorted(reversed(names), key=natural_key) == ordered


# --- selectors -------------------------------------------------------------------------


def test_selector_parse_and_str():
    s = Selector.parse(
        " tier != gpu , app==mlbench,component=worker, rack ,!spot,example.com/zone=a"
    )
    assert str(s) == "app=mlbench,component=worker,example.com/zone=a,rack,!spot,tier!=gpu"
    assert Selector.parse(str(s)) == s
    assert Selector.parse("a=1,b=2") == Selector.parse("b=2, a=1") == Selector.parse("a=1,b=2,a=1")
    assert str(Selector.parse("")) == "" and Selector.parse("  ") == Selector()
    assert Selector.parse("k=") == Selector((Requirement("k", "=", ""),))


@pytest.mark.parametrize(
    "text, bad",
    [("a=b,", "empty term"), ("a,,b", "empty term"), ("=b", "''"), ("a=b=c", "'b=c'"),
     ("-a", "'-a'"), ("a b", "'a b'"), ("k=" + "v" * 64, "v" * 64), ("a=-b", "'-b'"),
     ("!=a", "''"), ("Prefix.com/a", "'Prefix.com/a'"),
     ("a in (b)", "'a in (b)'"), ("!a=b", "'!a'"), ("a=!b", "'!b'")],
)  # fmt: skip
def test_selector_parse_errors_name_the_bad_term(text, bad):
    with pytest.raises(ValueError, match="selector") as e:
        Selector.parse(text)
    assert bad in str(e.value)


def test_selector_matches():
    labels = {"app": "mlbench", "component": "worker", "gpu": ""}
    assert Selector.parse("").matches({})
    assert Selector.parse("app=mlbench,component==worker").matches(labels)
    assert not Selector.parse("app=other").matches(labels)
    assert Selector.parse("tier!=gpu").matches(labels)  # absent key: != matches (Kubernetes)
    assert not Selector.parse("app!=mlbench").matches(labels)
    assert Selector.parse("gpu,!spot,gpu=").matches(labels)
    assert not Selector.parse("spot").matches(labels)
    assert not Selector.parse("!gpu").matches(labels)


KEYS = st.sampled_from(["app", "tier", "example.com/zone", "a_b.c-d"])
VALUES = st.sampled_from(["", "x", "mlbench", "A.b_c-9"])
REQS = st.one_of(
    st.builds(Requirement, KEYS, st.sampled_from(["=", "!="]), VALUES),
    st.builds(Requirement, KEYS, st.sampled_from(["exists", "!exists"])),
)
SELECTORS = st.lists(REQS, max_size=5).map(lambda rs: Selector(tuple(sorted(set(rs)))))
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)


def reference_matches(selector: Selector, labels: dict) -> bool:
    for r in selector.requirements:
        present = r.key in labels
        ok = {
            "=": present and labels[r.key] == r.value,
            "!=": not present or labels[r.key] != r.value,
            "exists": present,
            "!exists": not present,
        }[r.op]
        if not ok:
            return False
    return True


@given(SELECTORS)
def test_selector_roundtrip(s):
    assert Selector.parse(str(s)) == s


@given(st.lists(REQS, max_size=5), LABELS, st.booleans())
def test_selector_matches_reference(reqs, labels, spaced):
    sep = " , " if spaced else ","
    text = sep.join(
        f"{r.key}{'==' if spaced else '='}{r.value}" if r.op == "=" else str(r) for r in reqs
    )
    s = Selector.parse(text)
    assert s.matches(labels) == reference_matches(Selector(tuple(reqs)), labels)


def test_recheck_s_keeps_members_records_between_passes(dnsmasq, tmp_path):
    """A label change shows only when the member's records are re-read: every pass with
    recheck_s = 0, after recheck_s otherwise; a new member is read at once."""
    hosts = hosts_file(tmp_path, f"127.77.0.1 w-1.{SVC}", f"127.77.0.2 w-2.{SVC}")
    port = dnsmasq(f"--srv-host={SRV},w-1.{SVC},22", f"--txt-record=w-1.{SVC},v=1", hosts)
    cached = Discovery(cfg(port, recheck_s=1.0))
    every = Discovery(cfg(port))
    assert [n.labels for n in cached.discover()[0]] == [{"v": "1"}]
    every.discover()
    dnsmasq.proc.kill()
    dnsmasq.proc.wait()
    port2 = dnsmasq(
        f"--srv-host={SRV},w-1.{SVC},22",
        f"--srv-host={SRV},w-2.{SVC},22",
        f"--txt-record=w-1.{SVC},v=2",
        f"--txt-record=w-2.{SVC},v=2",
        hosts,
    )
    for d in (cached, every):
        d.resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port2)]
    assert [n.labels for n in every.discover()[0]] == [{"v": "2"}, {"v": "2"}]
    assert [n.labels for n in cached.discover()[0]] == [{"v": "1"}, {"v": "2"}]
    time.sleep(1.0)
    assert [n.labels for n in cached.discover()[0]] == [{"v": "2"}, {"v": "2"}]


# --- misses, per-member errors, capped labels (issue 19) -------------------------------

GHOSTS = 200


def ghost_records(domain):
    return [f"--srv-host={SRV},ghost-{i}.{domain},22" for i in range(GHOSTS)]


def real_records(tmp_path, n=5, extra=()):
    names = [f"w-{i}" for i in range(1, n + 1)] + list(extra)
    srv = [f"--srv-host={SRV},{name}.{SVC},22" for name in names]
    hosts = [f"127.77.1.{i + 1} {name}.{SVC}" for i, name in enumerate(names)]
    return [*srv, hosts_file(tmp_path, *hosts)]


def cpu_of_passes(d, passes, repeats=3, work=None):
    """The least CPU time of `repeats` runs of `passes` passes (the least: other work on a
    loaded machine only adds), and the last pass's nodes; `work` instead of a pass."""
    times, nodes = [], None
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(passes):
            if work is None:
                nodes, _ = d.discover()
            else:
                work()
        times.append(time.process_time() - start)
    return min(times), nodes


def point_at(d, port):
    d.resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]


@pytest.mark.parametrize(
    "domain, kind",
    [(SVC, "nxdomain"), ("ghosts.elsewhere.test", "dns-error")],  # out of zone: REFUSED
)
def test_ghost_members_are_kept_logged_once_and_cost_little(
    dnsmasq, tmp_path, caplog, domain, kind
):
    """200 ghost SRV targets and 5 real ones: the real ones join, each ghost logs one line
    and is asked once (its miss is kept), a pass costs at most 2x a pass of the 5 members
    plus reading the 205-target list, and a new real member joins on the next pass."""
    base_port = dnsmasq(*real_records(tmp_path))
    port = dnsmasq(*real_records(tmp_path), *ghost_records(domain))
    baseline = Discovery(cfg(base_port))
    d = Discovery(cfg(port))
    for x in (baseline, d):
        x.discover()  # warm up: first lookups
    caplog.clear()
    before = metrics.dns_member_misses_total.labels(kind)._value.get()
    with caplog.at_level(logging.INFO, logger="mlbench_daemon.discovery"):
        _, nodes = cpu_of_passes(d, 1)
        assert [n.name for n in nodes] == [f"w-{i}" for i in range(1, 6)]
        base_cpu, _ = cpu_of_passes(baseline, 10)
        # reading the 205-target member list is the same with ghosts or real members
        # (dnspython's parse of it is most of a pass): the baseline includes it
        srv = dns.name.from_text(SRV)
        list_cpu, _ = cpu_of_passes(d, 10, work=lambda: d.resolver.resolve(srv, "SRV"))
        ghost_cpu, nodes = cpu_of_passes(d, 10)
    assert ghost_cpu <= 2 * (base_cpu + list_cpu), (ghost_cpu, base_cpu, list_cpu)
    assert [n.name for n in nodes] == [f"w-{i}" for i in range(1, 6)]
    assert all(n.note == "" for n in nodes)
    lines = [r.getMessage() for r in caplog.records]
    assert not any("ghost-" in line for line in lines)  # the warm-up logged them; not again
    # the passes after the first ask nothing of the ghosts: a miss is counted once per lookup
    assert metrics.dns_member_misses_total.labels(kind)._value.get() == before
    # a new real member joins on the next pass
    new_port = dnsmasq(*real_records(tmp_path, extra=["w-new"]), *ghost_records(domain))
    point_at(d, new_port)
    assert "w-new" in [n.name for n in d.discover()[0]]


def test_each_ghost_logs_one_line_per_change(dnsmasq, tmp_path, caplog):
    port = dnsmasq(*real_records(tmp_path), *ghost_records(SVC))
    d = Discovery(cfg(port, negative_ttl_fallback_s=0.0, negative_ttl_min_s=0.0))
    with caplog.at_level(logging.INFO, logger="mlbench_daemon.discovery"):
        for _ in range(3):  # the misses expire at once: every pass asks again
            d.discover()
    ghost_lines = [r.getMessage() for r in caplog.records if "ghost-" in r.getMessage()]
    assert len(ghost_lines) == GHOSTS, ghost_lines[:3]
    assert all("does not exist" in line for line in ghost_lines)


def test_nxdomain_is_kept_for_the_fallback_ttl_then_asked_again(dnsmasq, tmp_path):
    """dnsmasq's NXDOMAIN has no SOA: kept negative_ttl_fallback_s."""
    port = dnsmasq(*real_records(tmp_path, n=1), f"--srv-host={SRV},late.{SVC},22")
    d = Discovery(cfg(port, negative_ttl_fallback_s=1.0, negative_ttl_min_s=30.0))
    assert [n.name for n in d.discover()[0]] == ["w-1"]
    # --address: not in the SRV answer's additional section, so only a lookup finds it
    late = dnsmasq(
        *real_records(tmp_path, n=1),
        f"--srv-host={SRV},late.{SVC},22",
        f"--address=/late.{SVC}/127.77.0.9",
    )
    point_at(d, late)
    assert [n.name for n in d.discover()[0]] == ["w-1"]  # the miss is still kept
    time.sleep(1.2)
    assert [n.name for n in d.discover()[0]] == ["late", "w-1"]


def test_refused_member_keeps_its_address_with_a_note_then_recovers(dnsmasq, tmp_path, caplog):
    """A member whose address lookup is refused keeps its last address, with a note, and
    the others still join and leave; once answered again, the note goes."""
    keep = "keep.other.test"  # served by the first server only: the others refuse it
    with_keep = [
        f"--srv-host={SRV},{keep},22",
        "--local=/other.test/",
        hosts_file(tmp_path, f"127.77.2.1 {keep}"),
    ]
    good = dnsmasq(*real_records(tmp_path, n=2), *with_keep)
    d = Discovery(cfg(port=good, negative_ttl_min_s=0.0))
    nodes = {n.name: n for n in d.discover()[0]}
    assert nodes["keep"].ip == "127.77.2.1" and nodes["keep"].note == ""
    refusing = dnsmasq(*real_records(tmp_path, n=3), f"--srv-host={SRV},{keep},22")
    point_at(d, refusing)
    with caplog.at_level(logging.INFO, logger="mlbench_daemon.discovery"):
        nodes = {n.name: n for n in d.discover()[0]}
        again = {n.name: n for n in d.discover()[0]}
    assert sorted(nodes) == ["keep", "w-1", "w-2", "w-3"]  # w-3 joined all the same
    assert nodes["keep"].ip == "127.77.2.1"
    assert "REFUSED" in nodes["keep"].note and "keeping its last address" in nodes["keep"].note
    assert again == nodes
    keep_lines = [r.getMessage() for r in caplog.records if "keep" in r.getMessage()]
    assert len(keep_lines) == 2, keep_lines  # the target's state, the node's note: once each
    back = dnsmasq(*real_records(tmp_path, n=2), *with_keep)
    point_at(d, back)
    time.sleep(0.1)
    nodes = {n.name: n for n in d.discover()[0]}
    assert nodes["keep"].note == "" and sorted(nodes) == ["keep", "w-1", "w-2"]  # w-3 left


def test_a_60_kb_txt_record_is_capped_with_a_note(dnsmasq, tmp_path, caplog):
    strings = [f"key{i}={'v' * 50}" for i in range(1000)] + ["long=" + "x" * 200]
    port = dnsmasq(*real_records(tmp_path, n=1), f"--txt-record=w-1.{SVC},{','.join(strings)}")
    d = Discovery(cfg(port, label_rules=[{"match": "w-*", "labels": {"rule": "yes"}}]))
    with caplog.at_level(logging.INFO, logger="mlbench_daemon.discovery"):
        (node,), _ = d.discover()
        (again,), _ = d.discover()
    assert again == node
    assert len(node.labels) == 65 and node.labels["rule"] == "yes"  # 64 TXT keys + the rule
    assert "long" not in node.labels
    assert sum(len(f"{k}={v}") for k, v in node.labels.items() if k != "rule") <= 4096
    assert node.note == (
        "labels capped: dropped 937 of 1001 TXT keys (1 with a value over 128 characters; "
        "936 beyond 64 keys or 4096 bytes)"
    )
    assert len([r for r in caplog.records if "labels capped" in r.getMessage()]) == 1


@pytest.mark.logic
@pytest.mark.parametrize(
    "authority, ttl",
    [
        ("ns. 3600 IN SOA ns. host. 1 7200 900 1209600 120", 120.0),  # MINIMUM < TTL
        ("ns. 45 IN SOA ns. host. 1 7200 900 1209600 300", 45.0),  # TTL < MINIMUM
        (None, None),  # no SOA (dnsmasq): the fallback applies
    ],
)
def test_negative_ttl_is_the_smaller_of_soa_ttl_and_minimum(authority, ttl):
    text = "id 1\nopcode QUERY\nrcode NXDOMAIN\nflags QR AA\n;QUESTION\nx.ns. IN A\n;AUTHORITY\n"
    response = dns.message.from_text(text + (authority or ""))
    assert negative_ttl(response) == ttl


# --- zone transfer (transfer_zone), served by NSD --------------------------------------

XZONE = "cluster.local"


def member_records(n, *, skip_address=(), rack=lambda i: f"r{i % 4}"):
    """SRV, A and TXT lines of n members w-<i> of SVC (w-<i> in skip_address: no A)."""
    lines = []
    for i in range(n):
        host = f"w-{i}.{SVC}."
        lines.append(f"{SRV}. 60 IN SRV 0 0 22 {host}")
        if i not in skip_address:
            lines.append(f"{host} 60 IN A 127.1.{i // 250}.{i % 250 + 1}")
        lines.append(f'{host} 60 IN TXT "component=worker" "rack={rack(i)}"')
    return lines


def _serving(kind, binary, tmp_path, request):
    """start(records, **kw) -> a running `kind` (tests.cluster.nsd) on 127.0.0.1 serving
    XZONE, stopped at the test's end."""
    if not os.path.exists(binary):
        pytest.skip(f"{binary} not installed")

    def start(records, **kw):
        server = kind(tmp_path / kind.__name__.lower(), "127.0.0.1", nsd_port(), **kw)
        request.addfinalizer(server.stop)
        server.write({XZONE: records})
        server.start()
        return server

    return start


@pytest.fixture
def nsd(tmp_path, request):
    """NSD 4.6: AXFR; an IXFR is answered with the whole zone."""
    return _serving(NSD, NSD_BIN, tmp_path, request)


@pytest.fixture
def knot(tmp_path, request):
    """Knot DNS: IXFR answered with the changes only."""
    return _serving(Knot, KNOTD_BIN, tmp_path, request)


@pytest.fixture
def bind(tmp_path, request):
    """BIND 9: IXFR answered with the changes only; one RRset of at most 64 KB."""
    return _serving(Bind, NAMED_BIN, tmp_path, request)


def xfr_discovery(server, **kw):
    return Discovery(cfg(server.port, transfer_zone=XZONE, **kw))


def test_transfer_reads_members_past_one_dns_message(nsd):
    server = nsd(member_records(2000))
    with pytest.raises(DiscoveryError):  # one SRV answer cannot carry them (NSD: no answer)
        discover(server.port)
    nodes, ttl = xfr_discovery(server).discover()
    assert len(nodes) == 2000
    assert [n.name for n in nodes[:3]] == ["w-0", "w-1", "w-2"]
    assert nodes[1999].ip == "127.1.7.250" and nodes[999].port == 22
    assert dict(nodes[5].labels) == {"component": "worker", "rack": "r1"}
    assert ttl == 60  # the shortest TTL of the records read


def test_transfer_unchanged_zone_is_not_rebuilt_and_changes_show(nsd, monkeypatch):
    server = nsd(member_records(20))
    d = xfr_discovery(server, recheck_s=300.0)
    first, _ = d.discover()
    rebuilt = []
    real = d._discover
    monkeypatch.setattr(d, "_discover", lambda p: rebuilt.append(1) or real(p))
    assert d.discover()[0] == first and rebuilt == []  # same serial: the last list
    records = member_records(19, rack=lambda i: "r9" if i == 3 else f"r{i % 4}")
    records = [r.replace("127.1.0.6", "127.1.0.66") for r in records]  # w-5 moved
    server.write({XZONE: records})
    server.reload()
    nodes, _ = d.discover()
    assert rebuilt == [1]
    by_name = {n.name: n for n in nodes}
    assert len(nodes) == 19 and "w-19" not in by_name
    assert by_name["w-3"].labels["rack"] == "r9"  # not kept for recheck_s: the copy is fresh
    assert by_name["w-5"].ip == "127.1.0.66"


def test_transfer_member_without_address_is_dropped_once_logged(nsd, caplog):
    server = nsd(member_records(4, skip_address={2}))
    d = xfr_discovery(server)
    with caplog.at_level(logging.WARNING):
        nodes, _ = d.discover()
        server.write({XZONE: member_records(5, skip_address={2})})  # a change: a full pass
        server.reload()
        assert len(d.discover()[0]) == 4
    assert [n.name for n in nodes] == ["w-0", "w-1", "w-3"]
    misses = [r for r in caplog.records if "w-2." in r.getMessage()]
    assert len(misses) == 1 and "has no A/AAAA record" in misses[0].getMessage()


def test_transfer_refused_is_one_clear_error(nsd):
    server = nsd(member_records(2), provide_xfr=False)
    with pytest.raises(DiscoveryError) as e:
        xfr_discovery(server).discover()
    assert e.value.reason == "dns-error"
    assert "REFUSED" in str(e.value) and "allow transfers" in str(e.value)


def test_transfer_zone_must_hold_the_srv_name():
    with pytest.raises(ValueError, match="does not hold"):
        Discovery(cfg(53, transfer_zone="example.org"))
    with pytest.raises(ValueError, match=r"needs discovery\.nameservers"):
        Discovery(cfg(53, transfer_zone=XZONE, nameservers=[]))


def edit(records, drop=(), replace=None, add=()):
    """records without the lines containing any of `drop`, `replace` {old: new} applied."""
    out = [r for r in records if not any(d in r for d in drop)]
    for old, new in (replace or {}).items():
        out = [r.replace(old, new) for r in out]
    return out + list(add)


@pytest.mark.parametrize(
    "change",
    [
        dict(drop=["w-19."]),  # a member leaves
        dict(add=member_records(22)[-6:]),  # two join
        dict(replace={'"rack=r3"': '"rack=r9"'}),  # labels change
        dict(replace={"127.1.0.6": "127.1.0.66"}),  # an address moves
        dict(drop=["w-4. 60 IN A"]),  # a member loses its address: dropped
        dict(replace={"22 w-7.": "2222 w-7."}),  # a member's port changes
        dict(add=[f"{SRV}. 60 IN SRV 0 0 22 w-1.elsewhere.{SVC}."]),  # first label taken
        dict(add=[f"{SRV}. 60 IN SRV 1 0 2222 w-2.{SVC}."]),  # a member in two SRV records
    ],
)
def test_ixfr_updates_only_the_changed_members_as_a_full_pass_would(knot, monkeypatch, change):
    records = member_records(20)
    server = knot(records)
    d = xfr_discovery(server, recheck_s=300.0)
    d.discover()
    full = []
    real = d._discover
    monkeypatch.setattr(d, "_discover", lambda p: full.append(1) or real(p))
    server.write({XZONE: edit(records, **change)})
    server.reload()
    nodes, _ = d.discover()
    fresh, _ = xfr_discovery(server).discover()  # a new copy: AXFR and a full pass
    assert nodes == fresh
    clash = "elsewhere" in str(change) or "2222 w-2." in str(change)
    assert full == ([1] if clash else [])  # a shared name or target needs the full pass


def test_bind_transfers_1000_members_then_only_their_changes(bind, monkeypatch):
    """BIND 9 (Debian 12's 9.18) keeps IXFR journals, like Knot: 1,000 members (the
    issue's 1,000-node head) copied once, then a pass after a member leaves and another
    moves reads only those changes and gives what a fresh full pass gives."""
    records = member_records(1000)
    server = bind(records)
    d = xfr_discovery(server, recheck_s=300.0)
    assert len(d.discover()[0]) == 1000
    full = []
    real = d._discover
    monkeypatch.setattr(d, "_discover", lambda p: full.append(1) or real(p))
    moved = {f"w-5.{SVC}. 60 IN A 127.1.0.6": f"w-5.{SVC}. 60 IN A 127.1.0.66"}
    server.write({XZONE: edit(records, drop=["w-19."], replace=moved)})
    server.reload()
    nodes, _ = d.discover()
    assert full == [] and len(nodes) == 999  # the changes only: no full pass
    assert nodes == xfr_discovery(server).discover()[0]
    assert {n.name: n.ip for n in nodes}["w-5"] == "127.1.0.66"
