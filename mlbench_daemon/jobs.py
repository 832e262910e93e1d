"""Job lifecycle: validate a request, choose nodes and master, build the mpirun
argv, launch it detached on the master, follow its output, cancel, re-attach.

Remote side (all over ``ssh.Pool``; every remote command is an argv list that
the pool quotes with ``shlex.join``; the shell scripts below are constants and
receive request data only as positional parameters or on stdin):

- job dir ``<mpi.remote_dir>/<id>`` under the cluster user's home on the
  master, created with umask 077;
- launch: one ``run`` writes stdin (``NAME='value'`` lines: the request's env
  plus the job marker ``OMPI_MCA_mlbench_job_id=<id>``) into ``env`` and
  starts ``setsid sh -c WRAPPER sh <mpirun argv...>`` with output to ``out``;
  the wrapper exports and deletes ``env``, runs mpirun and writes its exit
  status to ``rc``.  The pid (= process group, session) goes to ``pid`` and
  back to us.  Env values therefore reach mpirun through its environment and
  the ranks through ``-x NAME``; they are never in any argv;
- follow: ``tail -F out`` (checking every 10 ms) from the local log size,
  until ``flock -s lock`` returns (the wrapper, which holds the lock, has
  exited), so output lands in the log as it is written and the end is seen
  within 10 ms; on a dropped link the follower reconnects with backoff and
  resumes from the local log size.  When tail ends, a status check reads ``rc``;
- cancel: TERM to the process group, ``mpi.cancel_grace_s``, then KILL; then
  every host of the job is swept for processes carrying the job marker
  (mpirun/ranks in their environment, orted on its command line, where
  OpenMPI passes ``OMPI_MCA_*`` variables as ``-mca`` options); any found are
  killed and the sweep is repeated; the result is recorded in ``error``.

API contract (used by api.py):

    submit(body) -> job dict        (raises BadRequest/Conflict/Unavailable/QueueFull)
    wait(id, timeout=None) -> job dict with "response" (the whole log) after master_name
    wait_json(id, timeout=None) -> the same as JSON, an iterator of bytes (streamed)
    get(id), list(limit, offset), cancel(id), read_log(id, offset, limit) -> (bytes, next)
    follow_log(id, offset) -> iterator of bytes chunks until the job ends

``submit`` never blocks on the job; a request with ``wait`` true (the default)
is answered with ``wait_json(job["id"])``.  ``body.get("wait", True)`` is a bool
once ``submit`` has accepted the body.
"""

import codecs
import collections
import concurrent.futures
import json
import logging
import math
import re
import shlex
import threading
import time
from collections.abc import Callable

from mlbench_daemon import metrics
from mlbench_daemon.discovery import Selector, natural_key
from mlbench_daemon.errors import BadRequest, Conflict, NotFound, QueueFull, Unavailable
from mlbench_daemon.nodes import iso
from mlbench_daemon.ssh import SSHError
from mlbench_daemon.store import FINAL_STATES

log = logging.getLogger(__name__)

FIELDS = ("program", "env", "np", "selector", "nodes", "master", "timeout_s", "wait")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MARKER = "OMPI_MCA_mlbench_job_id"  # OpenMPI hands OMPI_MCA_* to ranks and to every orted
MAX_REQUEST_BYTES = 256 * 1024  # program + env, well under the kernel's argv/env limits
LOG_CHUNK_MAX = 1 << 20
FOLLOW_IDLE_S = 30.0  # a silent stream's master is probed after this long (a frozen host noticed)
BACKOFF_S = (0.5, 5.0)

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
# -> "done RC SIZE" | "running - SIZE" | "gone - SIZE" | "missing"
STATUS = """cd "$1" 2>/dev/null || { echo missing; exit 0; }
s=$(stat -c %s out 2>/dev/null || echo 0)
if [ -s rc ]; then echo "done $(cat rc) $s"
elif [ -n "$2" ] && kill -0 "-$2" 2>/dev/null; then echo "running - $s"
else echo "gone - $s"; fi
"""
PIDFILE = 'cat "$1/pid" 2>/dev/null || true'
# $1 = process group, $2 = grace in 0.1 s ticks -> "gone" | "terminated" | "killed"
TERMINATE = """kill -TERM "-$1" 2>/dev/null || { echo gone; exit 0; }
i=0
while kill -0 "-$1" 2>/dev/null; do
  if [ "$i" -ge "$2" ]; then kill -KILL "-$1" 2>/dev/null; echo killed; exit 0; fi
  sleep 0.1; i=$((i+1))
done
echo terminated
"""
# The job id comes on stdin, so no sweeping process carries it.  Prints the pids of
# the cluster user's processes marked with it; with $1 = kill, KILLs them first.
SWEEP = """read -r id
nl='
'
found=
for d in /proc/[0-9]*; do
  [ -O "$d" ] || continue
  c=$(tr '\\0' '\\n' < "$d/environ" 2>/dev/null; tr '\\0' '\\n' < "$d/cmdline" 2>/dev/null)
  case "$c" in
    *"mlbench_job_id=$id$nl"*|*"mlbench_job_id$nl$id$nl"*) found="$found ${d#/proc/}";;
  esac
done
if [ "$1" = kill ] && [ -n "$found" ]; then kill -KILL $found 2>/dev/null; fi
echo $found
"""


class _Stopped(Exception):
    """The daemon is stopping: leave the remote job running and its record as it is."""


class _MasterLost(Exception):
    """The master stayed unreachable for mpi.lost_after_s: record the job lost."""


class _Live:
    """In-memory state of a job that is not final yet."""

    def __init__(self, job_id, env=None, master=None, program=None, np=None, candidates=()):
        self.id = job_id
        self.env = env or {}  # values; dropped once the job is launched
        self.master = master  # requested master name, or None
        self.program, self.np, self.candidates = program, np, list(candidates)
        self.cancel_reason = None
        self.killing = False
        self.killed = threading.Event()  # the kill and the sweep of every host are over
        self.stream = None
        self.timer = None
        self.reattached = False
        self.names = None  # node names, for a job queued again after a restart
        self.done = threading.Event()


class Jobs:
    def __init__(self, cfg, registry, pool, store, clock=time.monotonic):
        self.cfg, self.registry, self.pool, self.store, self.clock = (
            cfg,
            registry,
            pool,
            store,
            clock,
        )
        self.mpi = cfg.mpi
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # log appends and state changes
        self._live = {}
        self._queue = collections.deque()
        self._active = 0
        self._stop = threading.Event()
        self._threads = []

    # --- lifecycle --------------------------------------------------------------------

    def start(self):
        """Take up the jobs a previous run left pending or running.

        Launched jobs are re-attached and count against max_concurrent_jobs at once.
        Jobs still queued are queued again, in order, from their stored request,
        unless they had env values, which are never stored: those become lost.
        Followers and launches wait for the registry's first probe pass (bounded),
        so a backlog of output is caught up on open connections, not against the
        start-up handshakes, and queued jobs see which nodes are Running."""
        for rec in self.store.running():
            live = _Live(rec["id"])
            live.reattached = True
            if rec["state"] == "pending" and not rec["master_name"]:
                req = rec["request"]
                if rec["env_names"] or not req:
                    self._finish(
                        live,
                        "lost",
                        reason="daemon-restarted",
                        error=(
                            "the daemon restarted before the job was launched, and env values are never "
                            "stored: submit it again"
                            if rec["env_names"]
                            else "the daemon restarted before the job was launched"
                        ),
                    )
                    continue
                live.program, live.np, live.master, live.names = (
                    req["program"],
                    req["np"],
                    req["master"],
                    req["nodes"],
                )
                with self._lock:
                    self._admit(live)
            else:
                with self._lock:
                    self._live[live.id] = live
                    self._active += 1
                self._spawn(live)

    def stop(self, timeout=10.0):
        """Stop following (remote jobs keep running; a restart re-attaches)."""
        self._stop.set()
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            if live.timer:
                live.timer.cancel()
            if live.stream:
                live.stream.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._changed:
            self._changed.notify_all()

    # --- requests ---------------------------------------------------------------------

    def submit(self, body):
        req = validate(body, self.mpi.program)
        nodes, master = self._choose(req)
        env_names = sorted(req["env"])
        live = _Live(
            None,
            env=req["env"],
            master=master,
            program=req["program"],
            np=req["np"],
            candidates=[s.node for s in nodes],
        )
        timeout_s = req["timeout_s"] or self.mpi.default_timeout_s or None
        with self._lock:
            if (
                self._active >= self.mpi.max_concurrent_jobs
                and len(self._queue) >= self.mpi.queue_size
            ):
                raise QueueFull(
                    f"{self._active} job(s) running and {len(self._queue)} queued; try later"
                )
            rec = self.store.create(
                nodes=[node_row(s.node) for s in nodes],
                np=req["np"],
                timeout_s=timeout_s,
                env_names=env_names,
                request={
                    "program": req["program"],
                    "np": req["np"],
                    "master": master,
                    "nodes": [s.node.name for s in nodes],
                },
                command=self.mpirun_argv(
                    [s.node for s in nodes], req["np"], env_names, req["program"]
                ),
            )
            live.id = rec["id"]
            self._admit(live)
        log.info("job %s submitted: %d node(s), env %s", live.id, len(nodes), env_names)
        return self.to_json(rec)

    def counts(self):
        """{state: number of jobs}, for metrics and the status line."""
        return self.store.count_by_state()

    def get(self, job_id):
        return self.to_json(self._record(job_id))

    def list(self, limit=50, offset=0):
        for name, v in (("limit", limit), ("offset", offset)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(f"{name} must be an integer >= 0", field=name)
        return [self.to_json(r) for r in self.store.list(min(limit, 1000), offset)]

    def wait(self, job_id, timeout=None):
        """Block until the job is final (or `timeout`); the job dict with "response"."""
        return json.loads(b"".join(self.wait_json(job_id, timeout)))

    def wait_json(self, job_id, timeout=None):
        """wait() as JSON: blocks until the job is final (or `timeout`), then returns an
        iterator of bytes pieces of the document.  The log is read, decoded and escaped
        a chunk at a time, so a sync request for a job that wrote gigabytes never holds
        its output in memory; the bytes are the same as json.dumps of wait()'s dict."""
        self._record(job_id)
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            live.done.wait(timeout)
        job = self.to_json(self._record(job_id))
        return self._json_with_response(job, self.store.log_size(job_id))

    def _json_with_response(self, job, size):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = lambda s: json.dumps(s)[1:-1].encode()  # noqa: E731 - a JSON string's inside
        sep = b"{"
        for k, v in job.items():
            yield sep + json.dumps(k).encode() + b": " + json.dumps(v).encode()
            sep = b", "
            if k == "master_name":
                yield b', "response": "'
                offset = 0
                while offset < size:
                    data, offset = self.store.read_log(
                        job["id"], offset, min(LOG_CHUNK_MAX, size - offset)
                    )
                    if not data:
                        break
                    yield text(decoder.decode(data))
                yield text(decoder.decode(b"", final=True)) + b'"'
        yield b"}"

    def read_log(self, job_id, offset=0, limit=65536):
        self._record(job_id)
        for name, v in (("offset", offset), ("limit", limit)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(f"{name} must be an integer >= 0", field=name)
        return self.store.read_log(job_id, offset, min(limit, LOG_CHUNK_MAX))

    def follow_log(self, job_id, offset=0, gone: Callable[[], bool] | None = None):
        """Yield output from `offset` as it arrives, until the job is final and all is read,
        or until `gone()` (the reader went away: checked every second while nothing comes)."""
        self.read_log(job_id, offset, 0)  # validates
        while True:
            final = (
                self.store.get(job_id)["state"] in FINAL_STATES
            )  # before the read: then nothing is missed
            data, offset = self.store.read_log(job_id, offset, LOG_CHUNK_MAX)
            if data:
                yield data
                continue
            if final or self._stop.is_set() or (gone is not None and gone()):
                return
            with self._changed:
                if self.store.log_size(job_id) <= offset:
                    self._changed.wait(5.0 if gone is None else 1.0)

    def cancel(self, job_id):
        rec = self._record(job_id)
        if rec["state"] in FINAL_STATES:
            raise Conflict(f"job {job_id} is already {rec['state']}")
        with self._lock:
            live = self._live.get(job_id)
        if live is None:
            raise Conflict(f"job {job_id} is not followed by this daemon")
        if self._terminate(live, "cancelled") is False:
            raise Unavailable(f"job {job_id}: " + self.store.get(job_id)["error"])
        live.done.wait(self.mpi.cancel_grace_s + 4 * self._ssh_timeout())
        return self.get(job_id)

    # --- choosing ----------------------------------------------------------------------

    def _choose(self, req):
        statuses = self.registry.nodes(req["selector"])
        by_name = {s.node.name: s for s in statuses}
        if req["nodes"]:
            unknown = [n for n in req["nodes"] if n not in by_name]
            if unknown:
                raise Conflict(
                    f"unknown node(s) (or not matching the selector): {', '.join(unknown)}",
                    field="nodes",
                )
            down = [by_name[n] for n in req["nodes"] if by_name[n].phase != "Running"]
            if down:
                raise Conflict(
                    "node(s) not Running: "
                    + ", ".join(f"{s.node.name} ({s.phase}: {s.reason})" for s in down),
                    field="nodes",
                )
            chosen = sorted(
                (by_name[n] for n in req["nodes"]), key=lambda s: natural_key(s.node.name)
            )
        else:
            chosen = [s for s in statuses if s.phase == "Running"]
        master = req["master"]
        if master is not None and master not in [s.node.name for s in chosen]:
            if req["nodes"]:
                raise BadRequest("master must be one of nodes", field="master")
            s = by_name.get(master)
            raise Conflict(
                f"master {master}: "
                + (f"not Running ({s.phase}: {s.reason})" if s else "unknown node"),
                field="master",
            )
        if not chosen:
            raise Unavailable(
                "no Running node matches the selector"
                + (f" ({len(statuses)} node(s) known, none Running)" if statuses else "")
            )
        return chosen, master

    def mpirun_argv(self, nodes, np, env_names, program):
        argv = [self.mpi.mpirun, *self.mpi.args]
        for name in env_names:
            argv += ["-x", name]
        argv += ["--host", ",".join(host_spec(n) for n in nodes)]
        if np:
            argv += ["-np", str(np)]
        return argv + list(program)

    # --- running -----------------------------------------------------------------------

    def _admit(self, live):
        """Run `live` now if a slot is free, else queue it (the caller holds self._lock)."""
        self._live[live.id] = live
        if self._active < self.mpi.max_concurrent_jobs:
            self._active += 1
            self._spawn(live)
        else:
            self._queue.append(live)

    def _spawn(self, live):
        t = threading.Thread(target=self._run, args=(live,), name=f"job-{live.id}", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _release(self):
        with self._lock:
            if self._queue and not self._stop.is_set():
                self._spawn(self._queue.popleft())
            else:
                self._active -= 1

    def _run(self, live):
        try:
            if live.reattached:
                self.registry.wait_first_pass(self.cfg.discovery.timeout_s + self._ssh_timeout())
            rec = self.store.get(live.id)
            if rec["pid"] is None:
                rec = self._launch(live, rec)
                if rec is None:
                    return
            self._arm_timeout(live, rec)
            if live.cancel_reason:
                self._kill(live)
            self._finish_from(live, self._follow(live))
        except _Stopped:
            pass
        except _MasterLost as e:
            self._finish(live, "lost", reason="master-unreachable", error=str(e))
        except Exception as e:  # a bug must not leave a job running forever in the table
            log.exception("job %s: follower failed", live.id)
            self._finish(live, "lost", reason="daemon-error", error=f"{type(e).__name__}: {e}")
        finally:
            if live.timer:
                live.timer.cancel()
            self._release()

    def _launch(self, live, rec):
        """Pre-flight a master, start the job detached; the updated record, or None if it ended."""
        if rec["master_name"]:  # a previous run died while launching: did the job start?
            return self._relaunched(live, rec)
        if live.cancel_reason:
            self._finish(live, "cancelled", reason=live.cancel_reason)
            return None
        failed, master = [], None
        if live.names is not None:  # queued before a restart: its nodes as they are now
            now = {s.node.name: s for s in self.registry.nodes()}
            running = [n for n in live.names if n in now and now[n].phase == "Running"]
            live.candidates = [now[n].node for n in running]
            failed = [f"{n}: not Running after the restart" for n in live.names if n not in running]
        nodes = list(live.candidates)
        order = sorted(nodes, key=lambda n: n.name != live.master)  # requested master first
        for node in order:
            why = self._preflight(node)
            if why is None:
                master = node
                break
            log.warning(
                "job %s: master candidate %s failed pre-flight: %s", live.id, node.name, why
            )
            failed.append(f"{node.name}: {why}")
            nodes.remove(node)
        if master is None:
            self._finish(live, "failed", reason="no-usable-master", error="; ".join(failed))
            return None
        command = self.mpirun_argv(nodes, live.np, sorted(live.env), live.program)
        job_dir = f"{self.mpi.remote_dir.rstrip('/')}/{live.id}"
        rec = self.store.update(
            live.id,
            master_name=master.name,
            master_ip=master.ip,
            master_port=master.port,
            nodes=[node_row(n) for n in nodes],
            command=command,
            remote_dir=job_dir,
            error=("; ".join(failed) or None),
        )
        env = "".join(f"{k}={shlex.quote(v)}\n" for k, v in {**live.env, MARKER: live.id}.items())
        live.env = None
        try:
            r = self.pool.run(
                master.ip,
                master.port,
                ["sh", "-c", LAUNCH, "sh", WRAPPER, job_dir, *command],
                stdin=env.encode(),
                timeout=self._ssh_timeout(),
            )
        except SSHError as e:
            # the job may have started and only the answer was lost: its pid file tells
            log.warning(
                "job %s: no answer from the launch on %s (%s); asking for its pid file",
                live.id,
                master.name,
                e,
            )
            pid = self._confirmed_pid(live, master.ip, master.port, job_dir)
            why = f"{e.reason}: {e}; the master has no record of the job"
        else:
            pid = int(r.stdout.split()[-1]) if r.exit_code == 0 and r.stdout.split() else None
            why = f"launch exited {r.exit_code}: {r.stderr.decode(errors='replace').strip()[:500]}"
        if pid is None:
            self._finish(live, "failed", reason="launch-failed", error=why)
            return None
        log.info("job %s: started on %s as process group %d", live.id, master.name, pid)
        return self._running(live, pid)

    def _confirmed_pid(self, live, ip, port, job_dir):
        """The pid a launch wrote on the master, or None if it wrote none.  While the
        master cannot be asked, the job stays pending and we keep asking (a job that
        may be running is never recorded as failed); a stop leaves it for the next run."""
        backoff, down_since = BACKOFF_S[0], time.monotonic()
        while True:
            try:
                r = self.pool.run(
                    ip, port, ["sh", "-c", PIDFILE, "sh", job_dir], timeout=self._ssh_timeout()
                )
                return int(r.stdout) if r.stdout.strip().isdigit() else None
            except SSHError as e:
                self._check_reachable(down_since, e)
                log.warning(
                    "job %s: cannot read the pid file on %s: %s; retrying in %.1f s",
                    live.id,
                    ip,
                    e,
                    backoff,
                )
            if self._stop.wait(backoff):
                raise _Stopped()
            backoff = min(backoff * 2, BACKOFF_S[1])

    def _relaunched(self, live, rec):
        pid = self._confirmed_pid(live, rec["master_ip"], rec["master_port"], rec["remote_dir"])
        if pid is None:
            self._finish(
                live,
                "lost",
                reason="launch-interrupted",
                error="the daemon restarted while launching; no job process was recorded",
            )
            return None
        return self._running(live, pid)

    def _running(self, live, pid):
        with self._lock:
            rec = self.store.update(live.id, state="running", pid=pid, started=time.time())
            self._changed.notify_all()
        return rec

    def _preflight(self, node):
        """None if `node` can run mpirun now, else why not."""
        try:
            r = self.pool.run(
                node.ip, node.port, ["command", "-v", self.mpi.mpirun], timeout=self._ssh_timeout()
            )
        except SSHError as e:
            return f"{e.reason}: {e}"
        return None if r.exit_code == 0 else f"{self.mpi.mpirun} not found"

    def _check_reachable(self, down_since, error):
        """Raise _MasterLost once the master has been unreachable for mpi.lost_after_s."""
        limit = self.mpi.lost_after_s
        if limit and time.monotonic() - down_since >= limit:
            raise _MasterLost(
                f"the master was unreachable for {limit:g} s ({error}); the job may "
                "still be running there, unobserved"
            )

    def _ssh_timeout(self):
        return self.cfg.ssh.connect_timeout_s + 10

    def _arm_timeout(self, live, rec):
        if rec["timeout_s"]:
            left = max(0.0, rec["started"] + rec["timeout_s"] - time.time())
            live.timer = threading.Timer(left, self._terminate, (live, "timeout"))
            live.timer.daemon = True
            live.timer.start()

    def _follow(self, live):
        """Stream the remote output into the log until the job is over -> STATUS words."""
        rec = self.store.get(live.id)
        ip, port, job_dir, pid = rec["master_ip"], rec["master_port"], rec["remote_dir"], rec["pid"]
        backoff, down_since = BACKOFF_S[0], None
        while True:
            if self._stop.is_set():
                raise _Stopped()
            offset = self.store.log_size(live.id)
            try:
                live.stream = self.pool.stream(
                    ip,
                    port,
                    ["sh", "-c", FOLLOW, "sh", job_dir, str(offset + 1)],
                    idle_timeout=FOLLOW_IDLE_S,
                )
                down_since = None  # the master answered
                with self.store.log_writer(live.id) as log_file:
                    for chunk in live.stream:
                        log_file.write(chunk)
                        with self._changed:
                            self._changed.notify_all()
                        backoff = BACKOFF_S[0]
                status = self._status(ip, port, job_dir, pid)
            except SSHError as e:
                if self._stop.is_set():
                    raise _Stopped() from None
                down_since = down_since or time.monotonic()
                self._check_reachable(down_since, e)
                log.warning(
                    "job %s: following on %s: %s; retrying in %.1f s", live.id, ip, e, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            finally:
                live.stream = None
            if status[0] == "missing" or (
                status[0] != "running" and int(status[2]) <= self.store.log_size(live.id)
            ):
                return status
            if status[0] == "running":
                self._stop.wait(backoff)  # the stream ended early: go again, without spinning

    def _status(self, ip, port, job_dir, pid):
        r = self.pool.run(
            ip,
            port,
            ["sh", "-c", STATUS, "sh", job_dir, str(pid or "")],
            timeout=self._ssh_timeout(),
        )
        words = r.stdout.decode(errors="replace").split()
        if r.exit_code != 0 or not words:
            raise SSHError("ssh-error", f"status check exited {r.exit_code}")
        return words

    def _finish_from(self, live, status):
        rec = self.store.get(live.id)
        rc = int(status[1]) if status[0] == "done" and status[1].lstrip("-").isdigit() else None
        if live.cancel_reason:
            # "cancelled" promises no process is left: let the sweep of every host finish
            live.killed.wait(self.mpi.cancel_grace_s + 3 * self._ssh_timeout())
            self._finish(live, "cancelled", exit_code=rc, reason=live.cancel_reason)
        elif status[0] == "missing":
            self._finish(
                live,
                "lost",
                reason="remote-record-missing",
                error=f"job directory {rec['remote_dir']} is gone from {rec['master_name']}",
            )
        elif rc is None:
            self._finish(
                live,
                "lost",
                reason="no-exit-status",
                error="the job's processes are gone and left no exit status",
            )
        else:
            self._finish(live, "succeeded" if rc == 0 else "failed", exit_code=rc)
        try:
            self.pool.run(
                rec["master_ip"],
                rec["master_port"],
                ["rm", "-rf", "--", rec["remote_dir"]],
                timeout=self._ssh_timeout(),
            )
        except SSHError as e:
            log.warning(
                "job %s: could not remove %s on %s: %s",
                live.id,
                rec["remote_dir"],
                rec["master_name"],
                e,
            )

    def _finish(self, live, state, **fields):
        self.store.sync_log(live.id)
        with self._lock:
            rec = self.store.update(live.id, state=state, finished=time.time(), **fields)
            self._live.pop(live.id, None)
            self._changed.notify_all()
        live.done.set()
        if rec["started"]:
            metrics.job_duration_seconds.observe(rec["finished"] - rec["started"])
        log.info("job %s: %s %s", live.id, state, fields or "")

    # --- cancel ------------------------------------------------------------------------

    def _terminate(self, live, reason):
        """Cancel a job in any stage (the runner records the final state); False if the
        master could not be reached (a timeout then retries later)."""
        with self._lock:
            if live.cancel_reason or live.done.is_set():
                return
            live.cancel_reason = reason
            queued = live in self._queue
            if queued:
                self._queue.remove(live)
        if queued:
            self._finish(live, "cancelled", reason=reason)
            return
        if self.store.get(live.id)["pid"] is not None:
            return self._kill(live)  # else the runner kills right after launching

    def _kill(self, live):
        """TERM, grace, KILL the job's process group, then sweep every host; False if
        the master could not be reached (the cancel is then withdrawn)."""
        with self._lock:
            if live.killing:
                return True
            live.killing = True
            live.killed.clear()  # a retry after an undelivered cancel
        try:
            return self._kill_and_sweep(live)
        finally:
            live.killed.set()

    def _kill_and_sweep(self, live):
        rec = self.store.get(live.id)
        ticks = math.ceil(self.mpi.cancel_grace_s * 10)
        try:
            r = self.pool.run(
                rec["master_ip"],
                rec["master_port"],
                ["sh", "-c", TERMINATE, "sh", str(rec["pid"]), str(ticks)],
                timeout=self.mpi.cancel_grace_s + self._ssh_timeout(),
            )
        except SSHError as e:
            reason = live.cancel_reason
            with self._lock:
                live.cancel_reason, live.killing = None, False
            self.store.update(live.id, error=f"{reason} not delivered to {rec['master_name']}: {e}")
            log.warning("job %s: %s not delivered: %s", live.id, reason, e)
            if reason == "timeout" and not self._stop.is_set():
                live.timer = threading.Timer(BACKOFF_S[1], self._terminate, (live, "timeout"))
                live.timer.daemon = True
                live.timer.start()
            return False
        how = r.stdout.decode(errors="replace").strip()
        msg = f"{live.cancel_reason}: process group {how}; " + self._sweep(live.id, rec["nodes"])
        log.info("job %s: %s", live.id, msg)
        self.store.update(live.id, error=msg)
        return True

    def _sweep(self, job_id, rows):
        """Kill and then look for processes marked with the job on every host -> summary."""
        ports = {s.node.ip: s.node.port for s in self.registry.nodes()}
        ips = [row[0] for row in rows]

        def sweep(ip):
            port = ports.get(ip, self.cfg.ssh.port)
            try:
                killed = self._sweep_one(ip, port, job_id, "kill")
                left = self._sweep_one(ip, port, job_id, "list") if killed else []
                return ip, killed, left, None
            except SSHError as e:
                return ip, [], [], e.reason

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(ips) or 1)) as ex:
            results = list(ex.map(sweep, ips))
        notes = [
            f"{ip}: killed {len(k)} leftover process(es)"
            for ip, k, left, err in results
            if k and not left
        ]
        notes += [
            f"{ip}: {len(left)} process(es) still there" for ip, k, left, err in results if left
        ]
        notes += [f"{ip}: not checked ({err})" for ip, k, left, err in results if err]
        clean = all(not left and not err for ip, k, left, err in results)
        verdict = (
            f"verified no process left on {len(ips)} host(s)" if clean else "NOT verified clean"
        )
        return verdict + "".join(f"; {n}" for n in notes)

    def _sweep_one(self, ip, port, job_id, mode):
        r = self.pool.run(
            ip,
            port,
            ["sh", "-c", SWEEP, "sh", mode],
            stdin=f"{job_id}\n".encode(),
            timeout=self._ssh_timeout(),
        )
        return r.stdout.split()

    # --- shapes ------------------------------------------------------------------------

    def _record(self, job_id):
        rec = self.store.get(job_id) if isinstance(job_id, str) and job_id.isalnum() else None
        if rec is None:
            raise NotFound(f"no job {job_id!r}")
        return rec

    @staticmethod
    def to_json(rec):
        """The API's job dict: the seed's keys first."""
        return {
            "nodes": rec["nodes"],
            "command": str(rec["command"]),
            "master_name": rec["master_name"],
            "id": rec["id"],
            "state": rec["state"],
            "exit_code": rec["exit_code"],
            "created": iso(rec["created"]),
            "started": iso(rec["started"]),
            "finished": iso(rec["finished"]),
            "error": rec["error"],
            "reason": rec["reason"],
            "np": rec["np"],
            "timeout_s": rec["timeout_s"],
            "env": {name: "***" for name in rec["env_names"]},
            "log_bytes": rec["log_bytes"],
        }


def node_row(node):
    return [node.ip, node.namespace, node.name, node.labels_str]


def host_spec(node):
    slots = node.labels.get("slots", "")
    return f"{node.ip}:{int(slots)}" if slots.isdigit() and int(slots) > 0 else node.ip


def _text(value, field):
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", field=field)
    if "\0" in value:
        raise BadRequest(f"{field} must not contain NUL bytes", field=field)
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} must be valid Unicode text (no lone surrogates)", field=field
        ) from None


def validate(body, default_program):
    """Check a request body -> dict of every field with defaults; BadRequest names the field."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", field="body")
    for key in body:
        if key not in FIELDS:
            raise BadRequest(
                f"unknown field {key!r} (known: {', '.join(FIELDS)})", field=str(key) or "body"
            )
    req = {
        "program": list(default_program),
        "env": {},
        "np": None,
        "selector": None,
        "nodes": None,
        "master": None,
        "timeout_s": None,
        "wait": True,
    }
    size = 0
    if "program" in body:
        prog = body["program"]
        if not isinstance(prog, list) or not prog:
            raise BadRequest(
                "program must be a non-empty list of strings (an argv)", field="program"
            )
        size += sum(_text(a, "program") for a in prog)
        if not prog[0] or prog[0].startswith("-"):
            raise BadRequest(
                "program[0] must be a program, not empty or an option", field="program"
            )
        if ":" in prog:  # mpirun takes a lone ":" anywhere as its MPMD separator
            raise BadRequest(
                'program must not contain a lone ":" argument (mpirun reserves it)', field="program"
            )
        req["program"] = list(prog)
    if "env" in body:
        env = body["env"]
        if not isinstance(env, dict):
            raise BadRequest("env must be an object of name -> string", field="env")
        for name, value in env.items():
            if not ENV_NAME.match(name):
                raise BadRequest(
                    f"env name {name[:64]!r} must match [A-Za-z_][A-Za-z0-9_]*", field="env"
                )
            if name.startswith("OMPI_MCA_mlbench"):
                raise BadRequest(f"env name {name[:64]!r} is reserved for the daemon", field="env")
            size += len(name) + _text(value, "env")
        req["env"] = dict(env)
    if size > MAX_REQUEST_BYTES:
        raise BadRequest(
            f"program and env together must stay under {MAX_REQUEST_BYTES} bytes",
            field="env" if "env" in body else "program",
        )
    if "np" in body:
        np = body["np"]
        if isinstance(np, float) and np.is_integer():  # JSON has one number type: 4.0 is 4
            np = int(np)
        if isinstance(np, bool) or not isinstance(np, int) or not 1 <= np <= 1_000_000:
            raise BadRequest("np must be an integer >= 1", field="np")
        req["np"] = np
    if "selector" in body:
        _text(body["selector"], "selector")
        try:
            req["selector"] = Selector.parse(body["selector"])
        except ValueError as e:
            raise BadRequest(f"selector: {e}", field="selector") from None
    if "nodes" in body:
        nodes = body["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise BadRequest("nodes must be a non-empty list of node names", field="nodes")
        for n in nodes:
            _text(n, "nodes")
        if len(set(nodes)) != len(nodes):
            raise BadRequest("nodes must not repeat a name", field="nodes")
        req["nodes"] = list(nodes)
    if "master" in body:
        _text(body["master"], "master")
        req["master"] = body["master"]
    if "timeout_s" in body:
        t = body["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1e9:
            raise BadRequest("timeout_s must be a number > 0", field="timeout_s")
        req["timeout_s"] = float(t)
    if "wait" in body:
        if not isinstance(body["wait"], bool):
            raise BadRequest("wait must be true or false", field="wait")
        req["wait"] = body["wait"]
    return req
