"""Preflight: launch-readiness checks run from the master, as the launcher will.

The daemon logs in to the master over its pool (as for a job) and runs two remote
scripts there at once, both bounded by one deadline:

- ``MASTER``: runs ``NODE`` on the master itself and, in parallel, on every other
  node over the master's own ``ssh`` (as the cluster user, ``BatchMode=yes``,
  ``StrictHostKeyChecking=yes``, to the node's IP: what mpirun's ``--host`` gives
  its ssh).  ssh failing (exit 255) is the node's ``master-ssh`` check; otherwise
  ``NODE`` reports ``launcher-daemon`` (mpirun on the master, ``orted`` on workers,
  found the way OpenMPI 4 looks for it: under the absolute mpirun's prefix, else on
  the non-interactive PATH; ``ldd`` finds all its libraries), the MPI version of that
  installation, ``program`` (exists and is executable for the cluster user) and
  ``dirs`` (TMPDIR, where OpenMPI puts its session directory, and on the master the
  job directory, are writable: a temp file is made and removed);
- ``TCP``: where the master has python3, it listens on a free port, starts a
  listener on every other node over ssh the same way (python3 there too), hands
  each node the ports of all the others, and each node connects to the master and
  to every other node.  Without python3 the check says so (``not-checked``).

``slots`` (np against the slots of the host list) needs no remote work.

Every remote command is an argv the pool quotes; the command the master's ssh sends
to a worker is built here with ``shlex.join``, so the worker's shell sees the same
words.  Request data reaches the scripts only as positional parameters.  Nothing is
left behind: the temp dir is removed by a trap, listeners exit on EOF or an alarm,
and every ssh on the master runs under ``timeout`` (coreutils; without it, ssh's own
ConnectTimeout and the scripts' alarms are the bounds).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import threading
import time
from collections.abc import Sequence
from typing import Any

from mlbench_daemon import shapes
from mlbench_daemon.config import Config
from mlbench_daemon.discovery import Node, natural_key
from mlbench_daemon.errors import BadRequest, QueueFull
from mlbench_daemon.jobs import flavour as flavours
from mlbench_daemon.jobs.placement import Registry, choose, mpirun_argv, node_row
from mlbench_daemon.jobs.remote import Pool
from mlbench_daemon.jobs.request import validate
from mlbench_daemon.ssh_errors import SSHError
from mlbench_daemon.vocabulary import CheckName, CheckStatus

CHECKS = tuple(CheckName)
MARGIN_S = 2.0  # the remote scripts end this much before the deadline

# $1 role (master|worker), $2 mpirun as configured, $3 program[0], $4 job dir (master).
# Prints lines "check<TAB>status<TAB>message"; "version<TAB><text>" for the daemon.
NODE = r"""say() { printf '%s\t%s\t%s\n' "$1" "$2" "$3"; }
role=$1 mpirun=$2 prog=$3 jobdir=$4 daemon=${5:-orted}
if [ "$role" = master ]; then name=${mpirun##*/}; else name=$daemon; fi
case $mpirun in
  */*) exe=${mpirun%/*}/$name; how="under ${mpirun%/*} (mpirun's prefix)";;
  *) exe=$(command -v "$name" 2>/dev/null) || exe=; how="on the non-interactive PATH ($PATH)";;
esac
if [ -z "$exe" ] || [ ! -f "$exe" ]; then
  say launcher-daemon fail "$name not found $how"; exe=
elif [ ! -x "$exe" ]; then
  say launcher-daemon fail "$exe is not executable for $(id -un)"; exe=
else
  libs=
  if command -v ldd >/dev/null 2>&1; then
    case $mpirun in */*)  # OpenMPI 4 puts the prefix's lib first, as here
      p=${mpirun%/*}; LD_LIBRARY_PATH=${p%/*}/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      export LD_LIBRARY_PATH;;
    esac
    libs=$(ldd "$exe" 2>/dev/null | grep 'not found' | tr -s ' \t\n' ' ')
  fi
  if [ -n "$libs" ]; then say launcher-daemon fail "$exe: libraries not found: $libs"
  else say launcher-daemon pass "$exe"; fi
fi
if [ -n "$exe" ]; then
  d=${exe%/*} v=
  for l in "${mpirun##*/}" mpirun mpiexec; do
    if [ -x "$d/$l" ]; then
      v=$("$d/$l" --version 2>/dev/null | head -n 3 | tr '\n\t' '  ' | tr -s ' '); break
    fi
  done
  if [ -z "$v" ] && [ -x "$d/ompi_info" ]; then
    v=$("$d/ompi_info" --version 2>/dev/null | head -n 1)
  fi
  printf 'version\t%s\n' "$v"
fi
case $prog in
  */*) p=$prog;;
  *) p=$(command -v "$prog" 2>/dev/null) || p=;;
esac
if [ -z "$p" ]; then say program fail "$prog not found on the PATH ($PATH)"
elif [ ! -e "$p" ]; then say program fail "$p does not exist"
elif [ -d "$p" ] || [ ! -x "$p" ]; then say program fail "$p is not executable for $(id -un)"
else say program pass "$p"; fi
t=${TMPDIR:-/tmp} bad= ok=
if f=$(mktemp "$t/.mlbench-preflight.XXXXXX" 2>/dev/null); then rm -f "$f"; ok=$t
else bad="cannot create a file in $t (TMPDIR, OpenMPI's session directory)"; fi
if [ "$role" = master ]; then
  d=$jobdir
  while [ ! -e "$d" ] && [ "$d" != "${d%/*}" ] && [ -n "${d%/*}" ]; do d=${d%/*}; done
  [ -e "$d" ] || d=.
  if [ -d "$d" ] && [ -w "$d" ] && [ -x "$d" ]; then ok="$ok, $jobdir"
  else bad="${bad:+$bad; }cannot create the job directory $jobdir ($d is not writable)"; fi
fi
if [ -n "$bad" ]; then say dirs fail "$bad"; else say dirs pass "writable: $ok"; fi
"""

# $1 seconds for each ssh, $2 the worker command, $3 NODE, $4 mpirun, $5 program[0],
# $6 job dir, then the workers' IPs.  Prints NODE's lines for the master, then per
# worker "@<ip><TAB><ssh exit status>", NODE's lines, and ssh's stderr lines as "!...".
MASTER = r"""t=$1 cmd=$2 node=$3 mpirun=$4 prog=$5 jobdir=$6
shift 6
tmp=$(mktemp -d "${TMPDIR:-/tmp}/.mlbench-preflight.XXXXXX") || exit 3
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
to=
command -v timeout >/dev/null 2>&1 && to="timeout -k 1 $t"
i=0
for ip; do
  i=$((i+1))
  ($to ssh -n -o BatchMode=yes -o StrictHostKeyChecking=yes \
     -o ConnectTimeout="$t" -- "$ip" "$cmd" >"$tmp/$i.out" 2>"$tmp/$i.err"
   echo $? >"$tmp/$i.rc") &
done
sh -c "$node" sh master "$mpirun" "$prog" "$jobdir" </dev/null 2>/dev/null
wait
i=0
for ip; do
  i=$((i+1))
  printf '@%s\t%s\n' "$ip" "$(cat "$tmp/$i.rc" 2>/dev/null)"
  cat "$tmp/$i.out" 2>/dev/null
  sed 's/^/!/' "$tmp/$i.err" 2>/dev/null
done
"""

# Runs a python3 program from "$1" with the remaining arguments, or says there is none.
WITH_PYTHON = (
    'command -v python3 >/dev/null 2>&1 || { echo "no-python3 $(uname -n)"; exit 0; }\n'
    'p=$1; shift; exec python3 -c "$p" "$@"\n'
)

# Both scripts below: accept (and close at once) connections on a free port, `ls`.
_LISTEN = r"""
ls = socket.socket()
ls.bind(("", 0))
ls.listen(128)
def serve():
    while True:
        c, _ = ls.accept()
        c.close()
threading.Thread(target=serve, daemon=True).start()
"""

# On each worker: listen on a free port, print it, read the peers to try (one JSON
# line), connect to each, print the results, then wait for EOF (others may still be
# connecting here).  argv: seconds.
TCP_WORKER = (
    r"""
import json, signal, socket, sys, threading
signal.alarm(int(float(sys.argv[1])) + 2)"""
    + _LISTEN
    + r"""print("port", ls.getsockname()[1], flush=True)
line = sys.stdin.readline()
if not line:
    sys.exit(0)
todo = json.loads(line)
out = {}
def connect(ip, port):
    try:
        socket.create_connection((ip, port), timeout=todo["timeout"]).close()
        out[ip] = "ok"
    except OSError as e:
        out[ip] = (e.strerror or str(e) or type(e).__name__) + " (%s:%d)" % (ip, port)
ts = [threading.Thread(target=connect, args=p) for p in todo["peers"]]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out), flush=True)
sys.stdin.read()
"""
)

# On the master: listen, start TCP_WORKER on each worker over ssh, exchange ports,
# collect results.  argv: seconds, own IP, the worker command, workers' IPs.
TCP_MASTER = (
    r"""
import json, math, shutil, signal, socket, subprocess, sys, threading, time
t, me, cmd, ips = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
CONNECT_S = 3.0  # a LAN answers a SYN in far less; a firewall that drops never does
signal.alarm(int(t) + 3)
end = time.monotonic() + t"""
    + _LISTEN
    + r"""sec = str(max(1, math.ceil(t)))
bound = ["timeout", "-k", "1", sec] if shutil.which("timeout") else []
procs = {ip: subprocess.Popen(
    bound + ["ssh", "-o", "BatchMode=yes", "-o",
     "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=" + sec, "--", ip, cmd],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    text=True) for ip in ips}
first, result = {}, {}
def read(ip, into):
    into[ip] = procs[ip].stdout.readline().strip()
def phase(into, who):
    ts = [threading.Thread(target=read, args=(ip, into), daemon=True) for ip in who]
    for x in ts: x.start()
    for x in ts: x.join(max(0.0, end - time.monotonic()))
phase(first, ips)
ports = {ip: int(v.split()[1]) for ip, v in first.items() if v.startswith("port ")}
left = min(CONNECT_S, max(0.5, (end - time.monotonic()) / 2))
peers = [[me, ls.getsockname()[1]]] + [[ip, p] for ip, p in ports.items()]
for ip in ports:
    todo = {"timeout": left, "peers": [p for p in peers if p[0] != ip]}
    try:
        procs[ip].stdin.write(json.dumps(todo) + "\n")
        procs[ip].stdin.flush()
    except OSError:
        pass
phase(result, list(ports))
for p in procs.values():
    try:
        p.stdin.close()
    except OSError:
        pass
for p in procs.values():
    try:
        p.wait(max(0.1, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
out = {}
for ip in ips:
    r = result.get(ip, "")
    out[ip] = json.loads(r) if r.startswith("{") else (first.get(ip) or "no answer")
print(json.dumps({"master": me, "port": ls.getsockname()[1], "workers": out}))
"""
)

SSH_HINTS = (
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "{node}'s host key changed since the master "
     "recorded it: verify it, then replace its line in the master's known_hosts"),
    ("Host key verification failed", "add {node}'s host key ({ip}) to the cluster user's "
     "known_hosts on the master, and verify its fingerprint"),
    ("Permission denied", "authorize the master's key (the cluster user's ~/.ssh/id_*.pub on "
     "the master) in {node}'s authorized_keys"),
    ("Connection refused", "start sshd on {node}, or open port 22 from the master"),
    ("Could not resolve", "the master cannot resolve {ip}: fix its resolver or /etc/hosts"),
    ("timed out", "nothing answers on {node} from the master: check routes and firewalls"),
    ("No route", "no route from the master to {node}: check the network"),
)  # fmt: skip


def check(
    node: str | None, name: str, status: CheckStatus, message: str, hint: str | None = None
) -> dict[str, Any]:
    """One check as the API gives it."""
    ok = {CheckStatus.PASS: True, CheckStatus.FAIL: False}.get(status)
    return {"node": node, "check": name, "status": status, "ok": ok, "message": message,
            "hint": hint}  # fmt: skip


def slots_of(node: Node) -> int:
    s = node.labels.get("slots", "")
    return int(s) if s.isdigit() and int(s) > 0 else 1


def slots_check(nodes: Sequence[Node], np: int | None) -> dict[str, Any]:
    total = sum(slots_of(n) for n in nodes)
    if np is None or np <= total:
        return check(None, "slots", CheckStatus.PASS, f"np={np or total} within {total} slot(s)")
    return check(
        None,
        "slots",
        CheckStatus.FAIL,
        f"np={np} is more than the {total} slot(s) of {len(nodes)} node(s)",
        "lower np, give nodes a `slots` label, or add nodes",
    )


def version_text(raw: str) -> str:
    """A launcher's version output -> "Open MPI 4.1.4", "MPICH 5.0.2", ... (as is if
    not recognised)."""
    try:
        return flavours.detect(raw)[1]
    except ValueError:
        return raw.strip()


def flavour_of(version: str | None) -> str:
    """`version_text` -> the flavour, "unknown" if none."""
    m = re.match(r"Open MPI (\d+)\.", version or "")
    if m:
        return "openmpi5" if int(m[1]) >= 5 else "openmpi4"
    return "mpich" if (version or "").startswith(("MPICH ", "Intel MPI ")) else "unknown"


def launcher_flavour(pool: Pool, cfg: Config, master: Node, timeout: float) -> str:
    """mpi.flavour, or with auto what `<mpirun> --version` says on the master
    (openmpi4 when it says nothing known: the checks then show what is wrong)."""
    if cfg.mpi.flavour != "auto":
        return str(cfg.mpi.flavour)
    try:
        r = pool.run(master.ip, master.port, [cfg.mpi.mpirun, "--version"], timeout=timeout)
        return flavours.detect((r.stdout + r.stderr).decode(errors="replace"))[0]
    except (SSHError, ValueError):
        return "openmpi4"


def _ssh_failure(node: Node, rc: str, err: list[str], seconds: float) -> dict[str, Any]:
    if rc == "124":
        return check(node.name, "master-ssh", CheckStatus.FAIL,
                     f"ssh from the master to {node.ip} did not finish in {seconds:g} s",
                     f"check that {node.name} answers on port 22 from the master")  # fmt: skip
    text = "\n".join(err)
    message = next((e for e in reversed(err) if e.strip()), f"ssh exited {rc}")
    hint = next(
        (h for pat, h in SSH_HINTS if pat in text), "run `ssh {ip} true` as the cluster user"
    )
    return check(
        node.name, "master-ssh", CheckStatus.FAIL, message, hint.format(node=node.name, ip=node.ip)
    )


def parse_master(
    text: str, master: Node, workers: Sequence[Node], seconds: float
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """MASTER's output -> (checks, {node name: version text})."""
    by_ip = {n.ip: n for n in workers}
    checks: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    err: list[str] = []
    node, rc = master, ""
    seen: dict[str, set[str]] = {master.name: set()}

    def close() -> None:
        if node is not master:
            if rc == "255" or rc == "124" or rc == "":
                checks.append(_ssh_failure(node, rc, err, seconds))
                for c in ("launcher-daemon", "mpi-version", "program", "dirs"):
                    checks.append(check(node.name, c, CheckStatus.NOT_CHECKED,
                                        "the master could not ssh to this node"))  # fmt: skip
                return
            checks.append(
                check(node.name, "master-ssh", CheckStatus.PASS, f"ssh {node.ip} from the master")
            )
            if not seen[node.name] and rc != "0":  # logged in, but a shell could not run sh
                why = next((e for e in reversed(err) if e.strip()), "no output")
                checks.append(check(node.name, "launcher-daemon", CheckStatus.FAIL,
                                    f"commands do not run there (exit {rc}: {why})",
                                    HINTS["launcher-daemon"]))  # fmt: skip
                seen[node.name].add("launcher-daemon")
        for c in ("launcher-daemon", "program", "dirs"):
            if c not in seen[node.name]:
                checks.append(
                    check(node.name, c, CheckStatus.NOT_CHECKED, "no answer from the node")
                )

    for line in text.splitlines():
        if line.startswith("@"):
            close()
            ip, _, rc = line[1:].partition("\t")
            node, err = by_ip[ip], []
            seen[node.name] = set()
        elif line.startswith("!"):
            err.append(line[1:])
        else:
            parts = line.split("\t", 2)
            if parts[0] == "version" and len(parts) == 2:
                versions[node.name] = version_text(parts[1])
            elif (
                len(parts) == 3
                and parts[0] in CHECKS
                and parts[1] in (CheckStatus.PASS, CheckStatus.FAIL)
            ):
                seen[node.name].add(parts[0])
                status = CheckStatus(parts[1])
                checks.append(check(node.name, parts[0], status, parts[2], HINTS.get(parts[0])))
    close()
    if not seen[master.name]:  # the master printed nothing: no scripts ran there
        checks.append(
            check(master.name, "launcher-daemon", CheckStatus.FAIL, "the master ran no checks")
        )
    return checks, versions


HINTS = {
    "launcher-daemon": (
        "install the same MPI at the same prefix on every node, or with a relative "
        "mpi.mpirun put its bin directory on the non-interactive PATH (sshd SetEnv or "
        "~/.ssh/environment; shells' profiles are not read)"
    ),
    "program": "install the program at the same path on every node, executable for the "
    "cluster user",
    "dirs": "make TMPDIR (or /tmp) and the cluster user's home writable",
    "tcp": "open TCP between all nodes, both ways (firewalls), or restrict MPI to a "
    "shared interface (--mca btl_tcp_if_include)",
    "mpi-version": "install the master's MPI version on every node (mixed versions fail "
    "with 'Data unpack would read past end of buffer' or hang)",
}


def version_checks(
    master: Node, nodes: Sequence[Node], versions: dict[str, str]
) -> list[dict[str, Any]]:
    """Each node's version against the master's."""
    want = versions.get(master.name)
    out = []
    for n in nodes:
        v = versions.get(n.name)
        if n.name not in versions:
            continue  # launcher-daemon failed or ssh failed: already said
        if not want or not v:
            out.append(check(n.name, "mpi-version", CheckStatus.NOT_CHECKED,
                             f"no version from {n.name if not v else master.name}"))  # fmt: skip
        elif v == want:
            out.append(check(n.name, "mpi-version", CheckStatus.PASS, v))
        else:
            out.append(check(n.name, "mpi-version", CheckStatus.FAIL,
                             f"{v!r} here, {want!r} on the master {master.name}",
                             HINTS["mpi-version"]))  # fmt: skip
    return out


def tcp_checks(text: str, master: Node, workers: Sequence[Node]) -> list[dict[str, Any]]:
    """TCP_MASTER's output -> one tcp check per worker."""
    names = {n.ip: n.name for n in workers} | {master.ip: master.name}
    first = text.strip().splitlines()[0] if text.strip() else ""
    if first.startswith("no-python3"):
        why = "needs python3 on the master and the workers; none on the master"
        return [check(n.name, "tcp", CheckStatus.NOT_CHECKED, why) for n in workers]
    try:
        doc = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [check(n.name, "tcp", CheckStatus.NOT_CHECKED, "the TCP test gave no answer")
                for n in workers]  # fmt: skip
    out = []
    for n in workers:
        r = doc["workers"].get(n.ip)
        if isinstance(r, str):
            why = (
                f"needs python3 on every node; none on {n.name}"
                if r.startswith("no-python3")
                else "not tested: the master could not start the test there"
            )
            out.append(check(n.name, "tcp", CheckStatus.NOT_CHECKED, why))
            continue
        bad = {ip: e for ip, e in r.items() if e != "ok"}
        if bad:
            msg = "; ".join(f"no TCP to {names.get(ip, ip)}: {e}" for ip, e in sorted(bad.items()))
            out.append(check(n.name, "tcp", CheckStatus.FAIL, msg, HINTS["tcp"]))
        else:
            others = sorted(names.get(ip, ip) for ip in r)
            out.append(check(n.name, "tcp", CheckStatus.PASS, "connected to " + ", ".join(others)))
    return out


def run(
    pool: Pool,
    cfg: Config,
    master: Node,
    nodes: Sequence[Node],
    program: Sequence[str],
    np: int | None,
    timeout: float,
) -> dict[str, Any]:
    """All checks for a launch of `program` on `nodes` (master among them) ->
    {"checks": [...], "versions": {...}, "flavour": ...}; bounded by `timeout`."""
    end = time.monotonic() + timeout
    workers = [n for n in nodes if n.name != master.name]
    flavour = launcher_flavour(pool, cfg, master, max(1.0, timeout / 4)) if workers else None
    daemon = flavours.get(flavour).daemon if flavour else "orted"
    seconds = max(1.0, end - time.monotonic() - MARGIN_S)
    sec = str(max(1, math.floor(seconds)))
    node_cmd = shlex.join(
        ["sh", "-c", NODE, "sh", "worker", cfg.mpi.mpirun, program[0], cfg.mpi.remote_dir, daemon]
    )
    tcp_cmd = shlex.join(["sh", "-c", WITH_PYTHON, "sh", TCP_WORKER, sec])
    results: dict[str, Any] = {}

    def remote(key: str, argv: list[str]) -> None:
        try:
            results[key] = pool.run(
                master.ip, master.port, argv, timeout=max(0.1, end - time.monotonic())
            )
        except SSHError as e:
            results[key] = e

    argv_main = ["sh", "-c", MASTER, "sh", sec, node_cmd, NODE, cfg.mpi.mpirun, program[0],
                 cfg.mpi.remote_dir, *[n.ip for n in workers]]  # fmt: skip
    argv_tcp = ["sh", "-c", WITH_PYTHON, "sh", TCP_MASTER, sec, master.ip, tcp_cmd,
                *[n.ip for n in workers]]  # fmt: skip
    threads = [threading.Thread(target=remote, args=("main", argv_main), daemon=True)]
    if workers:
        threads.append(threading.Thread(target=remote, args=("tcp", argv_tcp), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, end - time.monotonic() + 1))

    main = results.get("main")
    checks: list[dict[str, Any]] = []
    versions: dict[str, Any] = {}
    if isinstance(main, SSHError) or main is None:
        why = str(main) if main is not None else "no answer in time"
        checks.append(check(master.name, "master-ssh", CheckStatus.FAIL,
                            f"the daemon could not run the checks on the master: {why}",
                            "see the master's node status (GET /api/nodes/)"))  # fmt: skip
    else:
        checks, versions = parse_master(
            main.stdout.decode(errors="replace"), master, workers, seconds
        )
        checks += version_checks(master, nodes, versions)
    tcp = results.get("tcp")
    if workers:
        if isinstance(tcp, SSHError) or tcp is None:
            checks += [check(n.name, "tcp", CheckStatus.NOT_CHECKED, "the TCP test gave no answer")
                       for n in workers]  # fmt: skip
        else:
            checks += tcp_checks(tcp.stdout.decode(errors="replace"), master, workers)
    checks.append(slots_check(nodes, np))
    order = {c: i for i, c in enumerate(CHECKS)}
    checks.sort(key=lambda c: (c["node"] is None, natural_key(c["node"] or ""), order[c["check"]]))
    return {
        "checks": checks,
        "versions": versions,
        "flavour": (
            cfg.mpi.flavour if cfg.mpi.flavour != "auto" else flavour_of(versions.get(master.name))
        ),
    }


FIELDS = shapes.PreflightRequest.__struct_fields__  # the body is declared there


class Preflight:
    """`POST /api/preflight/`: one at a time (another gets 429), one deadline.

    Nodes, master and argv are chosen exactly as for a job (jobs.placement)."""

    def __init__(self, cfg: Config, pool: Pool, registry: Registry) -> None:
        self.cfg, self.pool, self.registry = cfg, pool, registry
        self._busy = threading.Lock()

    def run(self, body: dict[str, Any] | None) -> dict[str, Any]:
        for key in body or {}:
            if key not in FIELDS:
                raise BadRequest(
                    f"unknown field {key!r} (known: {', '.join(FIELDS)})", field=str(key) or "body"
                )
        req = validate(body, self.cfg.mpi.program)
        statuses, master_name = choose(self.registry, req)
        nodes = [s.node for s in statuses]
        master = next((n for n in nodes if n.name == master_name), nodes[0])
        mpi = self.cfg.mpi
        if not self._busy.acquire(blocking=False):
            raise QueueFull("a preflight is already running; try again when it ends")
        try:
            result = run(self.pool, self.cfg, master, nodes, req.program, req.np,
                         mpi.preflight_timeout_s)  # fmt: skip
        finally:
            self._busy.release()
        fl = result["flavour"] if result["flavour"] in flavours.NAMES else "openmpi4"
        return {
            "ok": not any(c["status"] == CheckStatus.FAIL for c in result["checks"]),
            "master_name": master.name,
            "command": str(mpirun_argv(mpi.mpirun, mpi.args, nodes, req.np, [], req.program, fl)),
            "nodes": [node_row(n) for n in nodes],
            "flavour": result["flavour"],
            "checks": result["checks"],
        }
