"""The roll-call of a running job (GET /api/mpi_jobs/<id>/ranks, jobs/rollcall.py).

Logic tests read the roll-call script's answer as a node gives it.  Cluster tests run
a real 4-rank MPI program on every launcher where rank 1 sleeps before MPI_Allreduce
while the others wait in it, and take its roll-call over the real SSH pool with the
real gdb; ptrace is denied with a real seccomp filter (tests/data/rollcall/noptrace.c)
preloaded into every process of a host's SSH sessions."""

import json
import re
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path

import msgspec
import pytest

from mlbench_daemon import cli
from mlbench_daemon.client import Client
from mlbench_daemon.jobs import rollcall
from mlbench_daemon.shapes import RankReport
from mlbench_daemon.vocabulary import ProcessState, StackSource
from tests.cluster import MPIS
from tests.cluster.cluster import MPI_ROOT
from tests.helpers import call_port, cancel_job, wait_for
from tests.test_flavours import mpi_or_skip
from tests.test_jobs import Env

DATA = Path(__file__).resolve().parent / "data" / "rollcall"
# a venv of the system python with mpi4py and py-spy (.ci/run makes it), which the
# cluster user can run
PYSPY_VENV = MPI_ROOT / "pyspy"
# extra launcher options so that 4 ranks fit on the 3 one-slot workers
OVERSUBSCRIBE = {
    "openmpi4": ["--oversubscribe"],
    "openmpi5": ["--map-by", ":OVERSUBSCRIBE"],
    "mpich": [],  # Hydra wraps round the host list by itself
}


# --- the script's answer, grouping, suspects (no cluster) ---------------------------------

GDB_SLEEP = """[Thread debugging using libthread_db enabled]
#0  0x00007f1 in __GI___clock_nanosleep (clock_id=0, req=0x7ffd) at clock_nanosleep.c:71
#1  0x00007f2 in __GI___nanosleep (req=<optimized out>) at nanosleep.c:25
#2  0x00007f3 in __sleep (seconds=0) at ../sysdeps/posix/sleep.c:55
#3  0x0000555 in main (argc=<optimized out>, argv=<optimized out>) at stall.c:14
[Inferior 1 (process 812) detached]"""
GDB_WAIT = """#0  0x00007f9 in mca_btl_tcp_component_progress () from /lib/libmpi.so.40
#1  0x00007fa in opal_progress () from /lib/libopen-pal.so.40
#2  0x00007fb in ompi_coll_base_allreduce_intra_recursivedoubling () from /lib/libmpi.so.40
#3  0x00007fc in PMPI_Allreduce () from /lib/libmpi.so.40
#4  0x0000556 in main (argc=<optimized out>, argv=<optimized out>) at stall.c:15"""
STAT = "{pid} (stall) {s} 700 700 700 0 -1 4194304 0 0 0 0 {ut} 20 0 0 20 0 3 0 1 2 {rss} 0"


def block(pid, rank, tool="gdb 0", out="", s="S", ut=(10, 30), wchan="hrtimer_nanosleep",
          up=()):  # fmt: skip
    lines = [
        f"proc {pid} OMPI_COMM_WORLD_RANK={rank} OMPI_COMM_WORLD_SIZE=4 PMIX_RANK={rank}",
        "stat1 " + STAT.format(pid=pid, s=s, ut=ut[0], rss=100),
        *([f"up1 {up[0]} 9.00"] if up else []),
        "stat2 " + STAT.format(pid=pid, s=s, ut=ut[1], rss=100),
        *([f"up2 {up[1]} 9.50"] if up else []),
        f"wchan {wchan}",
        f"tool {tool}",
        *("| " + line for line in out.splitlines()),
        "end",
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.logic
def test_cpu_percent_divides_by_the_time_that_passed_between_the_two_reads():
    """Under load the sleep between a rank's two stat reads lasts longer than the nominal
    sample: /proc/uptime read beside each gives the real window."""
    text = "hz 100 4096\n" + "".join(
        block(900 + n, n, ut=(10, 30), up=up)
        for n, up in enumerate([("100.00", "100.50"), ("7.10", "7.30"), ("5.00", "5.00"), ()])
    )
    got = [p.report.cpu_percent for p in rollcall.parse_node(text, "w1")]
    # 20 ticks over 0.5 s; over 0.2 s; a window too short to be real, and none: 0.2 s
    assert got == [pytest.approx(40.0), pytest.approx(100.0), 100.0, 100.0]


@pytest.mark.logic
def test_a_node_answer_reads_into_ranks_with_cpu_rss_and_frames():
    text = "hz 100 4096\n" + block(812, 1, out=GDB_SLEEP) + block(813, 0, out=GDB_WAIT, s="R")
    procs = rollcall.parse_node(text, "w1")
    one, zero = (p.report for p in procs)
    assert (one.rank, one.node, one.pid, one.state) == (1, "w1", 812, ProcessState.SLEEPING)
    assert one.cpu_s == pytest.approx(0.5)  # 30 + 20 ticks at 100 Hz
    assert one.cpu_percent == pytest.approx(100.0)  # 20 ticks in the 0.2 s sample
    assert one.rss_bytes == 100 * 4096
    assert one.stack_source == StackSource.GDB and one.stack_error is None
    assert one.stack[0] == "__GI___clock_nanosleep at clock_nanosleep.c:71"
    assert one.stack[3] == "main at stall.c:14"
    assert zero.stack[0] == "mca_btl_tcp_component_progress from /lib/libmpi.so.40"
    assert rollcall.normalise(StackSource.GDB, zero.stack) == ["MPI_Allreduce", "main"]


def report(rank, stack, source=StackSource.GDB, node="w"):
    return RankReport(
        rank=rank, node=node, pid=100 + rank, state=ProcessState.RUNNING, cpu_s=1.0,
        cpu_percent=99.0, rss_bytes=1, wchan=None, stack_source=source, stack_error=None,
        stack=stack,
    )  # fmt: skip


@pytest.mark.logic
def test_the_odd_rank_out_is_the_only_suspect():
    wait = rollcall.gdb_frames(GDB_WAIT)
    # waiting ranks caught in different progress functions still wait in one place
    other = ["opal_progress from x", "PMPI_Allreduce from x", "main at stall.c:15"]
    sleep = rollcall.gdb_frames(GDB_SLEEP)
    ranks = [report(0, wait), report(1, sleep, node="w2"), report(2, other), report(3, wait)]
    groups, suspects = rollcall.verdict(ranks)
    assert [g.ranks for g in groups] == [[0, 2, 3], [1]]
    assert [(s.rank, s.node, s.top_frame) for s in suspects] == [
        (1, "w2", "__GI___clock_nanosleep at clock_nanosleep.c:71")
    ]


@pytest.mark.logic
def test_no_suspect_when_all_agree_or_no_group_is_largest():
    wait = rollcall.gdb_frames(GDB_WAIT)
    assert rollcall.verdict([report(r, wait) for r in range(4)])[1] == []
    sleep = rollcall.gdb_frames(GDB_SLEEP)
    two_two = [report(0, wait), report(1, wait), report(2, sleep), report(3, sleep)]
    groups, suspects = rollcall.verdict(two_two)
    assert len(groups) == 2 and suspects == []


@pytest.mark.logic
def test_denied_ptrace_is_named_and_wchan_stands_in():
    denied = "ptrace: Operation not permitted.\nNo symbol table is loaded."
    text = "hz 100 4096\n" + block(9, 2, tool="gdb 1", out=denied, wchan="do_epoll_wait")
    (p,) = rollcall.parse_node(text, "w3")
    r = p.report
    assert r.stack_source == StackSource.WCHAN and r.stack == ["do_epoll_wait"]
    assert r.stack_error == "gdb: ptrace denied: ptrace: Operation not permitted."
    assert r.state == ProcessState.SLEEPING and r.cpu_s is not None
    (odd,) = rollcall.parse_node("hz 100 4096\n" + block(9, 2, s="W"), "w3")  # unknown letter
    assert odd.report.state is None and odd.report.cpu_s is not None


@pytest.mark.logic
def test_without_stacks_running_ranks_group_apart_from_a_sleeping_one():
    def bare(rank, state, wchan):
        r = report(rank, [wchan] if wchan else [], StackSource.WCHAN)
        return msgspec.structs.replace(r, state=state, wchan=wchan)

    ranks = [bare(0, ProcessState.RUNNING, None), bare(1, ProcessState.SLEEPING,
             "hrtimer_nanosleep"), bare(2, ProcessState.RUNNING, None)]  # fmt: skip
    groups, suspects = rollcall.verdict(ranks)
    assert [(g.ranks, g.key) for g in groups] == [
        ([0, 2], ["on-cpu"]),
        ([1], ["wchan:hrtimer_nanosleep"]),
    ]
    assert [s.rank for s in suspects] == [1]


@pytest.mark.logic
def test_missing_tools_timeouts_and_missing_ranks_are_each_named():
    text = (
        "hz 100 4096\n"
        + block(5, 0, tool="none -")
        + block(6, 1, tool="gdb 124", out="#0  main () at x.c:1")  # killed mid-answer
        + block(7, 1, tool="gdb 0", out=GDB_SLEEP).replace("700 700 700", "6 700 700")
    )
    procs = rollcall.parse_node(text, "w1")
    ranks = rollcall.ranks_of(procs, 3, [rollcall.NodeProblem(node="w9", error="unreachable")])
    assert [r.rank for r in ranks] == [0, 1, 2, 3]  # 3 = OMPI_COMM_WORLD_SIZE - 1
    assert ranks[0].stack_error == "none of mpi.roll_call_tools is installed on the node"
    assert ranks[0].stack == ["hrtimer_nanosleep"]
    assert ranks[1].pid == 7  # rank 1's innermost process (6 is its parent)
    assert ranks[2].stack_source == StackSource.NONE and ranks[2].node is None
    assert ranks[2].stack_error == (
        "no process of this rank found on the job's nodes (not read: w9)"
    )
    (timed_out,) = rollcall.parse_node("hz 100 4096\n" + block(6, 1, tool="gdb 124"), "w")
    assert timed_out.report.stack_error == "gdb did not finish within its bound"


EU_STACK = """TID 5557:
#0  0x00007ff052af6503 clock_nanosleep@GLIBC_2.2.5 - /usr/lib/x86_64-linux-gnu/libc.so.6
#1  0x00007ff052afae53 __nanosleep - /usr/lib/x86_64-linux-gnu/libc.so.6
#2  0x000056427029d4af - /opt/app/stall
#3  0x00007ff052a4e305 __libc_start_main@@GLIBC_2.34 - /usr/lib/x86_64-linux-gnu/libc.so.6
"""


@pytest.mark.logic
def test_eu_stack_frames_drop_symbol_versions():
    assert rollcall.eu_stack_frames(EU_STACK) == [
        "clock_nanosleep from /usr/lib/x86_64-linux-gnu/libc.so.6",
        "__nanosleep from /usr/lib/x86_64-linux-gnu/libc.so.6",
        "?? from /opt/app/stall",
        "__libc_start_main from /usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    text = "hz 100 4096\n" + block(4, 0, tool="eu-stack 0", out=EU_STACK)
    (p,) = rollcall.parse_node(text, "w")
    assert p.report.stack_source == StackSource.EU_STACK
    assert rollcall.normalise(StackSource.EU_STACK, p.report.stack)[:2] == [
        "clock_nanosleep",
        "__nanosleep",
    ]


@pytest.mark.logic
def test_roll_call_tools_setting_takes_known_names_once():
    from mlbench_daemon import config

    assert config.stack_tools(["gdb", "py-spy"]) == ["gdb", "py-spy"]
    for bad in (["lldb"], ["gdb", "gdb"], "gdb"):
        with pytest.raises(ValueError, match="distinct names from py-spy, eu-stack, gdb"):
            config.stack_tools(bad)


@pytest.mark.logic
def test_py_spy_frames_are_the_main_threads():
    unnamed = """Process 31873: python3 prog.py
Python v3.11.2 (/usr/bin/python3.11)

Thread 31880 (idle)
    run (threading.py:975)
Thread 31873 (idle)
    nap (prog.py:3)
    <module> (prog.py:4)
"""
    assert rollcall.spy_frames(unnamed, 31873) == ["nap (prog.py)", "<module> (prog.py)"]
    dump = """Process 77: python3 prog.py
Python v3.11.2 (/usr/bin/python3.11)

Thread 0x7F01 (idle): "MainThread"
    wait_for_peers (prog.py:12)
    main (prog.py:30)
    <module> (prog.py:33)
Thread 0x7F02 (idle): "Thread-1"
    run (threading.py:975)
"""
    assert rollcall.spy_frames(dump, 77) == [
        "wait_for_peers (prog.py)",
        "main (prog.py)",
        "<module> (prog.py)",
    ]


@pytest.mark.logic
def test_concurrent_callers_share_one_call():
    co = rollcall.Coalescer()
    inside, release, calls = threading.Event(), threading.Event(), []

    def slow():
        calls.append(1)
        inside.set()
        release.wait(10)
        return object()

    got = []
    first = threading.Thread(target=lambda: got.append(co.run("j", slow)))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=lambda: got.append(co.run("j", slow)))
    second.start()
    wait_for(lambda: second.is_alive(), what="the second caller waiting")
    release.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and len(got) == 2 and got[0] is got[1]
    assert co.run("j", lambda: 5) == 5  # the next call after it runs again


@pytest.mark.logic
def test_cli_table_puts_suspects_first():
    wait = rollcall.gdb_frames(GDB_WAIT)
    sleep = rollcall.gdb_frames(GDB_SLEEP)
    ranks = [report(0, wait), report(1, sleep, node="w2"), report(2, wait)]
    groups, suspects = rollcall.verdict(ranks)
    call = rollcall.RollCall(
        job_id="0" * 20, taken="2026-12-04T00:00:00.000Z", took_s=1.0, sample_s=0.2,
        ranks=ranks, groups=groups, suspects=suspects, nodes_failed=[],
    )  # fmt: skip
    lines = cli.rank_table(msgspec.to_builtins(call)).splitlines()
    assert lines[0].split()[:3] == ["RANK", "NODE", "PID"]
    assert lines[1].split()[:2] == ["*1", "w2"]
    assert [line.split()[0] for line in lines[2:4]] == ["0", "2"]
    assert lines[-1] == "suspects (*): 1"


# --- on the cluster ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built(cluster_session):
    """{flavour: the stall program built with its mpicc} and the seccomp preload library."""
    out = cluster_session.dir / "bin"
    progs = {}
    for name, m in MPIS.items():
        if Path(m.mpicc).exists() and Path(m.launcher).exists():
            progs[name] = out / f"stall-{name}"
            subprocess.run(
                [m.mpicc, "-g", "-O0", "-o", progs[name], DATA / "stall.c"],
                check=True, timeout=120,
            )  # fmt: skip
    lib = out / "noptrace.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", lib, DATA / "noptrace.c"], check=True, timeout=120
    )
    return progs, lib


def stall_env(cluster, tmp_path, name, **mpi):
    base = mpi_or_skip(cluster, name)
    e = Env(
        cluster, tmp_path / "state", mpirun=base["mpirun"],
        args=[*base["args"], *OVERSUBSCRIBE[name]], cancel_grace_s=1.0, **mpi,
    )  # fmt: skip
    return e


def start_stalled(e, prog):
    """Submit the 4-rank stall job; wait until every rank said ready -> job id."""
    program = [*map(str, prog), "600"] if isinstance(prog, list) else [str(prog), "600"]
    job = e.jobs.submit({"program": program, "np": 4, "wait": False})

    def ready():
        text = e.jobs.read_log(job["id"], 0, 1 << 20)[0].decode(errors="replace")
        assert e.jobs.get(job["id"])["state"] in ("pending", "running"), text
        return all(f"ready {r}\n" in text for r in range(4))

    wait_for(ready, timeout=120, what="every rank ready")
    wait_for(lambda: e.jobs.get(job["id"])["state"] == "running", what="the job running")
    return job["id"]


def cancel_running(e):
    """Cancel every job still live, each followed to its end."""
    for j in e.jobs.list():
        if j["state"] in ("pending", "running"):
            cancel_job(e.jobs, j["id"])


def settled_roll_call(e, job_id, waits_in="Allreduce"):
    """A roll-call once ranks 0, 2 and 3 have entered MPI_Allreduce (they print 'ready'
    just before it), or the last one taken."""
    calls = []

    def settled():
        calls.append(e.jobs.roll_call(job_id))
        waiting = [r for r in calls[-1].ranks if r.rank != 1]
        return all(any(waits_in in f for f in r.stack) for r in waiting)

    try:
        wait_for(settled, timeout=60, what=f"ranks 0, 2 and 3 in {waits_in}")
    except AssertionError:
        print(cli.rank_table(msgspec.to_builtins(calls[-1])), calls[-1])
        raise
    return calls[-1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tool", [StackSource.EU_STACK, StackSource.GDB])
@pytest.mark.parametrize("name", list(MPIS))
def test_rank_sleeping_before_the_allreduce_is_the_one_suspect(
    cluster, tmp_path, built, name, tool
):
    progs, _ = built
    if name not in progs:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    e = stall_env(cluster, tmp_path, name, roll_call_tools=[str(tool)])
    try:
        job_id = start_stalled(e, progs[name])
        call = settled_roll_call(e, job_id)
        print(cli.rank_table(msgspec.to_builtins(call)))  # shown with -s
        by_rank = {r.rank: r for r in call.ranks}
        assert sorted(by_rank) == [0, 1, 2, 3], call
        assert call.nodes_failed == []
        one = by_rank[1]
        assert [(s.rank, s.node) for s in call.suspects] == [(1, one.node)], call
        assert one.stack_source == tool, one
        assert any("sleep" in f for f in one.stack), one.stack
        assert "sleep" in call.suspects[0].top_frame
        assert [g.ranks for g in call.groups] == [[0, 2, 3], [1]], call.groups
        for r in call.ranks:
            assert r.node in {w.name for w in cluster.workers}
            assert r.pid and r.state and r.cpu_s is not None and r.rss_bytes
            assert r.cpu_percent is not None and r.stack_error is None
        assert one.state == ProcessState.SLEEPING and one.wchan
        assert e.jobs.get(job_id)["state"] == "running"  # the roll-call did not disturb it
    finally:
        cancel_running(e)
        e.close()


@pytest.mark.timeout(600)
def test_python_ranks_get_py_spy_frames_naming_where_rank_1_waits(cluster, tmp_path):
    python = PYSPY_VENV / "bin" / "python3"
    if not (PYSPY_VENV / "bin" / "py-spy").exists() or not python.exists():
        pytest.skip(f"no mpi4py and py-spy venv at {PYSPY_VENV} (.ci/run makes it)")
    script = cluster.dir / "bin" / "stall.py"
    script.write_bytes((DATA / "stall.py").read_bytes())
    for w in cluster.workers:  # the nodes have py-spy on their PATH
        cluster.set_env(w, PATH=f"{PYSPY_VENV / 'bin'}:/usr/local/bin:/usr/bin:/bin")
    e = stall_env(cluster, tmp_path, "openmpi4")
    try:
        job_id = start_stalled(e, [python, script])
        call = settled_roll_call(e, job_id, waits_in="wait_for_peers")
        print(cli.rank_table(msgspec.to_builtins(call)))  # shown with -s
        assert [r.stack_source for r in call.ranks] == [StackSource.PY_SPY] * 4, call
        assert [(s.rank, s.top_frame) for s in call.suspects] == [
            (1, "nap_before_allreduce (stall.py)")
        ], call
        assert [(g.ranks, g.key) for g in call.groups] == [
            ([0, 2, 3], ["wait_for_peers (stall.py)", "<module> (stall.py)"]),
            ([1], ["nap_before_allreduce (stall.py)", "<module> (stall.py)"]),
        ]
    finally:
        cancel_running(e)
        e.close()


@pytest.mark.timeout(600)
def test_a_node_cut_off_is_named_and_its_ranks_still_listed(cluster, tmp_path, built):
    progs, _ = built
    e = stall_env(cluster, tmp_path, "openmpi4", roll_call_timeout_s=1.0)
    try:
        job_id = start_stalled(e, progs["openmpi4"])
        first = settled_roll_call(e, job_id)
        master = e.jobs.get(job_id)["master_name"]
        lost = next(r.node for r in first.ranks if r.node != master)
        lost_ranks = sorted(r.rank for r in first.ranks if r.node == lost)
        host = next(w for w in cluster.workers if w.name == lost)
        cluster.partition(host)  # the head cannot reach it; the job goes on
        try:
            call = e.jobs.roll_call(job_id)
        finally:
            cluster.heal(host)
        print(cli.rank_table(msgspec.to_builtins(call)))  # shown with -s
        assert [f.node for f in call.nodes_failed] == [lost], call
        assert sorted(r.rank for r in call.ranks) == [0, 1, 2, 3]
        for r in call.ranks:
            if r.rank in lost_ranks:
                assert r.node is None and r.stack_source == StackSource.NONE, r
                assert r.stack_error == (
                    f"no process of this rank found on the job's nodes (not read: {lost})"
                )
            else:
                assert r.node and r.stack, r
        assert call.took_s < 60  # bounded by mpi.roll_call_timeout_s, not by the lost node
    finally:
        cancel_running(e)
        e.close()


@pytest.mark.timeout(600)
def test_denied_ptrace_names_the_reason_and_still_gives_state_cpu_and_wchan(
    cluster, tmp_path, built
):
    progs, lib = built
    for w in cluster.workers:  # new sessions of every worker load the seccomp filter
        cluster.set_env(w, LD_PRELOAD=str(lib))
    e = stall_env(cluster, tmp_path, "openmpi4")
    try:
        job_id = start_stalled(e, progs["openmpi4"])
        call = e.jobs.roll_call(job_id)
        print(cli.rank_table(msgspec.to_builtins(call)))  # shown with -s
        assert sorted(r.rank for r in call.ranks) == [0, 1, 2, 3], call
        for r in call.ranks:
            assert r.stack_source == StackSource.WCHAN, r
            assert re.match(
                r"(eu-stack|gdb): ptrace denied: .*Operation not permitted", r.stack_error
            )
            assert r.state and r.cpu_s is not None and r.cpu_percent is not None and r.pid
        one = next(r for r in call.ranks if r.rank == 1)
        assert one.wchan and "sleep" in one.wchan and one.stack == [one.wchan]
    finally:
        cancel_running(e)
        e.close()


def log_of(port, job_id):
    answer = Client(f"http://127.0.0.1:{port}").call("GET", f"/api/mpi_jobs/{job_id}/logs")
    return answer.body.decode(errors="replace")


@pytest.mark.timeout(600)
def test_http_roll_call_404_409_coalesced_and_cli(start_daemon, cluster, built, capsys):
    progs, _ = built
    mpi = mpi_or_skip(cluster, "openmpi4")
    d = start_daemon(
        server={"max_streams": 2},
        mpi={"args": [*mpi["args"], "--oversubscribe"], "cancel_grace_s": 1.0},
    )
    port = urllib.parse.urlsplit(d.url).port
    assert call_port(port, "GET", "/api/mpi_jobs/0123456789abcdef0123/ranks")[0] == 404
    body = {"program": [str(progs["openmpi4"]), "600"], "np": 4, "wait": False}
    status, job = call_port(port, "POST", "/api/mpi_jobs", body)
    assert status == 202
    path = f"/api/mpi_jobs/{job['id']}/ranks"
    wait_for(
        lambda: all(f"ready {r}\n" in log_of(port, job["id"]) for r in range(4)),
        timeout=120,
        what="every rank ready",
    )
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(call_port(port, "GET", path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [a[0] for a in answers] == [200, 200], answers
    # both asked while one roll-call ran (it takes the 0.2 s sample and gdb): one answer
    assert answers[0][1]["taken"] == answers[1][1]["taken"], answers
    assert answers[0][1] == answers[1][1]

    # a roll-call counts against server.max_streams: with both slots held by log follows
    # it is refused at once
    follows = [
        Client(d.url).open("GET", f"/api/mpi_jobs/{job['id']}/logs?follow=1", timeout=60)
        for _ in range(2)
    ]
    try:
        status, err = call_port(port, "GET", path)
        assert (status, err["error"]) == (503, "too-many-streams"), err
    finally:
        for f in follows:
            f.close()
    wait_for(lambda: call_port(port, "GET", path)[0] == 200, what="the slots given back")

    assert cli.main(["--url", d.url, "ranks", job["id"]]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["RANK", "NODE"]
    assert cli.main(["--url", d.url, "--json", "ranks", job["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == job["id"]

    assert call_port(port, "DELETE", f"/api/mpi_jobs/{job['id']}")[0] in (200, 202)
    d.wait_job(job["id"])  # 202: the sweep took longer than server.cancel_answer_s
    status, err = call_port(port, "GET", path)
    assert status == 409 and err["error"] == "conflict", err
    assert "a roll-call needs a running job's ranks" in err["message"]
