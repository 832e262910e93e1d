"""The job directory on the master, and the only code that knows its files.

Every remote step is a constant shell script run over the pool as an argv list
(``sh -c SCRIPT sh ARGS...``; the pool quotes it with ``shlex.join``), next to the
code that reads its answer.  Request data reaches a script only as positional
parameters or on stdin.

Job dir ``<mpi.remote_dir>/<id>`` under the cluster user's home, created with
umask 077; its files:

- ``env``: ``NAME='value'`` lines (the request's env plus the flavour's job marker), read
  and deleted by the wrapper before mpirun starts;
- ``lock``: held by the wrapper (fd 9) for as long as it runs;
- ``out``: mpirun's output (stdout and stderr);
- ``pid``: the wrapper's pid = its process group and session;
- ``rc``: mpirun's exit status, written when it ends.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import shlex
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Literal, Protocol, cast

import zstandard

from mlbench_daemon.ssh_errors import SSHError, Unreachable
from mlbench_daemon.vocabulary import SSHReason

MARKER = "OMPI_MCA_mlbench_job_id"  # OpenMPI 4's job marker (flavour.py has each flavour's)

# Runs in the job dir; stdin is the env file; "$@" is the mpirun argv.  The wrapper
# holds the job's lock (fd 9, taken by LAUNCH) until it exits; mpirun does not get it.
WRAPPER = 'set -a; . ./env; set +a; command -p rm -f ./env; "$@" 9>&-; echo $? > rc'
LAUNCH = """set -e
umask 077
w=$1
mkdir -p "$2"
cd "$2"
cat > env
shift 2
exec 9> lock
flock -x 9
setsid sh -c "$w" sh "$@" </dev/null >out 2>&1 &
echo $! > pid
echo $!
"""
# $1 = job dir, $2 = first byte wanted (1-based).  Streams `out` from $2 until the job
# is over, which is seen without polling for rc: `flock -s lock` returns the moment the
# wrapper has exited (after writing rc, or killed), and tail, told to follow while that
# flock runs, then prints what is left and exits.  (Not the wrapper's own pid: an
# orphan stays a zombie until init reaps it, which some inits do only once a second.)
# Only a tail that did not end that way (its channel closed: SIGPIPE) leaves a flock
# to stop; after a normal end the flock is gone and its pid may be reaped already, so
# it is not signalled.
# A stream that ends short is resumed by the caller, which compares sizes with STATUS.
# tail checks the file every 10 ms instead of waking on each inotify event: mpirun
# writes a few KiB at a time, and woken per write, tail and sshd pass each piece on as
# its own SSH packet (4 KiB median; the daemon then spends 12-13 s of CPU per GB on
# packets).  Checked every 10 ms, the same output comes in 32 KiB packets, 4 s per GB.
# (`---disable-inotify` is GNU tail's undocumented switch for this; a tail without it
# follows with inotify.)
FOLLOW = """exec 2>/dev/null
cd "$1" || exit 1
[ -e rc ] && exec tail -c "+$2" out
flock -s lock true >/dev/null </dev/null &
f=$!
p=---disable-inotify
tail $p --version >/dev/null || p=
tail $p -c "+$2" -F -s 0.01 --pid=$f out &
wait $! || kill $f
exit 0
"""
# $1 = job dir, $2 = first byte wanted (1-based), $3 = the fewest waiting bytes worth
# compressing.  Run before FOLLOW: what the job wrote while the daemon was away (a restart,
# a lost link) comes compressed by the master's zstd and is unpacked here in C: the SSH
# packets, each decrypted and parsed in Python, shrink by the log's packing ratio (text
# logs pack several times; bench.reattach's repeated lines a thousandfold).  Prints
# nothing when fewer bytes are waiting or the master has no zstd (FOLLOW then streams them
# as they are); else "z", then the bytes there now as one zstd stream.
CATCH_UP = """exec 2>/dev/null
cd "$1" || exit 0
s=$(stat -c %s out) || exit 0
[ $((s - $2 + 1)) -ge "$3" ] && command -v zstd >/dev/null || exit 0
printf z
tail -c "+$2" out | zstd -1 -q -c
"""
# alive G: whether process group G has a member that can still run.  `kill -0 -G` alone
# also counts the group's zombies, which stay until their parent reaps them (a slow
# init may take a second): a group of zombies is over.  Reads /proc/PID/stat with
# builtins only (the state and the group follow the command name's last ")").
ALIVE = """alive() {
  kill -0 "-$1" 2>/dev/null || return 1
  for f in /proc/[0-9]*/stat; do
    read -r l < "$f" 2>/dev/null || continue
    set -- "$1" ${l##*) }
    [ "$4" = "$1" ] && [ "$2" != Z ] && return 0
  done
  return 1
}
"""
# -> "done RC SIZE" | "running - SIZE" | "gone - SIZE" | "missing"
STATUS = (
    ALIVE
    + """cd "$1" 2>/dev/null || { echo missing; exit 0; }
s=$(stat -c %s out 2>/dev/null || echo 0)
if [ -s rc ]; then echo "done $(cat rc) $s"
elif [ -n "$2" ] && alive "$2"; then echo "running - $s"
else echo "gone - $s"; fi
"""
)
PIDFILE = 'cat "$1/pid" 2>/dev/null || true'
# $1 = process group, $2 = grace in 0.1 s ticks -> "gone" | "terminated" | "killed"
TERMINATE = (
    ALIVE
    + """kill -TERM "-$1" 2>/dev/null || { echo gone; exit 0; }
i=0
while alive "$1"; do
  if [ "$i" -ge "$2" ]; then kill -KILL "-$1" 2>/dev/null; echo killed; exit 0; fi
  sleep 0.1; i=$((i+1))
done
echo terminated
"""
)
# The job id comes on stdin, so no sweeping process carries it; a second line may
# name an option and a third its value (Hydra's proxies: --control-port and the
# job's mpiexec's address:port), which marks a process too.  Prints the pids of the
# cluster user's processes marked with it; with $1 = kill, KILLs them first; with
# $1 = values, prints instead the values of that option on the marked processes'
# command lines.  The markers: every flavour's variable ends in mlbench_job_id
# (MLBENCH_JOB_ID for Hydra), in the environment or, OpenMPI's MCA variables, as
# "--mca NAME VALUE"-style words on a daemon's command line.
SWEEP = """read -r id
read -r opt || opt=
read -r val || val=
nl='
'
found=
vals=
for d in /proc/[0-9]*; do
  [ -O "$d" ] || continue
  c=$(tr '\\0' '\\n' < "$d/environ" 2>/dev/null; tr '\\0' '\\n' < "$d/cmdline" 2>/dev/null)
  case "$c" in
    *"mlbench_job_id=$id$nl"*|*"MLBENCH_JOB_ID=$id$nl"*|*"mlbench_job_id$nl$id$nl"*) ;;
    *"$nl$opt$nl$val$nl"*) [ -n "$val" ] || continue;;
    *) continue;;
  esac
  found="$found ${d#/proc/}"
  if [ "$1" = values ]; then
    vals="$vals $(tr '\\0' '\\n' < "$d/cmdline" 2>/dev/null | sed -n "/^$opt\\$/{n;p;q}")"
  fi
done
if [ "$1" = kill ] && [ -n "$found" ]; then kill -KILL $found 2>/dev/null; fi
if [ "$1" = values ]; then echo $vals; else echo $found; fi
"""

# A roll-call of the job's ranks on this node.  stdin: the job id; $1 = CPU sample (s),
# $2 = bound of each stack tool (s), $3 = the stack tools to try, in order (words from
# config.STACK_TOOLS).  A rank is a process of the cluster user whose environment has
# the job's marker and a rank variable (OpenMPI's OMPI_COMM_WORLD_RANK, PMIx's
# PMIX_RANK, Hydra's PMI_RANK).  It prints
#   hz CLK_TCK PAGESIZE
# then per rank (state, CPU and wchan read before any tool attaches):
#   proc PID NAME=VALUE...      (the rank and size variables)
#   stat1 /proc/PID/stat        (before the sample)
#   stat2 /proc/PID/stat        (after it; empty if the process is gone)
#   wchan /proc/PID/wchan
#   tool NAME EXIT              (the first of $3 installed: py-spy only for a python
#                                 executable; "none -" if none; EXIT 124 = out of time)
#   | a line of the tool's output (at most 64 KiB of it)
#   end
# The tools of all ranks run at once, each under `timeout` (TERM, then KILL 2 s later:
# gdb detaches on TERM).  eu-stack -1 and gdb's bt: the main thread only; py-spy
# --nonblocking reads the interpreter's memory without stopping it.
# Few processes, none per /proc entry: two greps find the marked processes and their rank
# variables among all the user's processes, and /proc files are read with the shell's
# `read`.  Beside a job's busy-polling ranks each new process waits for a CPU (16 ranks
# on 2 cores: tens of ms each), so a process per /proc entry cost most of a roll-call.
# The job id (hex, from the daemon) is checked before it goes into grep's pattern.
# Each stat read is followed by a read of /proc/uptime (`up1`, `up2`): the CPU % divides
# by the time that really passed between a rank's two reads, which under load is longer
# than the sleep.
ROLL_CALL = """read -r id
up=
case $id in ''|*[!0-9A-Za-z_-]*) echo "roll-call: not a job id" >&2; exit 2;; esac
s=$1
b=$2
tools=
for t in $3; do command -v "$t" >/dev/null && tools="$tools $t"; done
echo "hz $(getconf CLK_TCK) $(getconf PAGESIZE)"
d=$(mktemp -d) || exit 1
trap 'rm -rf "$d"' EXIT
set --
for p in /proc/[0-9]*; do [ -O "$p" ] && set -- "$@" "$p/environ"; done
[ $# -eq 0 ] || grep -l -a -z -x -E ".*(mlbench_job_id|MLBENCH_JOB_ID)=$id" "$@" \\
  > "$d/marked" 2>/dev/null
set --
while IFS= read -r f; do set -- "$@" "$f"; done < "$d/marked"
v='^(OMPI_COMM_WORLD_(RANK|SIZE)|PMIX_RANK|PMI_(RANK|SIZE))=[0-9]+$'
[ $# -eq 0 ] || grep -H -a -z -E "$v" "$@" 2>/dev/null | tr '\\0' '\\n' > "$d/vars"
ranks=
cur=
v=
found() {
  [ -n "$cur" ] || return 0
  ranks="$ranks $cur"
  st=
  { read -r st < "/proc/$cur/stat"; } 2>/dev/null
  { read -r up _ < /proc/uptime; } 2>/dev/null
  printf 'proc %s%s\\nstat1 %s\\nup1 %s\\n' "$cur" "$v" "$st" "$up" > "$d/$cur.head"
}
while IFS=: read -r f kv; do
  p=${f#/proc/}
  p=${p%/environ}
  [ "$p" = "$cur" ] || { found; cur=$p; v=; }
  v="$v $kv"
done < "$d/vars"
found
sleep "$s"
for p in $ranks; do
  st=
  w=
  { read -r st < "/proc/$p/stat"; } 2>/dev/null
  { read -r up _ < /proc/uptime; } 2>/dev/null
  { read -r w < "/proc/$p/wchan"; } 2>/dev/null
  printf 'stat2 %s\\nup2 %s\\nwchan %s\\n' "$st" "$up" "$w" >> "$d/$p.head"
  py=
  case " $tools " in
    *" py-spy "*) x=$(readlink "/proc/$p/exe" 2>/dev/null) || x=
      case "${x##*/}" in python*) py=1;; esac;;
  esac
  set --
  for t in $tools; do
    case $t in
      py-spy) [ -n "$py" ] && set -- py-spy py-spy dump --nonblocking --pid "$p";;
      eu-stack) set -- eu-stack eu-stack -1 -m -p "$p";;
      gdb) set -- gdb gdb -nx -batch -q -iex "set debuginfod enabled off" -p "$p" -ex bt;;
    esac
    [ $# -eq 0 ] || break
  done
  if [ $# -eq 0 ]; then echo "tool none -" >> "$d/$p.head"; continue; fi
  ( t=$1; shift
    timeout -k 2 "$b" "$@" > "$d/$p.out" 2>&1 </dev/null
    echo "tool $t $?" >> "$d/$p.head" ) &
done
wait
for p in $ranks; do
  cat "$d/$p.head"
  [ -e "$d/$p.out" ] && head -c 65536 "$d/$p.out" | sed 's/^/| /'
  echo end
done
"""

SWEEP_SETTLE_S = (0.05, 0.1, 0.2, 0.4, 0.8)  # pauses before each new look after a KILL
CATCH_UP_MIN = 2**20  # fewer waiting bytes are left to FOLLOW: not worth one more exec
UNPACK_SIZE = 2**20  # the most bytes of one CaughtUp chunk, however well they packed


class Result(Protocol):
    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> bytes: ...
    @property
    def stderr(self) -> bytes: ...


class Stream(Protocol):
    def __iter__(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class Pool(Protocol):
    """What the job code needs of ``ssh.Pool`` (tests drive it with a local one)."""

    def run(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", timeout: float
    ) -> Result: ...

    def stream(
        self, ip: str, port: int, argv: list[str], *, stdin: bytes = b"", idle_timeout: float
    ) -> Stream: ...


class CaughtUp:
    """The CATCH_UP answer as the bytes it carries, unpacked as they arrive and at most
    UNPACK_SIZE at a time (repeated log lines pack a thousandfold: memory stays bounded
    however well they packed).  Nothing when the master sent nothing.  A stream cut short
    gives the bytes of the blocks it carried whole, a prefix (the caller follows on from
    the log's size); a lost link raises as the Stream does; a frame that does not unpack
    ends the catch-up (FOLLOW streams the rest plain)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._chunks = iter(stream)
        self._first = b""
        self._reader: zstandard.ZstdDecompressionReader | None = None

    def read(self, size: int) -> bytes:
        """The unpacker's source: the next compressed chunk (of any size), b"" at the end."""
        if self._first:
            data, self._first = self._first, b""
            return data
        return next(self._chunks, b"")

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._reader is None:
            head = next(self._chunks, b"")
            if head[:1] != b"z":  # nothing worth packing, or no zstd there
                self.close()
                raise StopIteration
            self._first = head[1:]
            source = cast(IO[bytes], self)  # (the reader calls only read)
            self._reader = zstandard.ZstdDecompressor().stream_reader(source, closefd=False)
        try:
            data = self._reader.read(UNPACK_SIZE)
        except zstandard.ZstdError:
            data = b""
        if not data:
            self.close()
            raise StopIteration
        return data

    def close(self) -> None:
        self.stream.close()


@dataclasses.dataclass(frozen=True)
class Status:
    """The STATUS script's answer: ``done`` (with ``exit_code`` if rc was a number),
    ``running``, ``gone`` (no process, no rc) or ``missing`` (no job dir);
    ``size`` = bytes in ``out``."""

    state: Literal["done", "running", "gone", "missing"]
    exit_code: int | None = None
    size: int = 0

    @classmethod
    def parse(cls, text: str) -> Status:
        words = text.split()
        if words == ["missing"]:
            return cls("missing")
        if len(words) != 3 or words[0] not in ("done", "running", "gone"):
            raise ValueError(f"unexpected status answer {text[:200]!r}")
        rc = int(words[1]) if words[1].lstrip("-").isdigit() else None
        return cls(words[0], rc if words[0] == "done" else None, int(words[2]))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Host:
    ip: str
    port: int


class Remote:
    """The remote steps of a job, each bounded by `timeout` (s) per SSH command."""

    def __init__(self, pool: Pool, timeout: float) -> None:
        self.pool, self.timeout = pool, timeout

    def _run(self, host: Host, argv: list[str], stdin: bytes = b"", extra: float = 0.0) -> Result:
        return self.pool.run(host.ip, host.port, argv, stdin=stdin, timeout=self.timeout + extra)

    def has_program(self, host: Host, program: str) -> bool:
        """Whether `program` is on the login PATH of `host` (the master check of a launch)."""
        return self._run(host, ["command", "-v", program]).exit_code == 0

    def version(self, host: Host, launcher: str) -> tuple[int, str]:
        """``<launcher> --version`` on `host` -> (exit status, stdout and stderr)."""
        r = self._run(host, [launcher, "--version"])
        return r.exit_code, (r.stdout + r.stderr).decode(errors="replace")

    def launch(
        self,
        host: Host,
        job_dir: str,
        job_id: str,
        command: Sequence[str],
        env: Mapping[str, str],
        marker: Mapping[str, str] | None = None,
    ) -> tuple[int | None, str]:
        """Start the job detached -> (pid, None) or (None, why it did not start).
        `marker`: the flavour's marker variables (default OpenMPI 4's)."""
        marker = {MARKER: job_id} if marker is None else marker
        lines = "".join(f"{k}={shlex.quote(v)}\n" for k, v in {**env, **marker}.items())
        r = self._run(host, ["sh", "-c", LAUNCH, "sh", WRAPPER, job_dir, *command], lines.encode())
        if r.exit_code == 0 and r.stdout.split():
            return int(r.stdout.split()[-1]), ""
        return (
            None,
            f"launch exited {r.exit_code}: {r.stderr.decode(errors='replace').strip()[:500]}",
        )

    def pid(self, host: Host, job_dir: str) -> int | None:
        """The pid a launch wrote, or None if it wrote none."""
        r = self._run(host, ["sh", "-c", PIDFILE, "sh", job_dir])
        return int(r.stdout) if r.stdout.strip().isdigit() else None

    def follow(self, host: Host, job_dir: str, offset: int, idle_timeout: float) -> Stream:
        """``out`` from byte `offset` (0-based) until the job is over."""
        argv = ["sh", "-c", FOLLOW, "sh", job_dir, str(offset + 1)]
        return self.pool.stream(host.ip, host.port, argv, idle_timeout=idle_timeout)

    def catch_up(self, host: Host, job_dir: str, offset: int, idle_timeout: float) -> CaughtUp:
        """The bytes of ``out`` from `offset` (0-based) that are there now, when at least
        CATCH_UP_MIN are and the master has zstd; else none (FOLLOW streams them)."""
        argv = ["sh", "-c", CATCH_UP, "sh", job_dir, str(offset + 1), str(CATCH_UP_MIN)]
        return CaughtUp(self.pool.stream(host.ip, host.port, argv, idle_timeout=idle_timeout))

    def status(self, host: Host, job_dir: str, pid: int | None) -> Status:
        r = self._run(host, ["sh", "-c", STATUS, "sh", job_dir, str(pid or "")])
        try:
            if r.exit_code != 0:
                raise ValueError(f"status check exited {r.exit_code}")
            return Status.parse(r.stdout.decode(errors="replace"))
        except ValueError as e:  # a broken answer: retried like a lost link
            raise Unreachable(SSHReason.SSH_ERROR, str(e)) from None

    def terminate(self, host: Host, pid: int, grace_s: float) -> str:
        """TERM the process group, KILL after `grace_s` -> "gone" | "terminated" | "killed"."""
        ticks = str(math.ceil(grace_s * 10))
        r = self._run(host, ["sh", "-c", TERMINATE, "sh", str(pid), ticks], extra=grace_s)
        return r.stdout.decode(errors="replace").strip()

    def remove(self, host: Host, job_dir: str) -> None:
        self._run(host, ["rm", "-rf", "--", job_dir])

    def roll_call(
        self, host: Host, job_id: str, sample_s: float, bound_s: float, tools: Sequence[str]
    ) -> str:
        """The ROLL_CALL script's answer on `host` (its tools bounded by `bound_s`)."""
        argv = ["sh", "-c", ROLL_CALL, "sh", f"{sample_s:g}", f"{bound_s:g}", " ".join(tools)]
        stdin = f"{job_id}\n".encode()
        r = self.pool.run(host.ip, host.port, argv, stdin=stdin, timeout=sample_s + bound_s + 5)
        if r.exit_code != 0:
            detail = r.stderr.decode(errors="replace").strip()[:300]
            raise ValueError(f"the roll-call script exited {r.exit_code}: {detail}")
        return r.stdout.decode(errors="replace")

    def _sweep_one(
        self, host: Host, job_id: str, mode: str, option: str = "", value: str = ""
    ) -> list[bytes]:
        stdin = f"{job_id}\n{option}\n{value}\n".encode()
        return self._run(host, ["sh", "-c", SWEEP, "sh", mode], stdin).stdout.split()

    def proxy_values(self, host: Host, job_id: str, option: str) -> list[str]:
        """The values of `option` on the command lines of the job's marked processes on
        `host` (Hydra: the --control-port its remote proxies carry instead of a marker)."""
        return sorted({v.decode() for v in self._sweep_one(host, job_id, "values", option)})

    def sweep(
        self, job_id: str, hosts: Iterable[Host], proxies: tuple[str, Sequence[str]] | None = None
    ) -> str:
        """Kill, then look for, processes marked with the job on every host -> summary.
        `proxies`: (option, values) marking processes that carry no marker."""
        hosts = list(hosts)
        option, values = proxies or ("", ())

        def marked(host: Host, mode: str) -> list[bytes]:
            found = self._sweep_one(host, job_id, mode)
            for value in values:
                found += self._sweep_one(host, job_id, mode, option, value)
            return found

        def one(host: Host) -> tuple[str, list[bytes], list[bytes], str | None]:
            try:
                left = marked(host, "kill")
                killed = list(left)
                # A KILLed process is gone only once the kernel has run it again (a
                # while on a busy host), and one may have forked meanwhile: look
                # again, and KILL again what is still marked, until nothing is.
                for pause in SWEEP_SETTLE_S:
                    if not left:
                        break
                    time.sleep(pause)
                    left = marked(host, "kill")
                    killed += [p for p in left if p not in killed]
                return host.ip, killed, left, None
            except SSHError as e:
                return host.ip, [], [], e.reason

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(hosts) or 1)) as ex:
            results = list(ex.map(one, hosts))
        return sweep_summary(len(hosts), results)


def sweep_summary(
    n_hosts: int, results: list[tuple[str, list[bytes], list[bytes], str | None]]
) -> str:
    notes = [
        f"{ip}: killed {len(k)} leftover process(es)"
        for ip, k, left, _ in results
        if k and not left
    ]
    notes += [f"{ip}: {len(left)} process(es) still there" for ip, _, left, _ in results if left]
    notes += [f"{ip}: not checked ({err})" for ip, _, _, err in results if err]
    clean = all(not left and not err for _, _, left, err in results)
    verdict = f"verified no process left on {n_hosts} host(s)" if clean else "NOT verified clean"
    return verdict + "".join(f"; {note}" for note in notes)
