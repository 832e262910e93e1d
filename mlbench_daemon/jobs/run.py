"""One live job: launch it (or re-attach), follow its output, time it out, cancel it.

A ``JobRun`` exists from submission until the job is final.  Its thread runs
``run()``: launch (unless the job already has a pid), arm the timeout, follow
until the job is over, record the final state.  ``cancel()`` may come from any
thread (the API, the timeout timer) and says what it did (``Cancel``).

All waiting goes through the ``Clock`` (backoffs, ``mpi.lost_after_s``, the
timeout), so tests can run it on a clock of their own.

The master's output file is the source of truth; the state dir is a copy that may fail
to be written (a full or read-only disk).  A log append that fails leaves the follower
at the log's size: it follows again from there with backoff (``STORE_BACKOFF_S``), so
once the disk takes writes again it catches up, no byte lost and none twice.  A record
write that fails is kept in ``unwritten`` (the API answers with it laid over the stored
record) and written again until it succeeds; the final state is written before the job
leaves the live table, and the job's directory on the master is removed only then.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import msgspec

from mlbench_daemon import metrics
from mlbench_daemon.config import Config
from mlbench_daemon.discovery import Node
from mlbench_daemon.errors import ApiError
from mlbench_daemon.jobs import failure, flavour, preflight, stall
from mlbench_daemon.jobs.clock import Clock, Timer
from mlbench_daemon.jobs.launch import (
    BACKOFF_S,
    Job,
    Launcher,
    LaunchFailed,
    MasterLost,
    Stopped,
    check_reachable,
    pid_of,
    placed,
)
from mlbench_daemon.jobs.placement import Registry
from mlbench_daemon.jobs.ranklog import RankLogs
from mlbench_daemon.jobs.remote import Host, Remote, Status, Stream
from mlbench_daemon.shapes import RollCall
from mlbench_daemon.ssh_errors import SSHError
from mlbench_daemon.store import JobRecord, Store, StoreError
from mlbench_daemon.vocabulary import FailureKind, JobReason, JobState, JobWait

log = logging.getLogger(__name__)

FOLLOW_IDLE_S = 30.0  # a silent stream's master is probed after this long (a frozen host noticed)
STORE_BACKOFF_S = (0.5, 5.0)  # first and longest pause between attempts to write the state dir


def cancel_note(error: str | None) -> tuple[JobReason, str] | None:
    """If `error` is what a cancel's kill writes (``_kill_and_sweep``) -> (its reason, how
    the process group ended: "gone", "terminated" or "killed"; or "not-delivered")."""
    for r in (JobReason.CANCELLED, JobReason.TIMEOUT):
        if error is not None and error.startswith(f"{r} not delivered to "):
            return r, "not-delivered"
        if error is not None and error.startswith(f"{r}: process group "):
            return r, error.removeprefix(f"{r}: process group ").split(";")[0]
    return None


class Cancel(enum.Enum):
    """What ``JobRun.cancel`` did."""

    ALREADY = "already"  # a cancel is under way or the job is final: wait for its end
    DEQUEUED = "dequeued"  # it was still queued: now cancelled
    AFTER_LAUNCH = "after-launch"  # launching: the runner kills it as soon as it has a pid
    KILLING = "killing"  # the kill and sweep started in the job's cancel thread (``killed``)
    # what the kill and sweep (``_kill_and_sweep``) did:
    DELIVERED = "delivered"  # TERM (then KILL) delivered and every host swept
    NOT_DELIVERED = "not-delivered"  # the master could not be reached: tried again in 5 s


@dataclasses.dataclass
class Context:
    """What every JobRun of one Jobs shares."""

    cfg: Config
    store: Store
    remote: Remote
    registry: Registry
    clock: Clock
    stop: threading.Event
    changed: threading.Condition  # log appends and state changes; its lock guards `live`
    live: dict[str, JobRun]
    launcher: Launcher = dataclasses.field(init=False)
    roll_call: Callable[[str], RollCall] | None = None  # Jobs.roll_call: a stall takes one
    # (run id of the asking job or None, its node names) -> which run holds which of them,
    # or None when none is held for another run (jobs/runs.py: a run has its nodes alone)
    held: Callable[[int | None, Sequence[str]], str | None] | None = None
    # a job waiting for a run's nodes gives its mpi.max_concurrent_jobs slot up while it
    # waits, and takes one again (waiting for it; not after a cancel or the stop) after
    leave_slot: Callable[[JobRun], None] | None = None
    take_slot: Callable[[JobRun], None] | None = None

    def __post_init__(self) -> None:
        self.launcher = Launcher(
            self.cfg.mpi, self.store, self.remote, self.registry, self.clock, self.stop
        )

    @property
    def ssh_timeout(self) -> float:
        return self.cfg.ssh.connect_timeout_s + 10

    def flavour_for(self, node: Node) -> str | None:
        """The flavour of the launcher on `node`, if known (see Launcher.flavour_for)."""
        return self.launcher.flavour_for(node)


class JobRun:
    def __init__(
        self,
        ctx: Context,
        job_id: str,
        *,
        env: Mapping[str, str] | None = None,
        master: str | None = None,
        program: Sequence[str] = (),
        np: int | None = None,
        candidates: Sequence[Node] = (),
        names: Sequence[str] | None = None,
        reattached: bool = False,
        rank_output: bool = False,
        apps: Sequence[tuple[str, Sequence[str]]] = (),
        run_id: int | None = None,
    ) -> None:
        self.ctx, self.mpi, self.id = ctx, ctx.cfg.mpi, job_id
        self.apps = tuple((h, tuple(a)) for h, a in apps)  # an MPMD launch's (host, argv)s
        self.run_id = run_id  # the MLBench run this job launches, if any
        self.slotless = False  # its slot given up (guarded by ctx.changed; Jobs' slots)
        self.held_by: str | None = None  # while it waits for nodes a run holds: which
        self.env: Mapping[str, str] | None = env or {}  # values; dropped once launched
        self.master = master  # requested master name, or None
        self.program, self.np, self.candidates = list(program), np, list(candidates)
        self.names = names  # node names of a job queued again after a restart
        self.reattached = reattached
        self.rank_output = rank_output  # a queued job's; a launched one's is in its record
        self.ranks: RankLogs | None = None  # its rank logs, while followed (ranklog.py)
        self.cancel_reason: JobReason | None = None
        self.killing = False
        self.killed = threading.Event()  # the kill and the sweep of every host are over
        self.kill_message: str | None = None  # what the last kill said (guarded by ctx.changed)
        self.retry: Timer | None = None  # the next try of an undelivered kill
        self.stream: Stream | None = None
        self.timer: Timer | None = None
        self.done = threading.Event()  # the final state is written; the job left the live table
        self.decided = threading.Event()  # the final state is known (maybe not written yet)
        self.thread: threading.Thread | None = None  # set by the manager when the job runs
        # guarded by ctx.changed: fields not yet written, the write error, what the job waits for
        self.unwritten: dict[str, Any] = {}
        self.store_fault: tuple[StoreError, str, float] | None = None  # error, what, since
        self.wait_reason, self.next_check = JobWait.LAUNCHING, ctx.clock.time()
        # guarded by ctx.changed: the stall episodes (jobs/stall.py), set once followed
        self.stall: stall.Stalls | None = None
        self.stall_timer: Timer | None = None

    # --- what the API shows ---------------------------------------------------------------

    def record(self) -> JobRecord:
        """The job as this daemon knows it: the stored record with `unwritten` over it."""
        rec = self.ctx.store.record(self.id)
        with self.ctx.changed:
            return rec.overlaid(self.unwritten)

    def _expect(self, reason: JobWait, within: float) -> None:
        """The job now waits for `reason`; its progress is checked again within `within` s."""
        with self.ctx.changed:
            self.wait_reason, self.next_check = reason, self.ctx.clock.time() + within

    # --- writing the state dir ------------------------------------------------------------

    def _save(self, **fields: Any) -> bool:
        """Write `fields` (and any left unwritten) to the record -> whether it is written.
        On a store fault they stay in `unwritten`, shown by the API, for `_flush` to retry."""
        with self.ctx.changed:
            self.unwritten.update(fields)
        return self._flush()

    def _flush(self) -> bool:
        """Write the fields left unwritten -> whether none is left."""
        with self.ctx.changed:
            fields = dict(self.unwritten)
        if fields:
            try:
                self.ctx.store.update(self.id, **fields)
            except StoreError as e:
                self._store_failed(e, "the job's record")
                return False
            with self.ctx.changed:  # drop what was written, unless changed meanwhile
                for k, v in fields.items():
                    if k in self.unwritten and self.unwritten[k] is v:
                        del self.unwritten[k]
        self._store_ok("the job's record")
        return True

    def _flush_until_written(self) -> None:
        """Retry the unwritten fields with backoff until written (Stopped if the daemon
        stops first: the record then says the job runs, and a restart takes it up)."""
        backoff = STORE_BACKOFF_S[0]
        while not self._flush():
            self._expect(JobWait.STORE_RETRY, backoff)
            if self.ctx.clock.wait(self.ctx.stop, backoff):
                raise Stopped()
            backoff = min(backoff * 2, STORE_BACKOFF_S[1])

    def _store_failed(self, e: StoreError, what: str) -> None:
        """A write failed: shown on the job, one log line per new fault.  Followers are woken
        at each failed try, so one waits no longer than a retry to see the job stuck."""
        with self.ctx.changed:
            new = self.store_fault is None or self.store_fault[0].reason != e.reason
            if new:
                self.store_fault = (e, what, self.ctx.clock.time())
            self.ctx.changed.notify_all()
        if new:
            log.error("job %s: cannot write %s: %s; retrying", self.id, what, e.cause)

    def _store_ok(self, what: str) -> None:
        """A write of `what` succeeded: the fault is over once nothing is left unwritten."""
        with self.ctx.changed:
            fault = self.store_fault
            if fault is None or self.unwritten:
                return
            self.store_fault = None
        log.warning("job %s: written again (%s failed: %s)", self.id, fault[1], fault[0].reason)

    # --- the job's thread ---------------------------------------------------------------

    def run(self) -> None:
        try:
            try:
                if self.reattached:  # a launched job (with a pid) runs while the pass is made
                    self._expect(
                        JobWait.RUNNING if self.record().pid else JobWait.LAUNCHING,
                        self.ctx.cfg.discovery.timeout_s + self.ctx.ssh_timeout,
                    )
                    self.ctx.registry.wait_first_pass(
                        self.ctx.cfg.discovery.timeout_s + self.ctx.ssh_timeout
                    )
                rec: JobRecord | None = self.record()
                if rec is not None and rec.pid is None and not rec.master_name:
                    self._wait_unheld(rec)
                if rec is not None and rec.pid is None:
                    rec = self._launch(rec)
                if rec is None:  # the launch ended the job
                    return
                self._arm_timeout(rec)
                if self.cancel_reason:
                    self._start_kill()
                self._finish_from(self._follow())
            except Stopped:
                raise
            except MasterLost as e:
                self.finish(JobState.LOST, reason=JobReason.MASTER_UNREACHABLE, error=str(e))
            except Exception as e:  # a bug must not leave a job running forever in the table
                log.exception("job %s: follower failed", self.id)
                self.finish(
                    JobState.LOST, reason=JobReason.DAEMON_ERROR, error=f"{type(e).__name__}: {e}"
                )
        except Stopped:  # the daemon stops: a restart takes the job up from its record
            pass
        finally:
            for timer in (self.timer, self.retry, self.stall_timer):
                if timer:
                    timer.cancel()

    def _wait_unheld(self, rec: JobRecord) -> None:
        """Before a launch: wait while a run holds one of the job's nodes (checked every
        second; a cancel or the daemon's stop ends the wait), without a slot meanwhile."""
        held = self.ctx.held
        if held is None:
            return
        names = [n.name for n in self.candidates] or list(self.names or ())
        names = names or [row.name for row in rec.nodes]
        left = False
        try:
            while self.cancel_reason is None:
                why = held(self.run_id, names)
                with self.ctx.changed:
                    self.held_by = why
                if why is None:
                    return
                if not left and self.ctx.leave_slot is not None:
                    self.ctx.leave_slot(self)
                    left = True
                self._expect(JobWait.HELD, 1.0)
                if self.ctx.clock.wait(self.ctx.stop, 1.0):
                    raise Stopped()
        finally:
            if left and self.ctx.take_slot is not None:
                self.ctx.take_slot(self)

    def _launch(self, rec: JobRecord) -> JobRecord | None:
        """Launch the job -> its record once running, None if the launch ended it."""
        job = Job(
            self.id, self.program, self.np, self.env or {}, self.master, self.candidates,
            self.names, self.cancel_reason, self.rank_output, self.apps,
        )  # fmt: skip
        backoff = STORE_BACKOFF_S[0]
        while True:
            # each SSH step is bounded; a launch tries each candidate, then waits for the pid
            self._expect(
                JobWait.LAUNCHING,
                self.ctx.ssh_timeout * (len(self.candidates or self.names or ()) + 3)
                + self.mpi.lost_after_s,
            )
            try:
                outcome = self.ctx.launcher.launch(job, rec)
                break
            except StoreError as e:  # the record before the launch: nothing started yet
                self._store_failed(e, "the job's record")
                self._expect(JobWait.STORE_RETRY, backoff)
                if self.ctx.clock.wait(self.ctx.stop, backoff):
                    raise Stopped() from None
                backoff = min(backoff * 2, STORE_BACKOFF_S[1])
                rec = self.record()
        self.env = None  # the values go no further than the launch
        if isinstance(outcome, LaunchFailed):
            fields: dict[str, Any] = {"reason": outcome.reason}
            if outcome.error is not None:
                fields["error"] = outcome.error
            self.finish(outcome.state, **fields)
            return None
        return self.running(outcome.pid)

    def detach(self) -> None:
        """The daemon stops: drop the timers and the stream (the remote job runs on)."""
        for timer in (self.timer, self.retry, self.stall_timer):
            if timer:
                timer.cancel()
        if self.stream:
            self.stream.close()

    def running(self, pid: int) -> JobRecord:
        """Record the job running as process group `pid` -> the record (as known: a write
        that fails is retried while the job is followed)."""
        self._save(state=JobState.RUNNING, pid=pid, started=self.ctx.clock.time())
        with self.ctx.changed:
            self.ctx.changed.notify_all()
        return self.record()

    def _arm_timeout(self, rec: JobRecord) -> None:
        if rec.timeout_s and rec.started is not None:
            left = max(0.0, rec.started + rec.timeout_s - self.ctx.clock.time())
            self.timer = self.ctx.clock.timer(left, lambda: self.cancel(JobReason.TIMEOUT))

    # --- following ----------------------------------------------------------------------

    def _follow(self) -> Status:
        """Stream the remote output into the log until the job is over -> its Status."""
        ctx, clock = self.ctx, self.ctx.clock
        rec = self.record()
        (host, job_dir), pid = placed(rec), pid_of(rec)
        backoff, down_since = BACKOFF_S[0], None
        store_backoff = STORE_BACKOFF_S[0]
        # output may have piled up unread on the master: since before a restart, or while
        # the link or the log was down; then a catch-up goes first, packed if it is a lot
        behind = self.reattached
        if rec.request.get("rank_output"):
            self.ranks = RankLogs(ctx.store, self.id, rec.flavour or "openmpi4")
        # a silent stream ends after FOLLOW_IDLE_S, then the master is asked for the status
        checked_within = FOLLOW_IDLE_S + 2 * ctx.ssh_timeout
        self._watch_stalls(rec)
        while True:
            if ctx.stop.is_set():
                raise Stopped()
            if self.unwritten:
                self._flush()
            try:
                self._expect(JobWait.RUNNING, checked_within)
                for source in (ctx.remote.catch_up, ctx.remote.follow)[0 if behind else 1 :]:
                    self.stream = source(host, job_dir, ctx.store.log_size(self.id), FOLLOW_IDLE_S)
                    if ctx.stop.is_set():  # stopped while it opened: detach() did not see it
                        self.stream.close()
                        raise Stopped()
                    down_since = None  # the master answered
                    with self._log_file() as log_file:
                        for chunk in self.stream:
                            self._append(log_file, chunk)
                            if self.ranks is not None:  # before readers are told
                                self.ranks.advance()
                            self._output_grew()
                            self._expect(JobWait.RUNNING, checked_within)
                            if self.store_fault is not None:  # written again: the record too
                                self._flush()
                            with ctx.changed:
                                ctx.changed.notify_all()
                            backoff, store_backoff = BACKOFF_S[0], STORE_BACKOFF_S[0]
                    behind = False
                status = ctx.remote.status(host, job_dir, pid)
            except StoreError as e:
                behind = True
                # the log keeps the bytes written: follow again from its size, later
                if self.stream is not None:
                    self.stream.close()
                self._store_failed(e, "the job's log")
                self._expect(JobWait.STORE_RETRY, store_backoff)
                clock.wait(ctx.stop, store_backoff)
                store_backoff = min(store_backoff * 2, STORE_BACKOFF_S[1])
                continue
            except SSHError as e:
                behind = True
                if ctx.stop.is_set():
                    raise Stopped() from None
                down_since = clock.monotonic() if down_since is None else down_since
                check_reachable(self.mpi.lost_after_s, clock, down_since, e)
                log.warning(
                    "job %s: following on %s: %s; retrying in %.1f s", self.id, host.ip, e, backoff
                )
                self._expect(JobWait.RECONNECTING, backoff + ctx.ssh_timeout)
                clock.wait(ctx.stop, backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            finally:
                self.stream = None
            if status.state == "missing" or (
                status.state != "running" and status.size <= ctx.store.log_size(self.id)
            ):
                return status
            behind = status.size > ctx.store.log_size(self.id)
            if status.state == "running":
                self._expect(JobWait.RUNNING, backoff + checked_within)
                clock.wait(ctx.stop, backoff)  # the stream ended early: go again, without spinning

    # --- stalls (jobs/stall.py) -----------------------------------------------------------

    def _watch_stalls(self, rec: JobRecord) -> None:
        """Start checking the job's quiet every stall.check_interval(), unless stalls are off
        for it.  The quiet counts from now (after a restart, output the job wrote meanwhile
        is still to be caught up: it is no stall); an episode a previous daemon left open
        goes on from its own `since`, its roll-call kept."""
        after = rec.request.get("stall_after_s")
        after = self.mpi.stall_after_s if after is None else after
        with self.ctx.changed:
            self.stall = stall.Stalls(rec.stalls, self.ctx.clock.time())
        if after > 0:
            interval = stall.check_interval(after)
            self.stall_timer = self.ctx.clock.timer(
                interval, lambda: self._check_stall(after, interval)
            )

    def _output_grew(self) -> None:
        """The log grew: a stall under way is over (written at once)."""
        with self.ctx.changed:
            ended = self.stall is not None and self.stall.grew(self.ctx.clock.time())
            episodes = self.stall.snapshot() if ended and self.stall else None
        if episodes is not None:
            log.info("job %s: its output grows again: the stall is over", self.id)
            self._save(stalls=episodes)

    def stalled(self) -> bool:
        """Whether a stall is under way (for the gauge)."""
        with self.ctx.changed:
            return self.stall is not None and self.stall.open is not None

    def _check_stall(self, after: float, interval: float) -> None:
        """The stall timer: a quiet of `after` s while the job is followed opens an episode
        and takes its one roll-call; then the timer is armed again."""
        ctx = self.ctx
        try:
            with ctx.changed:
                following = self.wait_reason == JobWait.RUNNING and not self.cancel_reason
                now = ctx.clock.time()
                episode = self.stall.check(now, after) if following and self.stall else None
                episodes = self.stall.snapshot() if episode and self.stall else None
            if episode is not None and episodes is not None:
                log.warning(
                    "job %s: stalled: no output for %.0f s; taking a roll-call",
                    self.id, now - episode["since"],
                )  # fmt: skip
                self._save(stalls=episodes)
                self._stall_roll_call(episode)
        except Exception:  # a bug here must not stop the checks
            log.exception("job %s: stall check failed", self.id)
        finally:
            if not (self.decided.is_set() or ctx.stop.is_set()):
                self.stall_timer = ctx.clock.timer(
                    interval, lambda: self._check_stall(after, interval)
                )

    def _stall_roll_call(self, episode: stall.Episode) -> None:
        """Take the episode's roll-call (bounded: mpi.roll_call_timeout_s) and keep it."""
        roll_call, error = None, None
        try:
            if self.ctx.roll_call is None:
                raise RuntimeError("no roll-call here")
            roll_call = msgspec.to_builtins(self.ctx.roll_call(self.id))
        except ApiError as e:  # the job ended meanwhile
            error = str(e)
        except Exception as e:
            log.exception("job %s: the stall's roll-call failed", self.id)
            error = f"{type(e).__name__}: {e}"
        with self.ctx.changed:
            if self.stall is None:
                return
            self.stall.roll_call_taken(episode, roll_call, error)
            episodes = self.stall.snapshot()
        suspects = [f"rank {s['rank']} on {s['node']}" for s in episode["suspects"]]
        log.warning(
            "job %s: the stall's roll-call: %s", self.id,
            error or ("suspects " + ", ".join(suspects) if suspects else "no suspects"),
        )  # fmt: skip
        self._save(stalls=episodes)

    def _log_file(self) -> BinaryIO:
        """The job's log, opened to append (StoreError if it cannot be)."""
        try:
            return self.ctx.store.log_writer(self.id)
        except OSError as e:
            raise StoreError(self.ctx.store.log_path(self.id), e) from None

    def _append(self, log_file: BinaryIO, chunk: bytes) -> None:
        """Append all of `chunk`; StoreError if a write fails (the bytes before it stay)."""
        view = memoryview(chunk)
        try:
            while view:
                view = view[log_file.write(view) or 0 :]
        except OSError as e:
            raise StoreError(self.ctx.store.log_path(self.id), e) from None

    # --- ending -------------------------------------------------------------------------

    def _finish_from(self, status: Status) -> None:
        rec = self.record()
        rc = status.exit_code
        if self.cancel_reason:
            # "cancelled" promises no process is left: let the sweep of every host finish
            self.killed.wait(self.mpi.cancel_grace_s + 3 * self.ctx.ssh_timeout)
            note = cancel_note(self.kill_message)
        else:  # a kill's note in the record: the daemon restarted after the kill
            note = cancel_note(rec.error)
        if self.cancel_reason and (note is None or note[1] != "not-delivered"):
            error = {"error": self.kill_message} if self.kill_message else {}
            self.finish(JobState.CANCELLED, exit_code=rc, reason=self.cancel_reason, **error)
        elif note is not None and note[1] in ("terminated", "killed"):
            self.finish(JobState.CANCELLED, exit_code=rc, reason=note[0])  # ended by the kill
        elif status.state == "missing":
            self.finish(
                JobState.LOST,
                reason=JobReason.REMOTE_RECORD_MISSING,
                error=f"job directory {rec.remote_dir} is gone from {rec.master_name}",
            )
        elif rc is None:
            self.finish(
                JobState.LOST,
                reason=JobReason.NO_EXIT_STATUS,
                error="the job's processes are gone and left no exit status",
            )
        else:
            # the job ended by itself (the group "gone" when the kill came, or the kill not
            # delivered): a kill's note must not stay; a launch's note stays
            stale = {"error": None} if note is not None else {}
            self.finish(JobState.SUCCEEDED if rc == 0 else JobState.FAILED, exit_code=rc, **stale)
        try:
            self.ctx.remote.remove(*placed(rec))
        except SSHError as e:
            log.warning(
                "job %s: could not remove %s on %s: %s",
                *(self.id, rec.remote_dir, rec.master_name, e),
            )

    def finish(self, state: JobState, **fields: Any) -> None:
        """Record the final state (with its failure, unless it succeeded), retried until
        written (Stopped if the daemon stops first); then the job leaves the live table.
        Called from another thread (an API call ending a queued job), a write that fails
        is retried in a thread of its own: an API call never waits on the disk."""
        ctx = self.ctx
        self._expect(JobWait.FINISHING, self.mpi.preflight_timeout_s + ctx.ssh_timeout)
        try:
            ctx.store.sync_log(self.id)
        except OSError as e:
            log.warning("job %s: could not sync its log: %s", self.id, e)
        if self.ranks is not None:  # the rank logs' last bytes, before the job is final
            try:
                self.ranks.advance(final=True)
            except StoreError as e:
                log.warning("job %s: rank logs incomplete (the log has it all): %s", self.id, e)
        now = ctx.clock.time()  # one reading: a stall under way ends when the job does
        with ctx.changed:
            ended = self.stall is not None and self.stall.end(now)
            episodes = self.stall.snapshot() if ended and self.stall else None
        if episodes is not None:
            self._save(stalls=episodes)  # apart from `fields`: they are logged
        if state != JobState.SUCCEEDED:
            fields["failure"] = self._failure(state, fields)
            metrics.job_failures_total.labels(fields["failure"]["kind"]).inc()
        written = self._save(state=state, finished=now, **fields)
        self.decided.set()
        with ctx.changed:
            ctx.changed.notify_all()
        if written or threading.current_thread() is self.thread:
            self._leave(state, fields)
        else:
            threading.Thread(
                target=self._leave_later, args=(state, fields), name=f"job-{self.id}-end",
                daemon=True,
            ).start()  # fmt: skip

    def _leave_later(self, state: JobState, fields: Mapping[str, Any]) -> None:
        try:
            self._leave(state, fields)
        except Stopped:  # the daemon stops: the record says not final; a restart decides
            pass

    def _leave(self, state: JobState, fields: Mapping[str, Any]) -> None:
        """The final state written (retried until it is), the job leaves the live table."""
        ctx = self.ctx
        self._flush_until_written()
        with ctx.changed:
            rec = ctx.store.record(self.id)
            ctx.live.pop(self.id, None)
            ctx.changed.notify_all()
        self.done.set()
        if rec.started is not None and rec.finished is not None:
            metrics.job_duration_seconds.observe(rec.finished - rec.started)
        log.info("job %s: %s %s", self.id, state, fields or "")

    def _failure(self, state: JobState, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Why the job did not succeed (failure.py), from the tail of its output; for a
        daemon-launch failure, which names no host, the preflight is run first (bounded
        by mpi.preflight_timeout_s) and its failing checks are kept."""
        ctx = self.ctx
        try:
            rec = self.record()
            size = ctx.store.log_size(self.id)
            start = max(0, size - failure.PARSE_TAIL_BYTES)
            tail, _ = ctx.store.read_log(self.id, start, size - start)
            statuses = {s.node.name: s for s in ctx.registry.nodes()}
            rows = list(rec.nodes)
            refs = [
                failure.NodeRef(r.name, r.ip, getattr(statuses.get(r.name), "hostname", None))
                for r in rows
            ]
            f = failure.attribute(
                state=state,
                reason=fields.get("reason"),
                exit_code=fields.get("exit_code", rec.exit_code),
                output=tail.decode(errors="replace"),
                command=rec.command,
                master=rec.master_name,
                master_ip=rec.master_ip,
                nodes=refs,
                error=fields.get("error", rec.error),
                flavour=rec.flavour or "openmpi4",
            ) or failure.empty(FailureKind.UNKNOWN, state)
            if f["kind"] == FailureKind.DAEMON_LAUNCH:
                self._explain_launch(f, rec, statuses)
            suspects = stall.last_suspects(rec.stalls)
            if suspects is not None:  # it was stalled: where its ranks were then
                f["suspects"] = suspects
            return f
        except Exception as e:  # attribution must never keep a job from ending
            log.exception("job %s: failure attribution failed", self.id)
            return failure.empty(FailureKind.UNKNOWN, f"attribution failed: {e}")

    def _explain_launch(
        self, f: dict[str, Any], rec: JobRecord, statuses: Mapping[str, Any]
    ) -> None:
        """Run the preflight for this job; its failing checks go into `f`."""
        names = [row.name for row in rec.nodes]
        nodes = [statuses[name].node for name in names if name in statuses]
        master = next((n for n in nodes if n.name == rec.master_name), None)
        if master is None:
            return
        program = self.program or rec.request.get("program") or self.mpi.program
        result = preflight.run(
            self.ctx.remote.pool, self.ctx.cfg, master, nodes, program, rec.np,
            self.mpi.preflight_timeout_s,
        )  # fmt: skip
        f["checks"] = [c for c in result["checks"] if c["status"] == "fail"]
        first = next((c for c in f["checks"] if c["node"]), None)
        if first is None:
            f["message"] += "; the preflight found nothing failing now"
            return
        if f["node"] is None:
            f["node"] = first["node"]
        f["message"] += f"; preflight: {first['node']} {first['check']}: {first['message']}"
        f["hint"] = first["hint"] or f["hint"]

    # --- cancel -------------------------------------------------------------------------

    def cancel(self, reason: JobReason, queue: deque[JobRun] | None = None) -> Cancel:
        """Cancel the job in any stage, without waiting on the master: a running job's
        kill and sweep go on in a thread of the job's own (KILLING; ``killed`` is set when
        they are over), and the job's thread records the final state.
        `queue`: the manager's queue (guarded by ctx.changed), left at once if queued."""
        with self.ctx.changed:
            if self.cancel_reason or self.done.is_set():
                return Cancel.ALREADY
            self.cancel_reason = reason
            queued = queue is not None and self in queue
            if queued:
                queue.remove(self)  # type: ignore[union-attr]
        if queued:
            self.finish(JobState.CANCELLED, reason=reason)
            return Cancel.DEQUEUED
        if self.record().pid is None:
            return Cancel.AFTER_LAUNCH  # the job's thread kills right after launching
        return self._start_kill()

    def _start_kill(self) -> Cancel:
        """Start the kill and sweep in the job's cancel thread -> KILLING (ALREADY if one
        is under way: never a second sweep)."""
        with self.ctx.changed:
            if self.killing:
                return Cancel.ALREADY
            self.killing = True
            self.kill_message = None
            self.killed.clear()  # a retry after an undelivered cancel
        threading.Thread(target=self._kill, name=f"job-{self.id}-cancel", daemon=True).start()
        return Cancel.KILLING

    def _kill(self) -> None:
        """TERM, grace, KILL the job's process group, then sweep every host."""
        try:
            self._kill_and_sweep()
        except Exception as e:  # a bug: the job's thread still ends the job when it ends
            log.exception("job %s: cancel failed", self.id)
            self.kill_message = f"{self.cancel_reason}: the cancel failed: {type(e).__name__}: {e}"
        finally:
            self.killed.set()

    def _retry_kill(self) -> None:
        if not self.done.is_set() and not self.ctx.stop.is_set():
            self._start_kill()

    def _note(self, message: str) -> None:
        """The cancel's result (``kill_message``, set by the caller) as the job's `error`; the
        final state carries it when the state dir cannot take it now."""
        self._save(error=message)  # a write that fails is retried (_flush)

    def _kill_and_sweep(self) -> Cancel:
        ctx = self.ctx
        rec = self.record()
        master, _ = placed(rec)
        option = flavour.get(rec.flavour or "openmpi4").proxy_option
        proxies = None
        try:
            if option:  # read before the kill: the proxies carry no marker of their own
                proxies = (option, ctx.remote.proxy_values(master, self.id, option))
            how = ctx.remote.terminate(master, pid_of(rec), self.mpi.cancel_grace_s)
        except SSHError as e:
            # tried again until delivered or the job ends (lost after mpi.lost_after_s)
            with ctx.changed:
                reason = self.cancel_reason
                retry = not ctx.stop.is_set()
                then = f"; trying again in {BACKOFF_S[1]:.0f} s" if retry else ""
                msg = f"{reason} not delivered to {rec.master_name}: {str(e).rstrip('.')}{then}"
                self.killing, self.kill_message = False, msg
                if not retry:
                    self.cancel_reason = None
            self._note(msg)
            log.warning("job %s: %s", self.id, msg)
            if retry:
                self.retry = ctx.clock.timer(BACKOFF_S[1], self._retry_kill)
            return Cancel.NOT_DELIVERED
        ports = {s.node.ip: s.node.port for s in ctx.registry.nodes()}
        ips = [row.ip for row in rec.nodes]
        hosts = [Host(ip, ports.get(ip, ctx.cfg.ssh.port)) for ip in ips]
        swept = ctx.remote.sweep(self.id, hosts, proxies)
        msg = f"{self.cancel_reason}: process group {how}; {swept}"
        log.info("job %s: %s", self.id, msg)
        with ctx.changed:
            self.kill_message = msg
        self._note(msg)
        return Cancel.DELIVERED
