"""MLBench runs (mlbench-dashboard's ModelRun): each one is a job of the job machinery on
nodes it has to itself.

    Runs(cfg, jobs, registry, run_env=None)
    start(); stop()
    create(form, by) -> the run's JSON      list_json(), get_json(id), delete(id, by)
    get_run(id) -> RunView | None            live() -> [RunView]     by_pod(name)
    on_deleted(callback(run_id))             on_ended(callback(RunView))
    prune(keep_days) -> [run id]             (the daemon's retention pass)

A run is a row of the ``runs`` table (``store.RunRecord``; its id is MLBench's integer
pk) and, once started, one job (``Jobs.submit_run``) whose record carries the run's id.

Scheduling.  Runs wait (``initialized``) in order of arrival until ``num_workers``
Running nodes are free of other runs and of every job not yet final (queued ones too:
``Jobs.busy_nodes``); the first waiting run must start before any later one.  A started
run holds its nodes until its job is final: no other run is given them, and a job whose
nodes a run holds waits before its launch (``JobWait.HELD``, its ``waiting.detail``
naming the run; ``Jobs.set_held``; it has no slot of ``mpi.max_concurrent_jobs``
while it waits).  Runs on disjoint nodes run at once, their jobs taking slots like any
job.  Ended runs are pruned after ``state.keep_days`` (``prune``).  A run asking for more nodes
than the daemon knows is refused (400).  The scheduler thread checks every
``TICK_S`` (and at once on a create or delete): started runs whose job is final end
(``finished`` if it succeeded, else ``failed``) and free their nodes, then waiting runs
start in order.  A restart takes up the holds of started runs from their records (their
jobs are re-attached by ``Jobs.start``) and the waiting runs in their order.

Webhooks: with hooks configured, every state write of a run and every delete commits
its ``run.*`` event (``started``, ``finished``, ``failed``; ``cancelled`` for a run
deleted before it ended or whose job was cancelled) with the change (``_events``).

The env hook (``run_env``) is called once a run's nodes are chosen, just before its job
is submitted; its values go to the job as a request's env values do (names only in the
record and the answers; never in an argv), its notes into ``job_metadata.notes``.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlbench_daemon.config import Config
from mlbench_daemon.discovery import Node, natural_key
from mlbench_daemon.errors import ApiError, BadRequest, NotFound, echo
from mlbench_daemon.jobs import events, runspec
from mlbench_daemon.jobs.manager import Jobs, to_json
from mlbench_daemon.jobs.placement import Registry, node_row
from mlbench_daemon.store import JobRecord, OutboxRecord, RunRecord, StoreError
from mlbench_daemon.timefmt import mlbench_date
from mlbench_daemon.vocabulary import JobState, Phase, RunState

log = logging.getLogger(__name__)

TICK_S = 0.5  # the scheduler's check of ended jobs and free nodes
OUTPUT_LINES = 200  # job_metadata.stdout: at most this many of the last lines
OUTPUT_BYTES = 64 * 1024  # ... read from the end of the job's log


@dataclasses.dataclass(frozen=True)
class RunView:
    """What other parts of the daemon (metrics, forwards) know of a run."""

    id: int
    name: str
    job_id: str | None
    state: RunState
    nodes: tuple[str, ...]  # node names (MLBench's pod names); empty while it waits
    created_at: float
    finished_at: float | None


@dataclasses.dataclass(frozen=True)
class RunEnv:
    """What the env hook gives a run's job: secret env values and lines for people."""

    env: Mapping[str, str]
    notes: tuple[str, ...] = ()


RunEnvHook = Callable[[RunView, list[Node]], RunEnv]


def view(rec: RunRecord) -> RunView:
    return RunView(
        rec.id, rec.name, rec.job_id, rec.state, tuple(rec.nodes), rec.created_at,
        rec.finished_at,
    )  # fmt: skip


def run_state(job: JobState) -> RunState:
    """The state of a started run whose job is in state `job`."""
    if job == JobState.SUCCEEDED:
        return RunState.FINISHED
    return RunState.FAILED if job.is_final else RunState.STARTED


class Runs:
    def __init__(
        self,
        cfg: Config,
        jobs: Jobs,
        registry: Registry,
        run_env: RunEnvHook | None = None,
    ) -> None:
        self.cfg, self.jobs, self.registry, self.store = cfg, jobs, registry, jobs.store
        self.run_env = run_env
        self._lock = threading.Condition()
        self._waiting: list[int] = []  # initialized runs, in order of arrival
        self._holds: dict[str, int] = {}  # node name -> the started run holding it
        self._started: dict[int, str | None] = {}  # started run -> its job (None: starting)
        self._deleted: list[Callable[[int], None]] = []
        self._ended: list[Callable[[RunView], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        jobs.set_held(self.held)
        if cfg.webhooks.hooks:  # every run state change makes its events (jobs/events.py)
            self.store.watch_runs(self._events)

    # --- the interface other branches use (interfaces.md) --------------------------------

    def get_run(self, run_id: int) -> RunView | None:
        rec = self.store.get_run(run_id)
        return view(rec) if rec is not None else None

    def live(self) -> list[RunView]:
        """Runs in state started."""
        return [view(r) for r in self.store.runs((RunState.STARTED,))]

    def by_pod(self, pod_name: str) -> RunView | None:
        """The live run holding node `pod_name`, else the latest run that held it."""
        with self._lock:
            holder = self._holds.get(pod_name)
        if holder is not None and (found := self.get_run(holder)) is not None:
            return found
        held = [r for r in self.store.runs() if pod_name in r.nodes]
        return view(held[-1]) if held else None

    def on_deleted(self, callback: Callable[[int], None]) -> None:
        self._deleted.append(callback)

    def on_ended(self, callback: Callable[[RunView], None]) -> None:
        self._ended.append(callback)

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Take up the runs a previous daemon left: the holds of started runs, then the
        waiting runs in their order; start the scheduler."""
        with self._lock:
            for rec in self.store.runs((RunState.INITIALIZED, RunState.STARTED)):
                if rec.state == RunState.STARTED:
                    self._started[rec.id] = rec.job_id
                    for name in rec.nodes:
                        self._holds[name] = rec.id
                else:
                    self._waiting.append(rec.id)
        self._thread = threading.Thread(target=self._loop, name="runs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._end_finished()
                self._start_waiting()
            except Exception:  # a bug must not stop every later run
                log.exception("runs: the scheduler's pass failed")
            with self._lock:
                self._lock.wait(TICK_S)

    # --- held nodes (Jobs asks before each launch) -------------------------------------

    def held(self, run_id: int | None, names: Sequence[str]) -> str | None:
        """Which of `names` a run other than `run_id` holds, in one line; None if none."""
        with self._lock:
            holders: dict[int, list[str]] = {}
            for name in names:
                holder = self._holds.get(name)
                if holder is not None and holder != run_id:
                    holders.setdefault(holder, []).append(name)
        if not holders:
            return None
        return "; ".join(
            f"run {rid} holds {', '.join(sorted(ns, key=natural_key))}"
            for rid, ns in sorted(holders.items())
        )

    # --- requests ---------------------------------------------------------------------

    def create(self, values: Mapping[str, str], by: str | None = None) -> dict[str, Any]:
        """A new run from mlbench-core's form (BadRequest naming a field); it starts at once
        if its nodes are free, else waits in order."""
        spec = runspec.parse(values, self.cfg.mpi.catalogue)
        known = self.registry.nodes()
        if spec.num_workers > len(known):
            running = sum(1 for s in known if s.phase == Phase.RUNNING)
            raise BadRequest(
                f"num_workers: the run asks for {spec.num_workers} nodes; the daemon knows "
                f"{len(known)} ({running} Running), so it could never start",
                field="num_workers",
            )
        rec = self.store.create_run(
            name=spec.name, state=RunState.INITIALIZED, num_workers=spec.num_workers,
            spec=spec.to_json(), submitted_by=by,
        )  # fmt: skip
        with self._lock:
            self._waiting.append(rec.id)
        log.info("run %d (%s) created: %d node(s)", rec.id, spec.name, spec.num_workers)
        self._start_waiting()
        return self.get_json(rec.id)

    def list_json(self) -> list[dict[str, Any]]:
        return [self._json(r) for r in self.store.runs()]

    def get_json(self, run_id: Any) -> dict[str, Any]:
        return self._json(self._record(run_id))

    def delete(self, run_id: Any, by: str | None = None) -> None:
        """Cancel the run's job if it is live (the usual cancel and sweep, answered within
        ``server.cancel_answer_s``; it goes on in the job's thread after that), then delete
        the run.  Its nodes stay held until the job is final, so nothing starts on nodes
        still being swept.  on_ended fires for a run that was live, then on_deleted."""
        rec = self._record(run_id)
        with self._lock:
            if rec.id in self._waiting:
                self._waiting.remove(rec.id)
            job_id = self._started.get(rec.id, rec.job_id)
        job = self.store.get(job_id) if job_id else None
        if job is not None and not job.state.is_final:
            try:
                self.jobs.cancel(job.id, by=by)
            except ApiError as e:  # final meanwhile, or the state dir: the cancel goes on
                log.info("run %d: cancel of job %s: %s", rec.id, job.id, e.message)
        self.store.delete_run(rec.id)
        after = self.store.get(job.id) if job is not None else None
        if after is not None and not after.state.is_final:  # swept still: its nodes stay
            was_live = True  # held until its job is final (_end_finished releases them)
        else:
            was_live = self._release(rec.id)
        log.info("run %d deleted%s", rec.id, f" (job {job_id} cancelled)" if was_live else "")
        if was_live:
            self._fire_ended(dataclasses.replace(view(rec), state=RunState.FAILED))
        for callback in self._deleted:
            _call(callback, rec.id)
        with self._lock:
            self._lock.notify_all()

    def prune(self, keep_days: float, now: float | None = None) -> list[int]:
        """Delete runs that ended more than `keep_days` ago (0: keep them), as the store
        prunes finished jobs; on_deleted fires for each (their metrics go with them)."""
        if not keep_days:
            return []
        cutoff = (time.time() if now is None else now) - keep_days * 86400
        ended = self.store.runs((RunState.FINISHED, RunState.FAILED))
        doomed = [r.id for r in ended if r.finished_at is not None and r.finished_at < cutoff]
        for run_id in doomed:
            self.store.delete_run(run_id)
            for callback in self._deleted:
                _call(callback, run_id)
        return doomed

    def _record(self, run_id: Any) -> RunRecord:
        text = str(run_id)
        rec = self.store.get_run(int(text)) if text.isdigit() and len(text) < 19 else None
        if rec is None:
            raise NotFound(f"no run {echo(run_id)}")
        return rec

    # --- the scheduler ----------------------------------------------------------------

    def _end_finished(self) -> None:
        """Started runs whose job is final end now; their nodes are free again."""
        with self._lock:
            started = [(rid, jid) for rid, jid in self._started.items() if jid is not None]
        for run_id, job_id in started:
            job = self.store.get(job_id)
            state = run_state(job.state) if job is not None else RunState.FAILED
            if state == RunState.STARTED:
                continue
            finished = job.finished if job is not None else None
            try:
                rec = self.store.update_run(run_id, state=state, finished_at=finished)
            except (KeyError, StoreError) as e:  # deleted meanwhile, or retried next pass
                if isinstance(e, StoreError):
                    continue
                self._release(run_id)
                continue
            self._release(run_id)
            log.info("run %d %s (job %s)", run_id, state, job_id)
            self._fire_ended(view(rec))

    def _release(self, run_id: int) -> bool:
        """Free the run's nodes -> whether it was started."""
        with self._lock:
            for name in [n for n, r in self._holds.items() if r == run_id]:
                del self._holds[name]
            was = run_id in self._started
            self._started.pop(run_id, None)
            self._lock.notify_all()
        return was

    def _start_waiting(self) -> None:
        """Start waiting runs in order while the first one's nodes are free."""
        while True:
            with self._lock:
                picked = self._pick()
            if picked is None:
                return
            self._launch(*picked)

    def _pick(self) -> tuple[RunRecord, list[Node]] | None:
        """The first waiting run and its nodes, held for it now, if enough are free."""
        if not self._waiting:
            return None
        rec = self.store.get_run(self._waiting[0])
        if rec is None:  # deleted
            self._waiting.pop(0)
            return self._pick()
        free = self._free()
        if len(free) < rec.num_workers:
            return None
        nodes = free[: rec.num_workers]
        self._waiting.pop(0)
        self._started[rec.id] = None
        for n in nodes:
            self._holds[n.name] = rec.id
        return rec, nodes

    def _free(self) -> list[Node]:
        """Running nodes no run holds and no job is on, in natural order."""
        busy = self.jobs.busy_nodes()
        return sorted(
            (
                s.node
                for s in self.registry.nodes()
                if s.phase == Phase.RUNNING and s.node.name not in self._holds
                and s.node.name not in busy
            ),
            key=lambda n: natural_key(n.name),
        )  # fmt: skip

    def _launch(self, rec: RunRecord, nodes: list[Node]) -> None:
        """Start a run on `nodes` (held for it): the env hook, then its job."""
        spec = runspec.RunSpec.from_json(rec.spec)
        names = [n.name for n in nodes]
        started = dataclasses.replace(view(rec), state=RunState.STARTED, nodes=tuple(names))
        notes: tuple[str, ...] = ()
        try:
            env: Mapping[str, str] = {}
            if self.run_env is not None:
                got = self.run_env(started, nodes)
                env, notes = got.env, got.notes
            plan = runspec.plan(spec, rec.id, [n.ip for n in nodes])
            on = [n for n in nodes if n.ip in plan.hosts]
            self.store.update_run(rec.id, state=RunState.STARTED, nodes=names, notes=list(notes))
            job = self.jobs.submit_run(
                rec.id, on, plan.program, plan.apps, env, by=rec.submitted_by, name=rec.name
            )
        except Exception as e:  # the hook refused, the queue is full, the disk: say why
            why = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
            log.warning("run %d could not start: %s", rec.id, why)
            self._release(rec.id)
            try:
                self.store.update_run(
                    rec.id, state=RunState.FAILED, nodes=names, notes=[*notes, why],
                    finished_at=self.jobs.now(),
                )  # fmt: skip
            except (KeyError, StoreError):
                pass
            self._fire_ended(dataclasses.replace(started, state=RunState.FAILED))
            return
        with self._lock:
            if rec.id in self._started:
                self._started[rec.id] = job.id
        self.store.update_run(rec.id, job_id=job.id)
        log.info("run %d started as job %s on %s", rec.id, job.id, ", ".join(names))

    def _events(
        self, old: RunRecord, new: RunRecord | None, job: JobRecord | None
    ) -> Sequence[OutboxRecord]:
        """The outbox rows of what a run's change says happened (called in the store's
        transaction of that change; reads no record)."""
        event = events.run_happened(old, new, job)
        if event is None:
            return []
        now = time.time()  # wall time, as a job's events: delivery ages count from it
        run = events.run_view(old, new, now)
        job_json = to_json(job, None, None, self.jobs.now()) if job is not None else None
        output = events.tail_or_why(self.store, job.id) if job is not None else []
        return events.run_rows(self.cfg.webhooks.hooks, event, run, job, job_json, output, now)

    def _fire_ended(self, run: RunView) -> None:
        for callback in self._ended:
            _call(callback, run)

    # --- answers ----------------------------------------------------------------------

    def _json(self, rec: RunRecord) -> dict[str, Any]:
        """The run as MLBench's ModelRunSerializer gave it, then `submitted_by`."""
        job = self.store.get(rec.job_id) if rec.job_id else None
        return {
            "id": rec.id,
            "name": rec.name,
            "created_at": mlbench_date(rec.created_at),
            "finished_at": mlbench_date(rec.finished_at),
            "state": rec.state,
            "job_id": rec.job_id,
            "job_metadata": self._metadata(rec, job),
            "num_workers": rec.num_workers,
            "submitted_by": rec.submitted_by,
        }

    def _metadata(self, rec: RunRecord, job: JobRecord | None) -> dict[str, Any]:
        if job is not None:
            pods = [list(row) for row in job.nodes]
            held = {row.name for row in job.nodes}
        else:
            pods, held = [], set()
        if len(held) < len(rec.nodes):  # a run on its first node only holds them all
            by_name = {s.node.name: s.node for s in self.registry.nodes()}
            pods += [
                list(node_row(by_name[n])) for n in rec.nodes if n not in held and n in by_name
            ]
        return {
            "stdout": self._output(job),
            "stderr": (job.error or "").splitlines() if job is not None else [],
            "command": shlex.join(job.command) if job is not None and job.command else None,
            "master_name": self._master(rec, job),
            "pods": pods,
            "waiting": self._waiting_for(rec),
            "notes": list(rec.notes),
        }

    def _master(self, rec: RunRecord, job: JobRecord | None) -> str | None:
        """The job's master once launched; before that (a started run whose job is not
        yet submitted, queued for a slot, or launching over SSH) the master it is
        launched on first: the run's first node.  Only a waiting run has none."""
        if job is not None and job.master_name:
            return job.master_name
        return rec.nodes[0] if rec.state != RunState.INITIALIZED and rec.nodes else None

    def _output(self, job: JobRecord | None) -> list[str]:
        """The last OUTPUT_LINES lines of the job's output (from its last OUTPUT_BYTES)."""
        if job is None or not job.log_bytes:
            return []
        start = max(0, job.log_bytes - OUTPUT_BYTES)
        data, _ = self.store.read_log(job.id, start, OUTPUT_BYTES)
        lines = data.decode("utf-8", errors="replace").splitlines()
        if start and lines:
            lines = lines[1:]  # cut in the middle of a line
        return lines[-OUTPUT_LINES:]

    def _waiting_for(self, rec: RunRecord) -> dict[str, Any] | None:
        if rec.state != RunState.INITIALIZED:
            return None
        with self._lock:
            if rec.id not in self._waiting:
                return None
            position = self._waiting.index(rec.id) + 1
            free = len(self._free())
            holders = sorted(set(self._holds.values()))
        running = sum(1 for s in self.registry.nodes() if s.phase == Phase.RUNNING)
        reason = (
            f"{rec.num_workers} nodes free of other runs and jobs; {free} of the "
            f"{running} Running nodes are free now"
        )
        if holders:
            reason += f" (runs holding nodes: {', '.join(map(str, holders))})"
        if position > 1:
            reason += f"; {position - 1} run(s) ahead of it start first"
        return {"position": position, "reason": reason}


def _call(callback: Callable[[Any], None], arg: Any) -> None:
    try:
        callback(arg)
    except Exception:  # another part's callback must not break the runs
        log.exception("runs: a callback failed")
