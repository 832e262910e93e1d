"""The job API (what api/ calls): submit, read, wait, cancel; slots and the FIFO queue.

    submit(body, by=None) -> job dict   (raises BadRequest/Conflict/Unavailable/QueueFull;
                                         `by`: the submitting token's name)
    wait(id, timeout=None) -> job dict with "response" (the whole log) after master_name
    wait_json(id, timeout=None) -> the same as JSON, an iterator of bytes (streamed)
    get(id), list(limit, offset, **filters), cancel(id, by=None),
    read_log(id, offset, limit) -> (bytes, next)
    follow_log(id, offset) -> iterator of bytes chunks until the job ends
    (both, and log_size(id, rank), take rank=N: one rank's log of a rank_output job)

``submit`` never blocks on the job; a request with ``wait`` true (the default) is
answered with ``wait_json(job["id"])``.  At most ``mpi.max_concurrent_jobs`` jobs
run at once (each in its own thread, a ``JobRun``); up to ``mpi.queue_size`` more
wait in submission order.  A job waiting for nodes an MLBench run holds (``held``) gives
its slot to the next one meanwhile, and takes the next free slot first once they are
free.

Every answer is the job as this daemon knows it (``_view``): a record the state dir
could not take yet is shown with its unwritten fields, ``store_error`` says why, and
``waiting`` what a job that is not final waits for and when it is checked again.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from mlbench_daemon.config import Config
from mlbench_daemon.discovery import Node
from mlbench_daemon.errors import (
    BadRequest,
    Conflict,
    InsufficientStorage,
    NotFound,
    QueueFull,
    Unavailable,
    echo,
)
from mlbench_daemon.jobs import events, flavour
from mlbench_daemon.jobs.clock import Clock
from mlbench_daemon.jobs.placement import (
    Registry,
    choose,
    host_spec,
    master_order,
    mpirun_argv,
    node_row,
)
from mlbench_daemon.jobs.remote import Host, Pool, Remote
from mlbench_daemon.jobs.request import validate
from mlbench_daemon.jobs.rollcall import Coalescer, Target, take
from mlbench_daemon.jobs.run import Cancel, Context, JobRun
from mlbench_daemon.jobs.stall import summary as stall_summary
from mlbench_daemon.jobs.stall import view as stall_view
from mlbench_daemon.shapes import Job, RollCall
from mlbench_daemon.store import LOG_CHUNK_MAX, JobRecord, OutboxRecord, Store, StoreError
from mlbench_daemon.timefmt import iso
from mlbench_daemon.vocabulary import JobReason, JobState, JobWait, StoreReason

log = logging.getLogger(__name__)

FOLLOW_STORE_FAULT_S = 15.0  # a log follower ends once its job's writes failed this long


class Jobs:
    def __init__(
        self, cfg: Config, registry: Registry, pool: Pool, store: Store, clock: Clock | None = None
    ) -> None:
        self.cfg, self.registry, self.store = cfg, registry, store
        self.mpi = cfg.mpi
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # log appends and state changes
        self._live: dict[str, JobRun] = {}
        self._queue: collections.deque[JobRun] = collections.deque()
        self._active = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        ctx = Context(cfg, store, Remote(pool, 0.0), registry, clock or Clock(), self._stop,
                      self._changed, self._live)  # fmt: skip
        ctx.remote.timeout = ctx.ssh_timeout
        ctx.roll_call = self.roll_call  # a stall takes one (coalesced with the API's)
        ctx.leave_slot, ctx.take_slot = self._leave_slot, self._take_slot
        self._rejoining = 0  # jobs whose wait for a run's nodes is over, waiting for a slot
        self._ctx = ctx
        self._roll_calls = Coalescer()
        if cfg.webhooks.hooks:  # every start, end and stall makes its events (jobs/events.py)
            store.watch(events.WATCHED, self._events)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Take up the jobs a previous run left pending or running.

        Launched jobs are re-attached and count against max_concurrent_jobs at once.
        Jobs still queued are queued again, in order, from their stored request,
        unless they had env values, which are never stored: those become lost.
        Followers and launches wait for the registry's first probe pass (bounded),
        so a backlog of output is caught up on open connections, not against the
        start-up handshakes, and queued jobs see which nodes are Running."""
        for rec in self.store.running():
            self._resume(rec)

    def _resume(self, rec: JobRecord) -> None:
        if rec.state != JobState.PENDING or rec.master_name:
            run = JobRun(self._ctx, rec.id, reattached=True)
            with self._lock:
                self._live[run.id] = run
                self._active += 1
            self._spawn(run)
            return
        req = rec.request
        if rec.env_names or not req:
            error = "the daemon restarted before the job was launched"
            if rec.env_names:
                error += ", and env values are never stored: submit it again"
            run = JobRun(self._ctx, rec.id, reattached=True)
            run.finish(JobState.LOST, reason=JobReason.DAEMON_RESTARTED, error=error)
            return
        run = JobRun(
            self._ctx,
            rec.id,
            program=req["program"],
            np=req["np"],
            master=req["master"],
            names=req["nodes"],
            reattached=True,
            rank_output=req.get("rank_output", False),
            apps=[(h, a) for h, a in req.get("apps", ())],
            run_id=rec.run_id,
        )
        with self._lock:
            self._admit(run)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following (remote jobs keep running; a restart re-attaches)."""
        self._stop.set()
        with self._lock:
            runs = list(self._live.values())
        for run in runs:
            run.detach()
        deadline = time.monotonic() + timeout  # real time: these are real threads
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._changed:
            self._changed.notify_all()

    # --- requests ---------------------------------------------------------------------

    def submit(self, body: Any, by: str | None = None) -> dict[str, Any]:
        req = validate(body, self.mpi.program)
        statuses, master = choose(self.registry, req)
        nodes = [s.node for s in statuses]
        env_names = sorted(req.env)
        run = JobRun(
            self._ctx, "", env=req.env, master=master, program=req.program, np=req.np,
            candidates=nodes, rank_output=req.rank_output,
        )  # fmt: skip
        timeout_s = req.timeout_s or self.mpi.default_timeout_s or None
        # the flavour, as far as known before the master is chosen (openmpi4 if not yet)
        known = (self._ctx.flavour_for(n) for n in master_order(nodes, master))
        flavour_name = next((f for f in known if f), "openmpi4")
        command = mpirun_argv(
            self.mpi.mpirun, self.mpi.args, nodes, req.np, env_names, req.program,
            flavour_name, req.rank_output,
        )  # fmt: skip
        request = {
            "program": list(req.program),
            "np": req.np,
            "master": master,
            "nodes": [n.name for n in nodes],
            "stall_after_s": req.stall_after_s,  # None: mpi.stall_after_s when followed
            "rank_output": req.rank_output,
        }
        with self._lock:
            self._check_room()
            rec = self.store.create(
                nodes=[node_row(n) for n in nodes],
                np=req.np,
                timeout_s=timeout_s,
                env_names=env_names,
                request=request,
                command=command,
                submitted_by=by,
                name=req.name,
                tags=list(req.tags),
            )
            run.id = rec.id
            self._admit(run)
        log.info("job %s submitted: %d node(s), env %s", run.id, len(nodes), env_names)
        return self._view(rec)

    def submit_run(
        self,
        run_id: int,
        nodes: Sequence[Node],
        program: Sequence[str],
        apps: Sequence[tuple[str, Sequence[str]]] = (),
        env: Mapping[str, str] | None = None,
        by: str | None = None,
        name: str | None = None,
    ) -> JobRecord:
        """An MLBench run's job (jobs/runs.py), on exactly `nodes` (the first is tried as
        master first): `program` over them, or the MPMD launch `apps` (one process per
        (node ip, argv)).  Its slot and queue are every job's; its `env` values, like a
        request's, are never stored nor shown (names only).  QueueFull as for submit."""
        env = dict(env or {})
        env_names = sorted(env)
        hosts = [host_spec(n) for n in nodes] if not apps else [h for h, _ in apps]
        np = sum(slots for _, slots in flavour.parse_hosts(hosts))
        master = nodes[0].name if nodes else None
        run = JobRun(
            self._ctx, "", env=env, master=master, program=program, np=np, candidates=nodes,
            apps=apps, run_id=run_id,
        )  # fmt: skip
        known = (self._ctx.flavour_for(n) for n in master_order(nodes, master))
        f = flavour.get(next((f for f in known if f), "openmpi4"))
        command = (
            f.mpmd_argv(self.mpi.mpirun, self.mpi.args, apps, env_names)
            if apps
            else mpirun_argv(self.mpi.mpirun, self.mpi.args, nodes, np, env_names, program, f.name)
        )
        request = {
            "program": list(program),
            "np": np,
            "master": master,
            "nodes": [n.name for n in nodes],
            "stall_after_s": None,
            "rank_output": False,
            "apps": [[h, list(a)] for h, a in apps],
        }
        with self._lock:
            self._check_room()
            rec = self.store.create(
                nodes=[node_row(n) for n in nodes], np=np, env_names=env_names,
                request=request, command=command, submitted_by=by, name=name, run_id=run_id,
                timeout_s=self.mpi.default_timeout_s or None,
            )  # fmt: skip
            run.id = rec.id
            self._admit(run)
        log.info("job %s submitted for run %d: %d node(s)", run.id, run_id, len(nodes))
        return rec

    def busy_nodes(self) -> dict[str, str]:
        """{node name: job id} of every node a job not yet final runs on or is placed on
        (queued ones too), so a run is never given a node a job has."""
        with self._lock:
            runs = list(self._live.values())
        out: dict[str, str] = {}
        for run in runs:
            names = [n.name for n in run.candidates] or list(run.names or ())
            if not names and run.id:
                rec = self.store.get(run.id)
                names = [row.name for row in rec.nodes] if rec is not None else []
            for name in names:
                out.setdefault(name, run.id)
        return out

    def set_held(self, held: Callable[[int | None, Sequence[str]], str | None] | None) -> None:
        """Jobs wait before their launch while `held(run id, node names)` names a run that
        holds one of their nodes (jobs/runs.py installs it)."""
        self._ctx.held = held

    def now(self) -> float:
        """The jobs' clock's wall time (a test's manual clock, else time.time())."""
        return self._ctx.clock.time()

    def counts(self) -> dict[str, int]:
        """{state: number of jobs}, for metrics and the status line."""
        return self.store.count_by_state()

    def stalled_count(self) -> int:
        """How many jobs followed here are stalled now (the gauge)."""
        with self._lock:
            runs = list(self._live.values())
        return sum(1 for run in runs if run.stalled())

    def get(self, job_id: str) -> dict[str, Any]:
        return self._view(self._record(job_id))

    def list(self, limit: int = 50, offset: int = 0, **filters: Any) -> list[dict[str, Any]]:
        """Newest first; *filters* as ``Store.list`` takes them (states, submitted_by, name,
        tags)."""
        _check_counts(limit=limit, offset=offset)
        return [
            _list_item(self._view(r)) for r in self.store.list(min(limit, 1000), offset, **filters)
        ]

    def _view(self, rec: JobRecord) -> dict[str, Any]:
        """The API's job dict for a stored record, as this daemon knows the job: the
        fields it could not write yet laid over it, with `store_error` and `waiting`."""
        now = self._ctx.clock.time()
        with self._lock:
            run = self._live.get(rec.id)
            if run is not None:
                rec = rec.overlaid(run.unwritten)
            if rec.state.is_final:
                waiting = None
            elif run is None or _ended(run.thread):
                # only while the daemon stops: the next start takes it up
                waiting = _waiting(JobWait.UNFOLLOWED, now)
            elif run.thread is None:  # queued: checked when the first running job is
                running = [r.next_check for r in self._live.values() if r.thread is not None]
                waiting = _waiting(JobWait.QUEUED, min(running, default=now))
            elif run.cancel_reason and run.wait_reason == JobWait.RUNNING:
                waiting = _waiting(JobWait.CANCELLING, run.next_check)
            else:
                waiting = _waiting(run.wait_reason, run.next_check)
                if run.wait_reason == JobWait.HELD and run.held_by:
                    waiting["detail"] = run.held_by
            fault = run.store_fault if run is not None else None
        store_error = None
        if fault is not None:
            e, what, since = fault
            store_error = {
                "reason": e.reason,
                "message": f"cannot write {what}: {e.cause}; retrying",
                "since": iso(since),
            }
        return to_json(rec, waiting, store_error, now)

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job is final (or `timeout`); the job dict with "response"."""
        job: dict[str, Any] = json.loads(b"".join(self.wait_json(job_id, timeout)))
        return job

    def wait_json(self, job_id: str, timeout: float | None = None) -> Iterator[bytes]:
        """wait() as JSON: blocks until the job is final (or `timeout`), then returns an
        iterator of bytes pieces of the document.  The log is read, decoded and escaped
        a chunk at a time, so a sync request for a job that wrote gigabytes never holds
        its output in memory; the bytes are the same as json.dumps of wait()'s dict.
        A job that cannot progress (see follow_log) is answered as it stands."""
        self._record(job_id)
        with self._lock:
            run = self._live.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        # its final state, even while not yet written
        while run is not None and not run.decided.wait(1.0):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if self._stuck(self.get(job_id)):
                log.info("job %s: answered while not final: the job cannot progress now", job_id)
                break
        if run is not None and run.thread is not None and run.decided.is_set():
            # its master cleaned up and its slot given back (bounded: one SSH call), so a
            # client's next job after this answer is not queued behind this one; not while
            # its final state waits for the disk, which may take long
            until = time.monotonic() + self._ctx.ssh_timeout + 1.0
            while run.store_fault is None and time.monotonic() < until:
                run.thread.join(0.05)
                if not run.thread.is_alive():
                    break
        job = self.get(job_id)
        return json_with_response(self.store, job, self.store.log_size(job_id))

    def read_log(
        self, job_id: str, offset: int = 0, limit: int = 65536, rank: int | None = None
    ) -> tuple[bytes, int]:
        self.log_size(job_id, rank)  # validates
        _check_counts(offset=offset, limit=limit)
        return self.store.read_log(job_id, offset, min(limit, LOG_CHUNK_MAX), rank)

    def log_size(self, job_id: str, rank: int | None = None) -> int:
        """The size of the job's log, or of one rank's log (BadRequest for a rank the
        job does not have, or a job not submitted with rank_output)."""
        rec = self._record(job_id)
        if rank is None:
            return rec.log_bytes
        if not rank_output(rec):
            raise BadRequest(
                f"rank: job {job_id} was not submitted with rank_output: true, so its "
                "output is not kept per rank",
                field="rank",
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise BadRequest("rank must be an integer >= 0", field="rank")
        n = flavour.rank_count(rec.flavour or "openmpi4", rec.command)
        if n is not None and rank >= n:
            raise BadRequest(f"rank: job {job_id} has ranks 0 to {n - 1}, not {rank}", field="rank")
        return self.store.log_size(job_id, rank)

    def follow_log(
        self,
        job_id: str,
        offset: int = 0,
        gone: Callable[[], bool] | None = None,
        rank: int | None = None,
    ) -> Iterator[bytes]:
        """Yield output from `offset` as it arrives, until the job is final and all is read,
        or until `gone()` (the reader went away: checked every second while nothing comes);
        of one rank's log with `rank`.

        A job that cannot progress ends the follow with what there is: one no thread
        follows (the daemon stops) and one whose writes failed for FOLLOW_STORE_FAULT_S."""
        self.read_log(job_id, offset, 0, rank)  # validates
        while True:
            # the state before the read: a job final then has all its output in the log
            job = self.get(job_id)
            data, offset = self.store.read_log(job_id, offset, LOG_CHUNK_MAX, rank)
            if data:
                yield data
                continue
            if job["waiting"] is None or self._stop.is_set() or (gone is not None and gone()):
                return
            if self._stuck(job):
                log.info("job %s: log follower ended: the job cannot progress now", job_id)
                return
            with self._changed:
                if self.store.log_size(job_id, rank) <= offset:
                    self._changed.wait(5.0 if gone is None else 1.0)

    def _stuck(self, job: dict[str, Any]) -> bool:
        """Whether the job cannot progress now: no thread follows it (or the thread is
        gone), or its writes have failed for FOLLOW_STORE_FAULT_S."""
        if job["waiting"] is None:  # final
            return False
        if job["waiting"]["reason"] == JobWait.UNFOLLOWED:
            return True
        with self._lock:
            run = self._live.get(job["id"])
        if run is None or _ended(run.thread):
            return True
        fault = run.store_fault
        return fault is not None and self._ctx.clock.time() - fault[2] >= FOLLOW_STORE_FAULT_S

    def cancel(self, job_id: str, by: str | None = None) -> tuple[int, dict[str, Any]]:
        """Cancel a job -> (status, the job as it is now), within ``server.cancel_answer_s``:
        200 once it is final, 202 while its kill and sweep go on in the job's own threads.
        Only the request that starts the cancel waits (bounded); one while a cancel is
        under way answers at once, so no number of them holds the server's threads.
        A kill that cannot reach the master is tried again every few seconds (its
        `error` says so) until delivered or the job is lost.  Raises Conflict (final, or
        not followed here), InsufficientStorage/Unavailable naming the reason when the
        state dir cannot take the cancel (it goes on all the same).  The cancel that starts
        records `by` (a token's name) and its time as `cancelled_by` and `cancelled_at`."""
        rec = self._record(job_id)
        if rec.state.is_final:
            raise Conflict(f"job {job_id} is already {rec.state}")
        with self._lock:
            run = self._live.get(job_id)
        if run is None:
            raise Conflict(f"job {job_id} is not followed by this daemon")
        deadline = time.monotonic() + self.cfg.server.cancel_answer_s  # real threads
        outcome = run.cancel(JobReason.CANCELLED, self._queue)
        if outcome is not Cancel.ALREADY:
            try:  # within the answer's bound
                self.store.update(job_id, cancelled_by=by, cancelled_at=self._ctx.clock.time())
            except StoreError as e:  # the cancel goes on; the fault is answered below
                log.warning("job %s: cannot record who cancelled it: %s", job_id, e)
            if outcome is Cancel.KILLING:
                run.killed.wait(max(0.0, deadline - time.monotonic()))
            if run.cancel_reason is not None:  # else withdrawn: nothing more to wait for
                run.done.wait(max(0.0, deadline - time.monotonic()))
        job = self.get(job_id)
        final = JobState(job["state"]).is_final
        if not final and run.cancel_reason is None:  # withdrawn: the daemon is stopping
            raise Unavailable(f"job {job_id}: {run.kill_message or 'the daemon is stopping'}")
        fault = self.store.fault
        if fault is not None and (not final or job["store_error"] is not None):
            # the state dir cannot take the cancel: said even when the job ended at once,
            # for its end is not on disk yet
            cls = InsufficientStorage if fault.reason == StoreReason.DISK_FULL else Unavailable
            raise cls(
                f"job {job_id}: the cancel goes on, but the daemon's state dir cannot be "
                f"written ({fault.reason}): the job shows {job['state']} until it can",
                error=fault.reason,
            )
        return (200 if final else 202), job

    def roll_call(self, job_id: str) -> RollCall:
        """Every rank of a running job (jobs/rollcall.py); concurrent askers of one job
        share one roll-call.  NotFound, or Conflict when the job is not running."""
        rec = self._record(job_id)
        if rec.state != JobState.RUNNING or rec.pid is None:
            raise Conflict(f"job {job_id} is {rec.state}: a roll-call needs a running job's ranks")
        ports = {s.node.ip: s.node.port for s in self.registry.nodes()}
        targets = [
            Target(row.name, Host(row.ip, ports.get(row.ip, self.cfg.ssh.port)))
            for row in rec.nodes
        ]
        bound, tools = self.mpi.roll_call_timeout_s, self.mpi.roll_call_tools
        return self._roll_calls.run(
            job_id, lambda: take(self._ctx.remote, job_id, targets, rec.np, bound, tools)
        )

    def _events(self, old: JobRecord, new: JobRecord) -> Sequence[OutboxRecord]:
        """The outbox rows of what the change from `old` to `new` says happened (called in
        the store's transaction of that change; reads no record)."""
        fired = events.happened(old, new)
        if not fired:
            return []
        now = time.time()  # wall time, not the jobs' clock: delivery ages count from it
        output = events.tail_or_why(self.store, new.id)
        job = to_json(new, None, None, self._ctx.clock.time())
        return events.rows(self.cfg.webhooks.hooks, new, fired, job, output, now)

    # --- slots and queue --------------------------------------------------------------

    def _check_room(self) -> None:
        """QueueFull when every slot runs and the queue is full (the caller holds the lock)."""
        if self._active >= self.mpi.max_concurrent_jobs and len(self._queue) >= self.mpi.queue_size:
            raise QueueFull(
                f"{self._active} job(s) running and {len(self._queue)} queued; try later"
            )

    def _admit(self, run: JobRun) -> None:
        """Run `run` now if a slot is free, else queue it (the caller holds self._lock)."""
        self._live[run.id] = run
        if self._active < self.mpi.max_concurrent_jobs:
            self._active += 1
            self._spawn(run)
        else:
            self._queue.append(run)

    def _spawn(self, run: JobRun) -> None:
        t = threading.Thread(target=self._run, args=(run,), name=f"job-{run.id}", daemon=True)
        run.thread = t
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _run(self, run: JobRun) -> None:
        try:
            run.run()
        finally:
            with self._lock:
                if not run.slotless:
                    self._free_slot()

    def _free_slot(self) -> None:
        """A slot is free (the caller holds self._lock): a job back from a wait for a
        run's nodes takes it first, else the next queued job."""
        if self._queue and not self._stop.is_set() and not self._rejoining:
            self._spawn(self._queue.popleft())
        else:
            self._active -= 1
            self._changed.notify_all()

    def _leave_slot(self, run: JobRun) -> None:
        """`run` waits for a run's nodes: its slot goes to another job meanwhile."""
        with self._lock:
            run.slotless = True
            self._free_slot()

    def _take_slot(self, run: JobRun) -> None:
        """`run`'s wait is over: it takes a slot, waiting for one (not after a cancel or
        at the stop: it ends without launching, and without a slot)."""
        with self._lock:
            self._rejoining += 1
            try:
                while self._active >= self.mpi.max_concurrent_jobs:
                    if run.cancel_reason is not None or self._stop.is_set():
                        return
                    self._changed.wait(1.0)
                self._active += 1
                run.slotless = False
            finally:
                self._rejoining -= 1
                while (  # a slot kept free for it, if it gave up: to the queue
                    self._queue and not self._rejoining and not self._stop.is_set()
                    and self._active < self.mpi.max_concurrent_jobs
                ):  # fmt: skip
                    self._active += 1
                    self._spawn(self._queue.popleft())

    def _record(self, job_id: Any) -> JobRecord:
        rec = self.store.get(job_id) if isinstance(job_id, str) and job_id.isalnum() else None
        if rec is None:
            raise NotFound(f"no job {echo(job_id)}")
        return rec


def _check_counts(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BadRequest(f"{name} must be an integer >= 0", field=name)


# --- JSON shapes ---------------------------------------------------------------------


def rank_output(rec: JobRecord) -> bool:
    """Whether the job was submitted with rank_output (kept in its stored request)."""
    return bool((rec.request or {}).get("rank_output", False))


def _ended(thread: threading.Thread | None) -> bool:
    """Whether a job's thread ran and is gone (not one queued, or not started yet)."""
    return thread is not None and thread.ident is not None and not thread.is_alive()


def _waiting(reason: JobWait, next_check: float) -> dict[str, Any]:
    return {"reason": reason, "next_check": iso(next_check)}


# The answer's fields that are not a column of the record as they are, each from the record
# (and from what the daemon knows of the job but has not stored: `waiting`, `store_error`).
_DERIVED: dict[str, Callable[[JobRecord], Any]] = {
    "command": lambda rec: str(rec.command),
    "created": lambda rec: iso(rec.created),
    "started": lambda rec: iso(rec.started),
    "finished": lambda rec: iso(rec.finished),
    "cancelled_at": lambda rec: iso(rec.cancelled_at),
    "env": lambda rec: {name: "***" for name in rec.env_names},
    "rank_output": lambda rec: rank_output(rec),
}
_KNOWN = ("store_error", "waiting", "stalled", "stalls")  # stalls: up to now (jobs/stall.py)
_FIELDS = Job.__struct_fields__


def _answer_fields() -> tuple[str, ...]:
    """`shapes.Job`'s fields, checked at import: each one is a record field, derived from
    the record, or known to the daemon; none is left out or made up."""
    record = {f.name for f in dataclasses.fields(JobRecord)}
    missing = [f for f in _FIELDS if f not in record | set(_DERIVED) | set(_KNOWN)]
    if missing:
        raise RuntimeError(f"shapes.Job's {missing} come from neither the record nor the daemon")
    return _FIELDS


_ANSWER = _answer_fields()


def to_json(
    rec: JobRecord,
    waiting: dict[str, Any] | None = None,
    store_error: dict[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The API's job dict: the fields of ``shapes.Job``, in its order (the seed's keys first);
    `waiting` and `store_error` as ``Jobs._view`` makes them; a stall's `quiet_s` up to `now`."""
    running = rec.state == JobState.RUNNING
    stalled, stalls = stall_view(rec.stalls, time.time() if now is None else now, running)
    known = {"waiting": waiting, "store_error": store_error, "stalled": stalled, "stalls": stalls}
    return {
        name: known[name] if name in known
        else _DERIVED[name](rec) if name in _DERIVED
        else getattr(rec, name)
        for name in _ANSWER
    }  # fmt: skip


def _list_item(job: dict[str, Any]) -> dict[str, Any]:
    """A job's answer as a list shows it (``shapes.JobListItem``): stalls summed up."""
    if job["stalled"] is None and not job["stalls"]:
        return job
    stalled = job["stalled"] and stall_summary(job["stalled"])
    return {**job, "stalled": stalled, "stalls": [stall_summary(s) for s in job["stalls"]]}


def json_with_response(
    store: Store, job: dict[str, Any], size: int, chunk: int = LOG_CHUNK_MAX
) -> Iterator[bytes]:
    """json.dumps of `job` with the log's first `size` bytes (decoded, bad UTF-8
    replaced) as "response" right after "master_name", in pieces of at most `chunk`
    log bytes each."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text(s: str) -> bytes:  # the inside of a JSON string
        return json.dumps(s)[1:-1].encode()

    sep = b"{"
    for k, v in job.items():
        yield sep + json.dumps(k).encode() + b": " + json.dumps(v).encode()
        sep = b", "
        if k == "master_name":
            yield b', "response": "'
            offset = 0
            while offset < size:
                data, offset = store.read_log(job["id"], offset, min(chunk, size - offset))
                if not data:
                    break
                yield text(decoder.decode(data))
            yield text(decoder.decode(b"", final=True)) + b'"'
    yield b"}"
