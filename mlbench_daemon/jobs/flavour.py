"""MPI launcher flavours: OpenMPI 4 (ORTE), OpenMPI 5 (PRRTE) and MPICH's Hydra.

Everything that differs between the launchers lives here, as data and pure
functions (no I/O); docs/MPI-FLAVOURS.md has the measurements behind each line:

- which one a master has, from ``<launcher> --version`` (``detect``);
- the argv: host list with slots, process count, env names (``Flavour.argv``);
- the job marker, env variables set to the job id in the launcher's environment
  that reach every process of the job (``Flavour.marker_env``).  OpenMPI 4 hands
  ``OMPI_MCA_*`` to its ranks and puts them on every orted's command line; OpenMPI 5
  hands ``OMPI_MCA_*`` to ranks but only ``PRTE_MCA_*`` to the prted command lines,
  so it gets both; Hydra gives its ranks the whole environment, and its remote
  ``hydra_pmi_proxy`` processes nothing: the cancel sweep finds those by the
  ``--control-port`` of the job's mpiexec (``Flavour.proxy_option``);
- the rank -> host map of the launcher's default placement (``rank_hosts``);
- the line tag of a job with ``rank_output`` (``Flavour.tag_option``, ``Flavour.tag``):
  the launcher prefixes every piece of a rank's output with the rank, and the head
  splits the one stream by it (ranklog.py).  OpenMPI 4 ``--tag-output`` gives
  ``[1,R]<stdout>:``, OpenMPI 5 (PRRTE) ``--output tag`` gives ``[1,R]<stdout>: `` (its
  ``--tag-output`` is the deprecated alias).  None of the three keeps a rank's partial
  line whole: a write without a newline is tagged as it comes, and the next rank's tag
  follows it on the same line (measured on each), so a tag is read anywhere in a line.
  Hydra's ``-prepend-rank`` writes ``[R] ``, which a program prints as often (``epoch
  [3] loss``); so Hydra gets ``-prepend-pattern`` with a tag of its own, ``[R]<rank>: ``;
- the launcher's own failure texts (``parse_failure``) -> facts::

      {"kind", "rank", "host", "exit_code", "signal", "detail"}   (keys as known)

  with ``host`` as the launcher printed it (an address from the host list or a
  host name).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlbench_daemon.shapes import JOB_MARKER, MPMD_SEPARATOR
from mlbench_daemon.vocabulary import FlavourName

NAMES = tuple(FlavourName)
MARKER = JOB_MARKER  # every marker variable's name ends with it (the sweep looks for it)


@dataclass(frozen=True)
class Flavour:
    name: str
    daemon: str  # the launcher's process on the other hosts
    host_option: str
    np_option: str
    env_option: str | None  # forwards one named variable; None: the whole environment goes
    fixed: tuple[str, ...]  # options the daemon always gives, before mpi.args
    markers: tuple[str, ...]  # variables set to the job id
    launcher_first: bool  # default placement fills the launcher's own host first
    proxy_option: str | None = None  # remote proxies carry no marker: found by this option
    app_hosts: bool = True  # an MPMD app context takes its own host option (Hydra's is global)
    tag_option: tuple[str, ...] = ()  # makes the launcher tag each piece of output with its rank
    tag: re.Pattern[bytes] = re.compile(b"(?!)")  # one tag as printed; group "rank"

    def argv(
        self,
        launcher: str,
        args: Sequence[str],
        hosts: Sequence[str],
        np: int | None,
        env_names: Sequence[str],
        program: Sequence[str],
        rank_output: bool = False,
    ) -> list[str]:
        """The launcher's argv; `hosts` are "address" or "address:slots" items;
        `rank_output`: with the tag option (right after the fixed options)."""
        argv = [launcher, *self.fixed, *(self.tag_option if rank_output else ()), *args]
        if self.env_option:
            for name in env_names:
                argv += [self.env_option, name]
        argv += [self.host_option, ",".join(hosts)]
        if np:
            argv += [self.np_option, str(np)]
        return argv + list(program)

    def mpmd_argv(
        self,
        launcher: str,
        args: Sequence[str],
        apps: Sequence[tuple[str, Sequence[str]]],
        env_names: Sequence[str],
    ) -> list[str]:
        """One launch of one process per (host, argv) of `apps`, rank i on host i: app
        contexts joined by ":".  OpenMPI 4 and 5 take a host option in each context (and
        its env options, which are per context in ORTE); Hydra's host list is global and
        fills each host's one slot in order, so context i lands on host i."""
        argv = [launcher, *self.fixed, *args]
        env: list[str] = []
        if self.env_option:
            for name in env_names:
                env += [self.env_option, name]
        if not self.app_hosts:
            argv += [self.host_option, ",".join(host for host, _ in apps)]
        for i, (host, program) in enumerate(apps):
            if i:
                argv.append(MPMD_SEPARATOR)
            if self.app_hosts:
                argv += [*env, self.host_option, host]
            argv += [self.np_option, "1", *program]
        return argv

    def marker_env(self, job_id: str) -> dict[str, str]:
        return {name: job_id for name in self.markers}


FLAVOURS = {
    f.name: f
    for f in (
        Flavour(
            "openmpi4",
            daemon="orted",
            host_option="--host",
            np_option="-np",
            env_option="-x",
            fixed=(),
            markers=("OMPI_MCA_mlbench_job_id",),
            launcher_first=True,
            tag_option=("--tag-output",),
            tag=re.compile(rb"\[\d{1,10},(?P<rank>\d{1,9})\]<std(?:out|err|diag)>:"),
        ),
        Flavour(
            "openmpi5",
            daemon="prted",
            host_option="--host",
            np_option="-np",
            env_option="-x",
            fixed=(),
            markers=("OMPI_MCA_mlbench_job_id", "PRTE_MCA_mlbench_job_id"),
            launcher_first=False,
            tag_option=("--output", "tag"),
            tag=re.compile(rb"\[\d{1,10},(?P<rank>\d{1,9})\]<std(?:out|err|diag)>: "),
        ),
        Flavour(
            "mpich",
            daemon="hydra_pmi_proxy",
            host_option="-hosts",
            np_option="-n",
            env_option=None,
            # ssh whatever the environment says.  Not -print-all-exitcodes, although its
            # "Exit codes:" lines are the only place Hydra names the host of a rank that
            # exited non-zero: it adds lines to every job's output (`response` is the
            # launcher's own output, never changed for attribution).  An operator may add
            # it to mpi.args; explain() then reads it.
            fixed=("-launcher", "ssh"),
            markers=("MLBENCH_JOB_ID",),
            launcher_first=False,
            proxy_option="--control-port",
            app_hosts=False,
            tag_option=("-prepend-pattern", "[%r]<rank>: "),
            tag=re.compile(rb"\[(?P<rank>\d{1,9})\]<rank>: "),
        ),
    )
}


TAG_MAX = 64  # no tag is longer (ranklog.py looks this far ahead before deciding)


def get(name: str) -> Flavour:
    return FLAVOURS[name]


def untag(name: str, text: str) -> str:
    """`text` without the flavour's rank tags: the output as the launcher prints it
    untagged (a failure text that a rank prints spans lines, each line tagged).  The
    tags are distinct enough to remove from any job's output, tag option or not."""
    tag = re.compile(FLAVOURS[name].tag.pattern.decode())
    return tag.sub("", text)


def rank_count(name: str, command: Sequence[str]) -> int | None:
    """How many ranks a job's argv starts: its np, else the slots of its host list;
    None if the argv says neither."""
    f = FLAVOURS[name]
    if MPMD_SEPARATOR in command:  # an MPMD launch (a run's): one process per app context
        return len(mpmd_hosts(name, command))
    np = _option_value(command, f.np_option)
    if np is not None:
        return int(np) if np.isdigit() else None
    items = _option_value(command, f.host_option)
    return sum(slots for _, slots in parse_hosts(items.split(","))) if items else None


# --- which launcher ---------------------------------------------------------------------

_OPEN_MPI = re.compile(r"\(Open MPI\) (\d+)\.(\d+)\S*")
_INTEL = re.compile(r"Intel\(R\) MPI Library[^\n]*?Version (\S+)")
_HYDRA = re.compile(r"HYDRA build details:\s*Version:\s*(\S+)")


def detect(text: str) -> tuple[str, str]:
    """``<launcher> --version`` output -> (flavour, version); ValueError if unknown.

    Intel MPI launches through Hydra, like MPICH (its cluster use is untested here)."""
    m = _OPEN_MPI.search(text)
    if m:
        return ("openmpi5" if int(m[1]) >= 5 else "openmpi4"), f"Open MPI {m[0].split()[-1]}"
    m = _INTEL.search(text)
    if m:
        return "mpich", f"Intel MPI {m[1]}"
    m = _HYDRA.search(text)
    if m:
        return "mpich", f"MPICH {m[1]}"
    first = text.strip().splitlines()[0][:200] if text.strip() else "(no output)"
    raise ValueError(f"not OpenMPI 4 or 5 nor MPICH (Hydra): {first!r}")


# --- where ranks go ---------------------------------------------------------------------


def parse_hosts(items: Sequence[str]) -> list[tuple[str, int]]:
    """["a:2", "b"] -> [("a", 2), ("b", 1)]."""
    out = []
    for item in items:
        host, sep, slots = item.rpartition(":")
        out.append((host, int(slots)) if sep and slots.isdigit() else (item, 1))
    return out


def rank_hosts(
    flavour: str, hosts: Sequence[tuple[str, int]], np: int | None, launcher_host: str | None
) -> list[str] | None:
    """The host of each rank (index = rank) under the launcher's default placement,
    or None when np is over the slots (refused, or oversubscribed in an order not
    modelled).  OpenMPI 4 fills its own host first; OpenMPI 5 and Hydra go in list
    order, each host up to its slots (measured: docs/MPI-FLAVOURS.md)."""
    order = list(hosts)
    if FLAVOURS[flavour].launcher_first:
        order = [h for h in hosts if h[0] == launcher_host] + [
            h for h in hosts if h[0] != launcher_host
        ]
    total = sum(s for _, s in order)
    n = total if np is None else np
    if not 0 <= n <= total:
        return None
    ranks: list[str] = []
    for host, slots in order:
        ranks += [host] * min(slots, n - len(ranks))
    return ranks


# --- what went wrong: each launcher's own texts -----------------------------------------

_SSH_HOST = re.compile(
    r"(?:ssh: connect to host|Could not resolve hostname|Host key verification failed"
    r"|host key is known for|Host key for) \[?([^\s\]:]+)"
)

# OpenMPI 4 (help texts of the v4.1 tree) and 5 (PRRTE's): the same shapes, other words
_OMPI_SIGNAL = re.compile(
    r"noticed that process rank (\d+) with PID (\d+) on node (\S+) exited on\s+signal (\d+)"
    r"(?: \(([^)]*)\))?"
)
_OMPI_NONZERO = re.compile(
    r"The first process to do so was:\s+Process name:\s+\[(?:\[\d+,\d+\]|\S+@\d+),(\d+)\]\s+"
    r"Exit code:\s+(-?\d+)"
)
_OMPI_EXE = re.compile(
    r"unable to launch the specified application as it could not\s+access\s+(?:or execute\s+)?an"
    r"\s+executable:\s+Executable: (.*?)\n\s*Node: (\S+)"
    r"(?:\s+while attempting to start process rank (\d+))?",
    re.S,
)
_OMPI_DAEMON = re.compile(
    r"ORTE was unable to reliably start one or more daemons"
    r"|A daemon failed to report back after being spawned"
)
_PRTE_REMOTE = re.compile(r"A daemon failed to report back.*?Remote host:\s+(\S+)", re.S)
_OMPI_SLOTS = re.compile(r"There are not enough slots available in the system to satisfy the (\d+)")

# Hydra
_HYDRA_CODES = re.compile(r"Exit codes: ((?:\[[^\]\n]+\] [-\d,]+\s*)+)")
_HYDRA_CODE = re.compile(r"\[([^\]\n]+)\] ([-\d,]+)")
_HYDRA_BAD = re.compile(
    r"BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\s*\n=\s+(?:RANK (\d+) )?"
    r"PID (\d+) RUNNING AT (\S+)\s*\n=\s+(?:EXIT CODE|KILLED BY SIGNAL): (\d+)"
)
_HYDRA_EXE = re.compile(r"\[proxy:[\d:]+@([^\]]+)\] [^\n]*execvp error on file (.*?) \(")
_HYDRA_LAUNCH = re.compile(r"Launch proxy failed|Unable to run bstrap_proxy")


def parse_failure(flavour: str, text: str) -> dict[str, Any] | None:
    """The first known verdict in the launcher's output -> facts, or None."""
    return _parse_hydra(text) if flavour == "mpich" else _parse_openmpi(text)


def _parse_openmpi(text: str) -> dict[str, Any] | None:
    m = _OMPI_SIGNAL.search(text)
    if m:
        return {"kind": "rank-signal", "rank": int(m[1]), "host": m[3], "signal": int(m[4])}
    m = _OMPI_NONZERO.search(text)
    if m:
        return {"kind": "rank-exit", "rank": int(m[1]), "exit_code": int(m[2])}
    m = _OMPI_EXE.search(text)
    if m:
        rank = int(m[3]) if m[3] else None
        return {"kind": "exe-not-found", "host": m[2], "rank": rank, "detail": m[1].strip()}
    m = _OMPI_SLOTS.search(text)
    if m:
        return {"kind": "not-enough-slots", "detail": m[1]}
    if _OMPI_DAEMON.search(text):
        m = _PRTE_REMOTE.search(text) or _SSH_HOST.search(text)
        return {"kind": "daemon-launch", "host": m[1] if m else None}
    return None


def _parse_hydra(text: str) -> dict[str, Any] | None:
    m = _HYDRA_BAD.search(text)
    if m:
        return {
            "kind": "rank-signal",
            "rank": int(m[1]) if m[1] else None,
            "host": m[3],
            "signal": int(m[4]),
        }
    m = _HYDRA_EXE.search(text)
    if m:
        return {"kind": "exe-not-found", "host": m[1], "detail": m[2]}
    m = _HYDRA_CODES.search(text)
    if m:
        for host, codes in _HYDRA_CODE.findall(m[1]):
            for i, code in enumerate(int(c) for c in codes.split(",") if c):
                if code & 0x7F:  # wait() status: killed by a signal
                    return {"kind": "rank-signal", "host": host, "signal": code & 0x7F, "nth": i}
                if code:
                    return {"kind": "rank-exit", "host": host, "exit_code": code >> 8, "nth": i}
    if _HYDRA_LAUNCH.search(text):
        m = _SSH_HOST.search(text)
        return {"kind": "daemon-launch", "host": m[1] if m else None}
    return None


def explain(
    flavour: str,
    text: str,
    command: Sequence[str],
    launcher_host: str | None,
    exit_code: int | None = None,
) -> dict[str, Any] | None:
    """Facts (kind, rank, host as the launcher printed it, ...), or None when nothing
    is known; failure.attribute finds the node and words the message.

    `command` is the argv as run, `exit_code` the launcher's.  OpenMPI prints which
    rank exited non-zero only when the others still ran (its notice depends on
    timing); without it, an exit code below 128 is a rank's own code, and a job of one
    rank (or one host) still names it.  Hydra names the host of a non-zero exit only
    with -print-all-exitcodes in mpi.args."""
    facts = parse_failure(flavour, text)
    if facts is None and exit_code is not None and 0 < exit_code < 128:
        # Hydra's own status is the OR of the ranks' codes: one failing rank's code
        facts = {"kind": "rank-exit", "exit_code": exit_code}
    if facts is None:
        return None
    f = FLAVOURS[flavour]
    items = _option_value(command, f.host_option)
    np = _option_value(command, f.np_option)
    hosts = parse_hosts(items.split(",")) if items else []
    ranks = rank_hosts(flavour, hosts, int(np) if np and np.isdigit() else None, launcher_host)
    if MPMD_SEPARATOR in command:
        ranks = mpmd_hosts(flavour, command)
    if ranks and len(ranks) == 1 and facts.get("rank") is None and facts.get("host") is None:
        facts["rank"] = 0
    if ranks and len(set(ranks)) == 1 and facts.get("host") is None:
        facts["host"] = ranks[0]
    if facts.get("host") is None and facts.get("rank") is not None and ranks:
        if facts["rank"] < len(ranks):
            facts["host"] = ranks[facts["rank"]]
    if facts.get("rank") is None and "nth" in facts and ranks and facts.get("host") in ranks:
        facts["rank"] = ranks.index(facts["host"]) + facts["nth"]
    facts.pop("nth", None)
    return facts


def mpmd_hosts(flavour: str, command: Sequence[str]) -> list[str]:
    """The host of each rank of an MPMD argv made by ``Flavour.mpmd_argv`` (one process
    per app context)."""
    f = FLAVOURS[flavour]
    if not f.app_hosts:
        items = _option_value(command, f.host_option)
        return [h for h, _ in parse_hosts(items.split(","))] if items else []
    return [command[i + 1] for i, a in enumerate(command[:-1]) if a == f.host_option]


def _option_value(argv: Sequence[str], option: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == option:
            return argv[i + 1]
    return None
