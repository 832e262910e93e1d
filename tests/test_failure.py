"""Failure attribution on real OpenMPI 4 output (captured on the test cluster by
tests/data/capture_openmpi4.py: 3 hosts with 2 slots each, np=5, mpirun on the
middle host, so rank i is not on host i)."""

import json
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlbench_daemon.jobs import failure
from mlbench_daemon.jobs.failure import NodeRef, attribute, node_for_host, rank_hosts, rank_map

pytestmark = pytest.mark.logic

DATA = Path(__file__).resolve().parent / "data" / "openmpi4"


def case(name):
    return json.loads((DATA / f"{name}.json").read_text())


def attribute_case(doc, state="failed", reason=None):
    nodes = [NodeRef(n["name"], n["ip"], n["hostname"]) for n in doc["nodes"]]
    master = next(n.name for n in nodes if n.ip == doc["master_ip"])
    return attribute(
        state=state,
        reason=reason,
        exit_code=doc["exit_code"],
        output=doc["output"],
        command=doc["command"],
        master=master,
        master_ip=doc["master_ip"],
        nodes=nodes,
    )


def name_of(doc, index):
    return doc["nodes"][index]["name"]


def test_the_captured_map_is_the_modelled_one():
    """The successful run printed where each rank ran: the model agrees."""
    doc = case("succeeded")
    seen = {}
    for line in doc["output"].splitlines():
        if line.startswith("rank "):
            words = line.split()
            seen[int(words[1])] = words[5].rstrip(":")
    assert rank_map(doc["command"], doc["master_ip"]) == [seen[r] for r in range(5)]
    ips = [n["ip"] for n in doc["nodes"]]
    assert [seen[r] for r in range(5)] == [ips[1], ips[1], ips[0], ips[0], ips[2]]


def test_succeeded_has_no_failure():
    assert attribute_case(case("succeeded"), state="succeeded") is None


def test_rank_exit_names_rank_node_and_code():
    doc = case("rank-exit")
    f = attribute_case(doc)
    assert f["kind"] == "rank-exit"
    assert (f["rank"], f["exit_code"], f["signal"]) == (3, 3, None)
    assert f["node"] == name_of(doc, 0)  # rank 3 is on the first listed host, not host 3
    assert f["host"] == doc["nodes"][0]["ip"]
    assert name_of(doc, 0) in f["message"] and "rank 3" in f["message"]
    assert f["hint"] == failure.HINTS["rank-exit"]


def test_rank_exit_of_every_rank_names_the_first():
    doc = case("rank-exit-all")
    f = attribute_case(doc)
    first = int(doc["output"].split("Process name: [[")[1].split("],")[1].split("]")[0])
    ranks = rank_map(doc["command"], doc["master_ip"])
    assert (f["kind"], f["rank"], f["exit_code"]) == ("rank-exit", first, 7)
    assert f["node"] == next(n["name"] for n in doc["nodes"] if n["ip"] == ranks[first])


def test_rank_signal_names_rank_node_and_signal():
    doc = case("rank-signal")
    f = attribute_case(doc)
    assert f["kind"] == "rank-signal"
    assert (f["rank"], f["signal"], f["exit_code"]) == (4, 9, None)
    assert f["node"] == name_of(doc, 2)
    assert "SIGKILL" in f["message"]


def test_rank_signal_without_the_launcher_naming_the_rank():
    """mpirun sometimes exits 128+N before printing which rank died."""
    doc = case("rank-signal")
    doc["output"] = doc["output"].split("mpirun noticed")[0]
    f = attribute_case(doc)
    assert (f["kind"], f["signal"], f["rank"], f["node"]) == ("rank-signal", 9, None, None)


def test_exe_not_found_names_the_node_by_host_name():
    doc = case("exe-not-found")
    f = attribute_case(doc)
    assert f["kind"] == "exe-not-found"
    assert "/nonexistent/program" in f["message"]
    # OpenMPI names its own node (the master) by its host name
    assert f["host"] == doc["nodes"][1]["hostname"]
    assert f["node"] == name_of(doc, 1)


def test_lost_contact_names_the_remote_node():
    doc = case("lost-contact")
    f = attribute_case(doc)
    assert (f["kind"], f["node"], f["host"]) == (
        "lost-contact",
        name_of(doc, 2),
        doc["nodes"][2]["ip"],
    )


def test_daemon_launch_names_the_host_ssh_named():
    doc = case("daemon-launch")
    f = attribute_case(doc)
    assert f["kind"] == "daemon-launch"
    # ORTE's own text names no host (and its "target node" is a different one); ssh's does
    assert f["node"] == name_of(doc, 2)


def test_daemon_launch_without_ssh_text_names_nobody():
    doc = case("daemon-launch")
    doc["output"] = doc["output"][doc["output"].index("-----") :]
    f = attribute_case(doc)
    assert (f["kind"], f["node"], f["host"]) == ("daemon-launch", None, None)
    assert "names no host" in f["message"]


HELP_TCP = Path("/usr/share/openmpi/help-mpi-btl-tcp.txt")


@pytest.mark.skipif(not HELP_TCP.exists(), reason="OpenMPI's help files are not installed")
def test_tcp_connect_failure_from_openmpis_own_help_text():
    """OpenMPI 4.1 on the test cluster hangs rather than print this when TCP between
    two nodes is dropped or rejected, so the text comes from its installed help file,
    filled in as it would fill it."""
    doc = case("rank-exit")
    w = doc["nodes"]
    text = HELP_TCP.read_text().split("[client connect fail]\n", 1)[1].split("\n#", 1)[0]
    filled = text % (w[0]["hostname"], 4242, f"connect() to {w[2]['ip']}:1024 failed",
                     "No route to host", 113)  # fmt: skip
    doc["output"] = "rank output\n" + "-" * 74 + "\n" + filled + "\n" + "-" * 74 + "\n"
    doc["exit_code"] = 1
    f = attribute_case(doc)
    assert (f["kind"], f["node"], f["host"]) == ("tcp-connect", w[0]["name"], w[0]["hostname"])
    assert f"{w[2]['name']} ({w[2]['ip']})" in f["message"]


def test_not_enough_slots():
    f = attribute_case(case("not-enough-slots"))
    assert f["kind"] == "not-enough-slots" and "np=7" in f["message"]


@pytest.mark.parametrize(
    "state, reason, kind",
    [
        ("cancelled", "timeout", "timeout"),
        ("cancelled", "cancelled", "cancelled"),
        ("lost", "master-unreachable", "master-lost"),
        ("failed", "no-usable-master", "no-master"),
        ("failed", "launch-failed", "launch-failed"),
        ("lost", "no-exit-status", "job-lost"),
    ],
)
def test_reasons_map_to_kinds(state, reason, kind):
    doc = case("rank-signal")  # whatever the output says, the recorded reason wins
    f = attribute_case(doc, state=state, reason=reason)
    assert f["kind"] == kind and f["hint"] == failure.HINTS[kind]
    assert set(f) == {"kind", "node", "host", "rank", "exit_code", "signal", "message", "hint"}


def test_a_code_without_any_notice_is_a_ranks_own_and_others_are_unknown():
    # mpirun under load at times prints neither notice: its status is the rank's code
    doc = case("succeeded")
    doc["exit_code"] = 2
    f = attribute_case(doc)
    assert (f["kind"], f["exit_code"], f["node"]) == ("rank-exit", 2, None)
    assert "code 2" in f["message"]
    doc["exit_code"] = 255  # not a rank's code, nor 128 + a signal
    f = attribute_case(doc)
    assert f["kind"] == "unknown" and "code 255" in f["message"]


def test_every_reason_has_a_kind_and_every_kind_a_hint():
    from mlbench_daemon.vocabulary import FailureKind, JobReason

    assert set(failure.REASON_KINDS) == set(JobReason)
    assert set(failure.HINTS) == set(FailureKind) == set(failure.KINDS)


def test_every_kind_has_a_hint_and_readme_row():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for kind in failure.KINDS:
        assert failure.HINTS[kind]
        assert f"| `{kind}` |" in readme, kind


def test_node_for_host():
    nodes = [NodeRef("w-0", "10.0.0.1", "vm"), NodeRef("w-1", "10.0.0.2", "vm"),
             NodeRef("w-2", "10.0.0.3", "w2.example")]  # fmt: skip
    assert node_for_host("10.0.0.2", nodes, "w-0") == "w-1"
    assert node_for_host("w-2", nodes, "w-0") == "w-2"
    assert node_for_host("w2", nodes, "w-0") == "w-2"  # a short name
    assert node_for_host("w2.example", nodes, "w-0") == "w-2"
    # a shared host name is the launcher's own node, the master
    assert node_for_host("vm", nodes, "w-1") == "w-1"
    assert node_for_host("vm", nodes, "w-2") is None
    assert node_for_host("elsewhere", nodes, "w-0") is None
    assert node_for_host(None, nodes, "w-0") is None


def test_mapping_options_make_the_map_unknown():
    base = ["/usr/bin/mpirun", "--host", "a:2,b:2", "-np", "3", "prog", "--map-by", "node"]
    assert rank_map(base, "a") == ["a", "a", "b"]  # the program's own options do not count
    assert rank_map(["/usr/bin/mpirun", "--map-by", "node", *base[1:6]], "a") is None
    assert (
        rank_map(["/usr/bin/mpirun", "--mca", "rmaps_base_mapping_policy", "node", *base[1:6]], "a")
        is None
    )
    assert rank_map(
        ["/usr/bin/mpirun", "--mca", "btl", "self,tcp", "-x", "A", *base[1:6]], "b"
    ) == ["b", "b", "a"]
    assert rank_map(["/usr/bin/mpirun", "--host", "a,b,c", "prog"], "c") == ["c", "a", "b"]


hosts_st = st.lists(
    st.tuples(st.text(string.ascii_lowercase, min_size=1, max_size=4), st.integers(1, 4)),
    min_size=1,
    max_size=6,
    unique_by=lambda h: h[0],
)


@given(hosts_st, st.data())
def test_rank_hosts_fills_the_master_then_the_list_by_slot(hosts, data):
    total = sum(s for _, s in hosts)
    np = data.draw(st.none() | st.integers(1, total + 3))
    master = data.draw(st.sampled_from([h for h, _ in hosts]))
    ranks = rank_hosts(hosts, np, master)
    if np is not None and np > total:
        assert ranks is None
        return
    n = total if np is None else np
    assert len(ranks) == n
    slots = dict(hosts)
    assert all(ranks.count(h) <= slots[h] for h in slots)
    assert ranks[0] == master
    # ranks of one host are contiguous, hosts come in list order after the master
    runs = [h for i, h in enumerate(ranks) if i == 0 or ranks[i - 1] != h]
    assert len(runs) == len(set(runs))
    assert runs == [master, *[h for h, _ in hosts if h != master][: len(runs) - 1]]
    # a host is only used once every host before it is full
    for h in runs[:-1]:
        assert ranks.count(h) == slots[h]


@given(st.text(max_size=400))
def test_parser_never_raises_on_any_text(text):
    failure.parse_openmpi4(text)


@given(st.text(max_size=300), st.text(max_size=300))
def test_a_verdict_is_found_anywhere_in_the_output(before, after):
    doc = case("rank-exit")
    tail = doc["output"][doc["output"].index("-----") :]
    facts = failure.parse_openmpi4(before.replace("Process name", "") + "\n" + tail + after)
    assert facts["kind"] == "rank-exit" and facts["rank"] == 3


@pytest.mark.parametrize("name", ["openmpi4", "openmpi5", "mpich"])
def test_an_mpmd_launch_maps_rank_i_to_host_i(name):
    from mlbench_daemon.jobs import flavour

    apps = [(f"10.0.0.{i}", ["prog", "--np", "9", "-H", "x"]) for i in (1, 2, 3)]
    argv = flavour.get(name).mpmd_argv("/usr/bin/mpirun", ["--mca", "btl", "tcp"], apps, ["A"])
    # whichever node launches: context i's one process is rank i, on its host
    assert rank_map(argv, "10.0.0.3") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    two = [*argv[: argv.index(":")], ":", "-n" if name == "mpich" else "-np", "2", "prog"]
    assert rank_map(two, "10.0.0.1") == (
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"] if name == "mpich" else None
    )  # Hydra fills its global list on; a context without its own --host is not modelled
