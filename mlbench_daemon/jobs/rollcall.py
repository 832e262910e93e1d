"""The roll-call of a running job: every rank with its process's state, CPU, memory and
stack, taken on all the job's nodes at once, then grouped by stack.

``take(remote, job_id, nodes, np, ...)`` runs remote.ROLL_CALL once per node in parallel
(each bounded) and returns a ``shapes.RollCall``; ``parse_node`` reads one node's answer
and ``verdict`` groups the stacks and names the suspects (both pure).  ``Coalescer``
lets concurrent askers of one job share a single roll-call.

Grouping compares *normalised* stacks: function names only (no addresses, arguments,
file lines, pids), and everything inside the MPI library cut at the MPI call the
program made (``MPI_Allreduce``/``PMPI_Allreduce``): ranks waiting in one collective
spin through different progress functions from one moment to the next, yet wait in
the same place.  A rank with only a ``wchan`` is keyed by that kernel function, or,
running on a CPU (no wchan then), by ``on-cpu``: where ptrace is denied, ranks spinning
in a collective still differ from one asleep.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from mlbench_daemon.jobs.remote import Host, Remote
from mlbench_daemon.shapes import NodeProblem, RankGroup, RankReport, RollCall, Suspect
from mlbench_daemon.ssh_errors import SSHError
from mlbench_daemon.timefmt import iso
from mlbench_daemon.vocabulary import ProcessState, StackSource

SAMPLE_S = 0.2  # the CPU sample
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")  # in this order of trust
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
MAX_FRAMES = 64
ON_CPU = "on-cpu"  # the group key of a running rank known only by its wchan (it has none)
TIMED_OUT = 124  # timeout(1)'s status when the bound ran out

# gdb: "#3  0x00007f... in PMPI_Allreduce (sendbuf=..., ...) at file.c:12" or
# "#0  main () at prog.c:9" or "#5  0x0000... in ?? () from /lib/libfoo.so"
_GDB_FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+?)\s*\((?:.*\))?\s*(?:(at|from) (\S+))?$")
# eu-stack -m: "#0  0x00007f... clock_nanosleep@GLIBC_2.2.5 - /lib/libc.so.6" (no name
# between the address and " - " where it has no symbol)
_EU_FRAME = re.compile(r"^#\d+\s+0x[0-9a-f]+\s+(?:(\S+)\s+)?-\s+(\S+)$")
# py-spy: '    wait_here (prog.py:12)' under 'Thread 4242 (idle)' (or '...: "MainThread"')
_SPY_FRAME = re.compile(r"^\s+(\S.*?) \((\S+?)(?::\d+)?\)$")
_SPY_THREAD = re.compile(r'^Thread (\S+) \([^)]*\)(?:: "(.*)")?')
_MPI_CALL = re.compile(r"^P?MPI_[A-Z][a-z_]*$")
_OFFSET = re.compile(r"\+0x[0-9a-f]+.*")  # a wchan's "+0x1a/0x40", where shown
_DENIED = re.compile(r"Operation not permitted|Permission denied|EPERM", re.I)


@dataclasses.dataclass
class Target:
    """A node of the job: its name and where to reach it."""

    name: str
    host: Host


@dataclasses.dataclass
class _Proc:
    pid: int
    ppid: int
    rank: int
    size: int | None
    report: RankReport


def _stat(text: str) -> tuple[str, int, int, int] | None:
    """``/proc/<pid>/stat`` -> (state letter, ppid, utime + stime ticks, rss pages)."""
    _, sep, rest = text.rpartition(")")  # the command name may hold spaces and parentheses
    fields = rest.split()
    if not sep or len(fields) < 22:
        return None
    return fields[0], int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21])


def gdb_frames(text: str) -> list[str]:
    """gdb's backtrace lines -> frames "function (at|from) place"."""
    frames = []
    for line in text.splitlines():
        m = _GDB_FRAME.match(line.strip())
        if m:
            frames.append(m[1] + (f" {m[2]} {m[3]}" if m[2] else ""))
    return frames[:MAX_FRAMES]


def eu_stack_frames(text: str) -> list[str]:
    """eu-stack's lines -> frames "function from module" (symbol versions dropped)."""
    frames = []
    for line in text.splitlines():
        m = _EU_FRAME.match(line.strip())
        if m:
            frames.append(f"{(m[1] or '??').split('@', 1)[0]} from {m[2]}")
    return frames[:MAX_FRAMES]


def spy_frames(text: str, pid: int) -> list[str]:
    """py-spy's dump -> the main thread's frames "function (file)", innermost first.  The
    main thread is the one named MainThread (`dump` names threads only when it can), else
    the one whose id is the pid, else the first."""
    threads: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        t = _SPY_THREAD.match(line)
        if t:
            threads.append((t[1], t[2] or "", []))
            continue
        m = _SPY_FRAME.match(line)
        if m and threads:
            threads[-1][2].append(f"{m[1]} ({m[2]})")
    main = next((t for t in threads if t[1] == "MainThread"), None)
    main = main or next((t for t in threads if t[0] in (str(pid), hex(pid))), None)
    main = main or (threads[0] if threads else None)
    return main[2][:MAX_FRAMES] if main else []


def normalise(source: StackSource, stack: Sequence[str]) -> list[str]:
    """The group key of a stack (see the module's docstring)."""
    native = source in (StackSource.GDB, StackSource.EU_STACK)
    names = [frame.split(" ", 1)[0] if native else frame for frame in stack]
    if source == StackSource.WCHAN:
        return ["wchan:" + _OFFSET.sub("", names[0])] if names else []
    calls = [i for i, name in enumerate(names) if _MPI_CALL.match(name)]
    if calls:  # outermost MPI call: the program's own call into the library
        names = names[calls[-1] :]
        names[0] = names[0].removeprefix("P")
    return names


def _tool_result(
    tool: str, rc: str, out: str, pid: int
) -> tuple[StackSource, list[str], str | None]:
    """(source, frames, error) from a tool's exit status and output."""
    if tool == "none":
        return StackSource.WCHAN, [], "none of mpi.roll_call_tools is installed on the node"
    if rc == str(TIMED_OUT) or rc == "137":
        return StackSource.WCHAN, [], f"{tool} did not finish within its bound"
    parse = {"py-spy": lambda: spy_frames(out, pid), "eu-stack": lambda: eu_stack_frames(out)}
    frames = parse.get(tool, lambda: gdb_frames(out))()
    if frames:
        return StackSource(tool), frames, None
    denied = _DENIED.search(out)
    lines = [line for line in out.splitlines() if line.strip()]
    why = next((line for line in lines if _DENIED.search(line)), lines[-1] if lines else "")
    what = "ptrace denied" if denied else f"no frames (exit {rc})"
    return StackSource.WCHAN, [], f"{tool}: {what}: {why.strip()[:200]}"


def parse_node(text: str, node: str) -> list[_Proc]:
    """One node's ROLL_CALL answer -> its rank processes."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("hz "):
        raise ValueError(f"unexpected roll-call answer {text[:200]!r}")
    hz, page = (int(w) for w in lines[0].split()[1:3])
    procs = []
    block: list[str] = []
    for line in lines[1:]:
        if line != "end":
            block.append(line)
            continue
        proc = _parse_block(block, node, hz, page)
        if proc is not None:
            procs.append(proc)
        block = []
    return procs


def _parse_block(block: list[str], node: str, hz: int, page: int) -> _Proc | None:
    head = {line.split(" ", 1)[0]: line.partition(" ")[2] for line in block if line[:1] != "|"}
    out = "\n".join(line[2:] for line in block if line[:1] == "|")
    words = head.get("proc", "").split()
    if not words:
        return None
    env = dict(w.partition("=")[::2] for w in words[1:])
    rank = next(int(env[v]) for v in RANK_VARS if v in env)
    size = next((int(env[v]) for v in SIZE_VARS if v in env), None)
    before, after = _stat(head.get("stat1", "")), _stat(head.get("stat2", ""))
    raw_wchan = head.get("wchan", "").strip()
    wchan = None if raw_wchan in ("", "0") else raw_wchan
    tool, _, rc = head.get("tool", "none -").partition(" ")
    frames: list[str]
    error: str | None
    if after is None:  # gone during the roll-call
        source, frames, error = StackSource.NONE, [], "the process exited during the roll-call"
    else:
        source, frames, error = _tool_result(tool, rc, out, int(words[0]))
        if source == StackSource.WCHAN:
            frames = [wchan] if wchan else []
    cpu_s = after[2] / hz if after else None
    percent = None
    if after and before:
        window = _window(head.get("up1", ""), head.get("up2", ""))
        percent = round(max(0, after[2] - before[2]) / hz / window * 100, 1)
    report = RankReport(
        rank=rank,
        node=node,
        pid=int(words[0]),
        state=ProcessState.from_letter(after[0]) if after else None,  # None: unknown letter
        cpu_s=cpu_s,
        cpu_percent=percent,
        rss_bytes=after[3] * page if after else None,
        wchan=wchan,
        stack_source=source,
        stack_error=error,
        stack=frames,
    )
    ppid = (after or before or ("", 0))[1]
    return _Proc(int(words[0]), int(ppid), rank, size, report)


def _window(up1: str, up2: str) -> float:
    """Seconds between a rank's two stat reads, from the node's /proc/uptime read beside
    each (10 ms resolution); the nominal SAMPLE_S if either is missing or unreadable."""
    try:
        took = float(up2.split()[0]) - float(up1.split()[0])
    except (ValueError, IndexError):
        return SAMPLE_S
    return took if took >= SAMPLE_S / 2 else SAMPLE_S


def _missing(rank: int, why: str) -> RankReport:
    return RankReport(
        rank=rank, node=None, pid=None, state=None, cpu_s=None, cpu_percent=None,
        rss_bytes=None, wchan=None, stack_source=StackSource.NONE, stack_error=why, stack=[],
    )  # fmt: skip


def ranks_of(
    procs: Sequence[_Proc], np: int | None, failed: Sequence[NodeProblem]
) -> list[RankReport]:
    """One report per rank, 0..size-1: the innermost process carrying each rank (a rank
    started through a wrapper that forks has two), and the ranks not found."""
    parents = {(p.rank, p.ppid) for p in procs}
    chosen: dict[int, RankReport] = {}
    for p in sorted(procs, key=lambda p: p.pid):
        if (p.rank, p.pid) not in parents:  # no process of the same rank below it
            chosen.setdefault(p.rank, p.report)
    size = max([np or 0, *(p.size or 0 for p in procs), *(r + 1 for r in chosen)])
    why = "no process of this rank found on the job's nodes"
    if failed:
        why += " (not read: " + ", ".join(f.node for f in failed) + ")"
    return [chosen.get(r) or _missing(r, why) for r in range(size)]


def verdict(ranks: Sequence[RankReport]) -> tuple[list[RankGroup], list[Suspect]]:
    """Groups of ranks by normalised stack (largest first), and the suspects: the ranks
    with a stack outside the one largest group (none if two groups tie for largest)."""
    by_key: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
    for r in ranks:
        key = tuple(normalise(r.stack_source, r.stack))
        if not key and r.stack_source == StackSource.WCHAN and r.state == ProcessState.RUNNING:
            key = (ON_CPU,)  # no stack, and no wchan while it runs: on a CPU is its place
        if key:
            by_key[key].append(r.rank)
    groups = sorted(
        (RankGroup(ranks=sorted(v), key=list(k)) for k, v in by_key.items()),
        key=lambda g: (-len(g.ranks), g.ranks[0]),
    )
    if len(groups) < 2 or len(groups[0].ranks) == len(groups[1].ranks):
        return groups, []
    odd = {r for g in groups[1:] for r in g.ranks}
    suspects = [
        Suspect(rank=r.rank, node=r.node, top_frame=r.stack[0] if r.stack else None)
        for r in ranks
        if r.rank in odd
    ]
    return groups, suspects


def take(
    remote: Remote,
    job_id: str,
    nodes: Sequence[Target],
    np: int | None,
    bound_s: float,
    tools: Sequence[str],
) -> RollCall:
    """The roll-call of `job_id` on `nodes` (all at once; each node's tools bounded by
    `bound_s`; `tools`: the stack tools to try, in order)."""
    started, t0 = time.time(), time.monotonic()

    def one(target: Target) -> list[_Proc] | NodeProblem:
        try:
            text = remote.roll_call(target.host, job_id, SAMPLE_S, bound_s, tools)
            return parse_node(text, target.name)
        except (SSHError, ValueError) as e:
            return NodeProblem(node=target.name, error=str(e))

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(nodes) or 1)) as ex:
        answers = list(ex.map(one, nodes))
    failed = [a for a in answers if isinstance(a, NodeProblem)]
    procs = [p for a in answers if not isinstance(a, NodeProblem) for p in a]
    ranks = ranks_of(procs, np, failed)
    groups, suspects = verdict(ranks)
    return RollCall(
        job_id=job_id,
        taken=iso(started) or "",
        took_s=round(time.monotonic() - t0, 3),
        sample_s=SAMPLE_S,
        ranks=ranks,
        groups=groups,
        suspects=suspects,
        nodes_failed=failed,
    )


T = TypeVar("T")


class Coalescer:
    """One call per key at a time: a caller arriving while one runs gets its result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, concurrent.futures.Future[object]] = {}

    def in_flight(self, key: str) -> bool:
        with self._lock:
            return key in self._running

    def run(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            future = self._running.get(key)
            owner = future is None
            if future is None:
                future = self._running[key] = concurrent.futures.Future()
        if not owner:
            return future.result()  # type: ignore[return-value]
        try:
            result = fn()
            future.set_result(result)
            return result
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._running[key]
