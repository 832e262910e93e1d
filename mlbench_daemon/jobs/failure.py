"""Failure attribution: why a job did not succeed, and where.

Pure functions, no I/O.  Input is what the daemon already has: the launcher's own
output (the tail of ``response``, never changed to make this easier), the job's host
list, slots and np (the ``command`` as run), the node names and each node's
``uname -n``, and the record's ``state``/``reason``/``exit_code``.  Output is one
dict, every part null when unknown::

    {"kind", "node", "host", "rank", "exit_code", "signal", "message", "hint"}

``node`` is the daemon's node name; ``host`` is the name the launcher printed.

Ranks are placed on nodes the way OpenMPI 4 does by default with ``--host``: the
launcher's own node (the master) first, then the other hosts in list order, each
filled up to its slots (``:N`` in the host list, 1 without).  This was checked
against real runs on the test cluster (slots=2 on 3 hosts, np=5, master in the
middle of the list: ranks 0,1 on the master, 2,3 on the first other host, 4 on the
next).  Launcher options that change the mapping (``--map-by``, a rankfile, ...)
make the map unknown: the rank is then reported without a node.

The OpenMPI 4 texts parsed here are the help messages of the v4.1 tree
(``help-orterun.txt``, ``help-errmgr-base.txt``, ``help-mpi-api.txt``,
``help-mpi-btl-tcp.txt``), as mpirun prints them.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mlbench_daemon.jobs import flavour as flavours
from mlbench_daemon.shapes import MPMD_SEPARATOR
from mlbench_daemon.vocabulary import FailureKind, JobReason

PARSE_TAIL_BYTES = 64 * 1024  # OpenMPI's verdicts come at the end of the output

K = FailureKind
# Every kind, with the fix an operator should try (README's troubleshooting table).
HINTS = {
    K.RANK_EXIT: "read that rank's output in the job log; the program itself failed",
    K.RANK_SIGNAL: (
        "the rank was killed (out of memory, a segfault, or killed from outside): "
        "check the node's kernel log (dmesg) and the program's memory use"
    ),
    K.DAEMON_LAUNCH: (
        "mpirun could not start its daemon on a node; see failure.checks or run "
        "`mlbench-daemon check`: host keys in the master's known_hosts, orted on "
        "the non-interactive PATH, the same MPI version everywhere"
    ),
    K.EXE_NOT_FOUND: (
        "install the program at the same path on every node, executable for the cluster user"
    ),
    K.LOST_CONTACT: (
        "a node's daemon died or the network to it failed during the job: "
        "check that node (dmesg, load, link) and firewalls between nodes"
    ),
    K.TCP_CONNECT: (
        "ranks could not connect to each other: open TCP between all nodes "
        "(firewalls), or restrict MPI to a shared interface (--mca btl_tcp_if_include)"
    ),
    K.NOT_ENOUGH_SLOTS: "lower np, give nodes a `slots` label, or add nodes",
    K.TIMEOUT: (
        "the job ran past its timeout_s: raise timeout_s, or look for a hang (OpenMPI 4 "
        "hangs when a firewall drops TCP between nodes: run `mlbench-daemon check`)"
    ),
    K.CANCELLED: "the job was cancelled (DELETE /api/mpi_jobs/<id>)",
    K.MASTER_LOST: (
        "the master stayed unreachable (mpi.lost_after_s); the job may still run there: "
        "check the master host"
    ),
    K.NO_MASTER: "no chosen node could run mpirun: install MPI at mpi.mpirun on the master",
    K.LAUNCH_FAILED: "the daemon could not start the job on the master: see error and the master",
    K.JOB_LOST: "the job's record on the master is gone or incomplete; submit it again",
    K.UNKNOWN: "read the job log (response); the launcher gave no known cause",
}
KINDS = tuple(FailureKind)

# today's `reason` values -> kind
R = JobReason
REASON_KINDS = {
    R.TIMEOUT: K.TIMEOUT,
    R.CANCELLED: K.CANCELLED,
    R.MASTER_UNREACHABLE: K.MASTER_LOST,
    R.NO_USABLE_MASTER: K.NO_MASTER,
    R.LAUNCH_FAILED: K.LAUNCH_FAILED,
    R.LAUNCH_INTERRUPTED: K.JOB_LOST,
    R.REMOTE_RECORD_MISSING: K.JOB_LOST,
    R.NO_EXIT_STATUS: K.JOB_LOST,
    R.DAEMON_RESTARTED: K.JOB_LOST,
    R.DAEMON_ERROR: K.JOB_LOST,
}

# Options of mpirun that change where ranks go: with any of them the map is unknown.
MAPPING_OPTIONS = {
    "--map-by",
    "-map-by",
    "--rankfile",
    "-rf",
    "--npernode",
    "-npernode",
    "--npersocket",
    "-npersocket",
    "--ppr",
    "-ppr",
    "--bynode",
    "-bynode",
    "--byslot",
    "-byslot",
    "--rank-by",
    "-rank-by",
    "--oversubscribe",
    "-oversubscribe",
    "--hostfile",
    "-hostfile",
    "--machinefile",
    "-machinefile",
}


# Options of mpirun that take one value (so the value is not read as the program): the
# `<arg0>` options of OpenMPI 4's `mpirun --help all` that neither map ranks nor are read
# above, and OpenMPI 5's `--output` (`--output tag`: a job with rank_output, flavour.py).
_VALUED = (
    "am app cf cartofile cpu-list cpu-set cpus-per-proc cpus-per-rank debugger "
    "default-hostfile hnp launch-agent max-restarts max-vm-size ompi-server "
    "output-filename path personality preload-files report-events report-pid report-uri "
    "stdin timeout tune wd wdir xml-file xterm bind-to output prefix"
    " launcher prepend-pattern genvlist"  # Hydra's (flavour.py's mpich launches)
).split()
VALUE_OPTIONS = {"-x"} | {f"-{o}" for o in _VALUED} | {f"--{o}" for o in _VALUED}


@dataclass(frozen=True)
class NodeRef:
    """What attribution knows of one node of the job."""

    name: str
    ip: str
    hostname: str | None = None  # `uname -n`, recorded at connect


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """`--host` value -> [(host, slots)]; `a:2,b` -> [("a", 2), ("b", 1)]."""
    out = []
    for item in spec.split(","):
        if not item:
            continue
        host, sep, slots = item.rpartition(":")
        if sep and slots.isdigit() and host and "]" not in slots:
            out.append((host, int(slots)))
        else:
            out.append((item, 1))
    return out


def rank_hosts(
    hosts: Sequence[tuple[str, int]], np: int | None, master: str | None
) -> list[str] | None:
    """OpenMPI 4's default placement -> the host of each rank (index = rank).

    `hosts` as parsed from `--host`, `master` the host entry mpirun runs on (its
    own node is filled first).  None when np is over the slots (mpirun refuses,
    or oversubscribes in an order not modelled here)."""
    order = [h for h in hosts if h[0] == master] + [h for h in hosts if h[0] != master]
    total = sum(s for _, s in order)
    n = total if np is None else np
    if n > total or n < 0:
        return None
    ranks: list[str] = []
    for host, slots in order:
        ranks += [host] * min(slots, n - len(ranks))
    return ranks


def rank_map(command: Sequence[str], master_ip: str | None) -> list[str] | None:
    """The host (as in `--host`) of each rank of a job's argv, or None if unknown.

    Only the launcher's part of the argv is read: it ends at the first word that is
    not an option or an option's value (the program).  An MPMD launch (app contexts
    joined by ":") numbers its ranks context by context: a context's own `--host`
    (OpenMPI) places its ranks, else Hydra's global `-hosts` list is filled in order."""
    argv = list(command)
    first = _launch_options(argv, 1)
    if first is None:
        return None
    spec, np, end = first
    if MPMD_SEPARATOR not in argv[end:]:
        return rank_hosts(parse_hosts(spec), np, master_ip) if spec is not None else None
    ranks: list[str] = []
    shared = parse_hosts(spec) if spec is not None and argv[1:end].count("-hosts") else None
    start = 1
    while start < len(argv):
        got = _launch_options(argv, start)
        if got is None:
            return None
        own, n, end = got
        if n is None:
            return None
        if own is not None and (shared is None or start > 1):  # the context's own hosts
            placed = rank_hosts(parse_hosts(own), n, None)
        elif shared is not None:  # the global list, one slot after another
            slots = [h for h, k in shared for _ in range(k)]
            placed = slots[len(ranks) : len(ranks) + n]
            placed = placed if len(placed) == n else None
        else:
            return None
        if placed is None:
            return None
        ranks += placed
        nxt = argv.index(MPMD_SEPARATOR, end) + 1 if MPMD_SEPARATOR in argv[end:] else len(argv)
        start = nxt
    return ranks


def _launch_options(argv: list[str], i: int) -> tuple[str | None, int | None, int] | None:
    """From argv[i]: (the host option's value, -np's, where the program starts), or None
    for a mapping option we do not model."""
    spec, np = None, None
    while i < len(argv):
        a = argv[i]
        if a in MAPPING_OPTIONS or (
            a in ("--mca", "-mca") and i + 1 < len(argv) and argv[i + 1].startswith("rmaps")
        ):
            return None
        if a in ("--host", "-host", "-H", "-hosts") and i + 1 < len(argv):
            spec, i = argv[i + 1], i + 2
        elif a in ("-np", "--np", "-n", "-c") and i + 1 < len(argv):
            if not argv[i + 1].isdigit():
                return None
            np, i = int(argv[i + 1]), i + 2
        elif a in ("--mca", "-mca", "--gmca", "-gmca"):
            i += 3
        elif a in VALUE_OPTIONS:
            i += 2
        elif a.startswith("-"):
            i += 1  # a flag we do not model; an unknown option with a value would shift us
        else:
            break
    return spec, np, i


def node_for_host(host: str | None, nodes: Iterable[NodeRef], master: str | None) -> str | None:
    """The daemon's node name for a host name the launcher printed, or None.

    OpenMPI prints a remote node as it was given in `--host` (our IPs) and its own
    node by its host name; so an IP or node name matches directly, then the master's
    `uname -n`, then any one node's `uname -n` (short names compared too)."""
    if not host:
        return None
    nodes = list(nodes)
    for n in nodes:
        if host in (n.ip, n.name):
            return n.name

    def same(a: str | None) -> bool:
        return a is not None and (a == host or a.split(".")[0] == host.split(".")[0])

    for n in nodes:
        if n.name == master and same(n.hostname):
            return n.name
    hits = [n.name for n in nodes if same(n.hostname)]
    return hits[0] if len(hits) == 1 else None


# --- OpenMPI 4 texts ------------------------------------------------------------------

_SIGNAL = re.compile(
    r"noticed that process rank (\d+) with PID (\d+) on node (\S+) exited on signal (\d+)"
    r"(?: \(([^)]*)\))?"
)
_NONZERO = re.compile(
    r"The first process to do so was:\s+Process name:\s+\[\[\d+,\d+\],(\d+)\]\s+"
    r"Exit code:\s+(-?\d+)"
)
_NO_SYNC = re.compile(
    r"has exited due to process rank (\d+) with PID (\d+) on\s+node (\S+) exiting improperly"
)
_ABORT = re.compile(
    r"MPI_ABORT was invoked on rank (\d+) in communicator (\S+)\s+with errorcode (-?\d+)"
)
_EXE = re.compile(
    r"(?:unable to launch the specified application as it could not access\s+or execute an "
    r"executable:\s+Executable: (?P<exe1>.*?)\n\s*Node: (?P<node1>\S+)"
    r"(?:\s+while attempting to start process rank (?P<rank1>\d+))?)"
    r"|(?:unable to find the specified executable file.*?first reported for process\s+"
    r"rank (?P<rank2>\d+).*?Node:\s+(?P<node2>\S+)\s+Executable:\s+(?P<exe2>.*?)\n)",
    re.S,
)
_NODE_DIED = re.compile(
    r"ORTE has lost communication with a remote daemon\.\s+HNP daemon\s*: \S+ on node (\S+)\s+"
    r"Remote daemon: \S+ on node (\S+)"
)
_TCP = re.compile(
    r"failed to TCP connect to a peer MPI\s+process.*?Local host: (\S+).*?"
    r"Message:\s+connect\(\) to (\S+?)(?::\d+)? failed",
    re.S,
)
_DAEMON_LAUNCH = re.compile(
    r"ORTE was unable to reliably start one or more daemons"
    r"|An ORTE daemon has unexpectedly failed after launch"
)
_SLOTS = re.compile(r"There are not enough slots available in the system to satisfy the (\d+)")
_SSH_HOST = re.compile(
    r"(?:host key is known for|Host key for|ssh: connect to host|Could not resolve hostname) "
    r"\[?([^\s\]:]+)"
)


def parse_openmpi4(text: str) -> dict[str, Any] | None:
    """The first known verdict in OpenMPI 4 output -> facts, or None.

    Keys: kind, and any of rank, host, exit_code, signal, detail, peer."""
    m = _SIGNAL.search(text)
    if m:
        return {
            "kind": "rank-signal",
            "rank": int(m[1]),
            "host": m[3],
            "signal": int(m[4]),
            "detail": m[5],
        }
    m = _NONZERO.search(text)
    if m:
        return {"kind": "rank-exit", "rank": int(m[1]), "exit_code": int(m[2])}
    m = _ABORT.search(text)
    if m:
        return {"kind": "rank-exit", "rank": int(m[1]), "exit_code": int(m[3]), "detail": "abort"}
    m = _NO_SYNC.search(text)
    if m:
        return {"kind": "rank-exit", "rank": int(m[1]), "host": m[3], "detail": "no-finalize"}
    m = _EXE.search(text)
    if m:
        rank = m["rank1"] or m["rank2"]
        return {
            "kind": "exe-not-found",
            "host": m["node1"] or m["node2"],
            "rank": int(rank) if rank else None,
            "detail": (m["exe1"] or m["exe2"] or "").strip(),
        }
    m = _NODE_DIED.search(text)
    if m:
        return {"kind": "lost-contact", "host": m[2], "peer": m[1]}
    m = _TCP.search(text)
    if m:
        return {"kind": "tcp-connect", "host": m[1], "peer": m[2]}
    m = _SLOTS.search(text)
    if m:
        return {"kind": "not-enough-slots", "detail": m[1]}
    if _DAEMON_LAUNCH.search(text):
        m = _SSH_HOST.search(text)
        return {"kind": "daemon-launch", "ssh_host": m[1] if m else None}
    return None


def _signame(num: int | None, detail: str | None) -> str:
    try:
        return signal.Signals(num).name if num else (detail or "")
    except ValueError:
        return detail or str(num)


def empty(kind: str, message: str | None = None) -> dict[str, Any]:
    return {
        "kind": kind,
        "node": None,
        "host": None,
        "rank": None,
        "exit_code": None,
        "signal": None,
        "message": message,
        "hint": HINTS[FailureKind(kind)],
    }


def attribute(
    *,
    state: str,
    reason: str | None,
    exit_code: int | None,
    output: str,
    command: Sequence[str],
    master: str | None,
    master_ip: str | None,
    nodes: Sequence[NodeRef],
    error: str | None = None,
    flavour: str = "openmpi4",
) -> dict[str, Any] | None:
    """The `failure` of a job that did not succeed (None for a succeeded job).

    `flavour`: the launcher the job ran with; OpenMPI 4's texts are parsed here, the
    others' (OpenMPI 5, Hydra) by flavour.explain with their own rank placement."""
    if state == "succeeded":
        return None
    output = flavours.untag(flavour, output)  # a rank_output job's lines are tagged
    if reason in REASON_KINDS:
        f = empty(REASON_KINDS[JobReason(reason)], error or reason)
        f["exit_code"] = exit_code
        if f["kind"] in ("timeout", "cancelled"):
            f["message"] = (
                "the job ran past its timeout_s and was stopped"
                if reason == "timeout"
                else "the job was cancelled"
            )
        return f
    if flavour == "openmpi4":
        facts = parse_openmpi4(output)
        if facts is None and exit_code and 0 < exit_code < 128:
            # mpirun names the rank only when others still ran, and under load prints
            # neither notice at times: its status is then the rank's own code, and a
            # job of one rank still has its rank (as flavour.explain does for the others)
            ranks = rank_map(command, master_ip)
            facts = {"kind": "rank-exit", "exit_code": exit_code}
            if ranks and len(ranks) == 1:
                facts["rank"] = 0
    else:
        facts = flavours.explain(flavour, output, command, master_ip, exit_code)
    openmpi = flavour != "mpich"  # Hydra's status is the OR of the ranks' codes
    if facts is None and openmpi and exit_code is not None and 128 < exit_code < 128 + 65:
        # mpirun passes on a killed rank's status as 128 + signal, and sometimes
        # exits before printing which rank it was
        facts = {"kind": "rank-signal", "signal": exit_code - 128, "detail": "unnamed"}
    facts = facts or {}
    kind = facts.get("kind", "unknown")
    f = empty(kind)
    f["exit_code"] = facts.get("exit_code", exit_code if kind != "rank-signal" else None)
    f["signal"] = facts.get("signal")
    f["rank"] = facts.get("rank")
    f["host"] = facts.get("host")
    names = {n.ip: n.name for n in nodes}
    if f["host"]:
        f["node"] = node_for_host(f["host"], nodes, master)
    elif f["rank"] is not None and flavour == "openmpi4":
        ranks = rank_map(command, master_ip)
        if ranks and f["rank"] < len(ranks):
            f["host"] = ranks[f["rank"]]
            f["node"] = names.get(f["host"])
    elif kind == "daemon-launch" and facts.get("ssh_host"):
        f["host"] = facts["ssh_host"]
        f["node"] = node_for_host(f["host"], nodes, master)
    where = f" on {f['node']}" if f["node"] else (f" on {f['host']}" if f["host"] else "")
    if f["host"] and f["node"] and f["host"] != f["node"]:
        where = f" on {f['node']} ({f['host']})"
    rank = f"rank {f['rank']}" if f["rank"] is not None else "a rank"
    if kind == "rank-exit":
        if facts.get("detail") == "no-finalize":
            f["message"] = f"{rank}{where} exited without calling MPI_Finalize"
        elif facts.get("detail") == "abort":
            f["message"] = f"{rank}{where} called MPI_Abort with error code {f['exit_code']}"
        else:
            f["message"] = f"{rank}{where} exited with code {f['exit_code']}"
            if not where and flavour == "mpich":
                f["message"] += " (Hydra names the host only with -print-all-exitcodes in mpi.args)"
            elif not where and f["rank"] is None:
                f["message"] += " (mpirun names a failing rank only while other ranks run)"
    elif kind == "rank-signal":
        f["message"] = (
            f"{rank}{where} was killed by signal {f['signal']} "
            f"({_signame(f['signal'], facts.get('detail'))})"
        )
    elif kind == "exe-not-found":
        f["message"] = f"the program {facts.get('detail')!r} could not be run{where}"
    elif kind == "lost-contact":
        f["message"] = f"mpirun lost contact with its daemon{where}"
    elif kind == "tcp-connect":
        peer = facts.get("peer")
        name = node_for_host(peer, nodes, master)
        f["message"] = f"a rank{where} could not open a TCP connection to " + (
            f"{name} ({peer})" if name else str(peer)
        )
    elif kind == "not-enough-slots":
        f["message"] = f"np={facts.get('detail')} is more than the slots of the host list"
    elif kind == "daemon-launch":
        f["message"] = "mpirun could not start its daemon on one or more nodes" + (
            f" (ssh to {f['host']} failed)" if f["host"] else "; the launcher names no host"
        )
    else:
        f["message"] = (
            f"mpirun exited with code {exit_code}" if exit_code is not None else (error or state)
        )
    return f
