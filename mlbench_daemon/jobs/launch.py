"""Launching a job: find a master that can run mpirun, start it detached, confirm its pid.

``Launcher.launch`` is the first stage of a ``JobRun`` (run.py), also taken by a job
that a previous daemon left half-launched.  It returns ``Launched(pid)`` or
``LaunchFailed`` (the final state the job ends in); recording the outcome is the
JobRun's.  A launch whose answer is lost is never recorded as failed while the job may
be running: the pid file on the master decides.  This module imports nothing of run.py.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence

from mlbench_daemon import config
from mlbench_daemon.discovery import Node
from mlbench_daemon.jobs import flavour
from mlbench_daemon.jobs.clock import Clock
from mlbench_daemon.jobs.placement import (
    Registry,
    master_order,
    mpirun_argv,
    node_row,
    still_running,
)
from mlbench_daemon.jobs.remote import Host, Remote
from mlbench_daemon.ssh_errors import SSHError
from mlbench_daemon.store import JobRecord, Store
from mlbench_daemon.vocabulary import JobReason, JobState

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 5.0)  # first and longest pause between attempts to reach the master


class Stopped(Exception):
    """The daemon is stopping: leave the remote job running and its record as it is."""


class MasterLost(Exception):
    """The master stayed unreachable for mpi.lost_after_s: record the job lost."""


def check_reachable(limit: float, clock: Clock, down_since: float, error: SSHError) -> None:
    """Raise MasterLost once the master has been unreachable for `limit` s (0 = never)."""
    if limit and clock.monotonic() - down_since >= limit:
        raise MasterLost(
            f"the master was unreachable for {limit:g} s ({error}); the job may "
            "still be running there, unobserved"
        )


def placed(rec: JobRecord) -> tuple[Host, str]:
    """The master and job directory of a job whose launch was recorded (RuntimeError if
    none was: callers ask only once the record names a master)."""
    if rec.master_ip is None or rec.master_port is None or rec.remote_dir is None:
        raise RuntimeError(f"job {rec.id} has no master recorded")
    return Host(rec.master_ip, rec.master_port), rec.remote_dir


def pid_of(rec: JobRecord) -> int:
    """The process group of a job recorded running (RuntimeError if none is)."""
    if rec.pid is None:
        raise RuntimeError(f"job {rec.id} has no process recorded")
    return rec.pid


@dataclasses.dataclass(frozen=True)
class Launched:
    """The job runs on its master as process group `pid`."""

    pid: int


@dataclasses.dataclass(frozen=True)
class LaunchFailed:
    """The launch ended the job: the final state to record."""

    state: JobState
    reason: JobReason
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """What a launch needs to know of its job."""

    id: str
    program: Sequence[str]
    np: int | None
    env: Mapping[str, str]
    master: str | None  # the requested master's name
    candidates: Sequence[Node]  # the nodes chosen at submission
    names: Sequence[str] | None  # node names of a job queued again after a restart
    cancel_reason: JobReason | None  # a cancel that came before the launch
    rank_output: bool = False  # the launcher tags each line with its rank
    apps: Sequence[tuple[str, Sequence[str]]] = ()  # an MPMD launch: (node ip, argv) each


class Launcher:
    """Launches the jobs of one Jobs; keeps what each master's launcher is."""

    def __init__(
        self,
        mpi: config.Mpi,
        store: Store,
        remote: Remote,
        registry: Registry,
        clock: Clock,
        stop: threading.Event,
    ) -> None:
        self.mpi, self.store, self.remote, self.registry = mpi, store, remote, registry
        self.clock, self.stop = clock, stop
        # (master ip, port, launcher path) -> (flavour, version), asked once per master
        self.flavours: dict[tuple[str, int, str], tuple[str, str]] = {}

    def flavour_for(self, node: Node) -> str | None:
        """The flavour of the launcher on `node`: mpi.flavour, or what `--version`
        said there before (auto); None if not known yet."""
        if self.mpi.flavour != "auto":
            return str(self.mpi.flavour)
        known = self.flavours.get((node.ip, node.port, self.mpi.mpirun))
        return known[0] if known else None

    def launch(self, job: Job, rec: JobRecord) -> Launched | LaunchFailed:
        """Pick a master, start the job detached, confirm its pid.  Raises Stopped (the
        daemon stops) or MasterLost (the master stayed unreachable)."""
        if rec.master_name:  # a previous run died while launching: did the job start?
            return self._relaunched(job, rec)
        if job.cancel_reason:
            return LaunchFailed(JobState.CANCELLED, job.cancel_reason)
        master, flavour_name, nodes, failed = self._pick_master(job)
        if master is None or flavour_name is None:
            return LaunchFailed(JobState.FAILED, JobReason.NO_USABLE_MASTER, "; ".join(failed))
        env = job.env
        if job.apps and len(nodes) != len(job.apps):  # a node left: the ranks would not fit
            why = "; ".join(failed) or "a node of the launch is not Running"
            return LaunchFailed(JobState.FAILED, JobReason.NO_USABLE_MASTER, why)
        if job.apps:
            f = flavour.get(flavour_name)
            command = f.mpmd_argv(self.mpi.mpirun, self.mpi.args, job.apps, sorted(env))
        else:
            command = mpirun_argv(
                self.mpi.mpirun, self.mpi.args, nodes, job.np, sorted(env), job.program,
                flavour_name, job.rank_output,
            )  # fmt: skip
        job_dir = f"{self.mpi.remote_dir.rstrip('/')}/{job.id}"
        self.store.update(
            job.id,
            flavour=flavour_name,
            master_name=master.name,
            master_ip=master.ip,
            master_port=master.port,
            nodes=[node_row(n) for n in nodes],
            command=command,
            remote_dir=job_dir,
            error=("; ".join(failed) or None),
        )
        host = Host(master.ip, master.port)
        try:
            marker = flavour.get(flavour_name).marker_env(job.id)
            pid, why = self.remote.launch(host, job_dir, job.id, command, env, marker)
        except SSHError as e:
            # the job may have started and only the answer was lost: its pid file tells
            log.warning(
                "job %s: no answer from the launch on %s (%s); asking for its pid file",
                *(job.id, master.name, e),
            )
            pid = self._confirmed_pid(job, host, job_dir)
            why = f"{e.reason}: {e}; the master has no record of the job"
        if pid is None:
            return LaunchFailed(JobState.FAILED, JobReason.LAUNCH_FAILED, why)
        log.info("job %s: started on %s as process group %d", job.id, master.name, pid)
        return Launched(pid)

    def _pick_master(self, job: Job) -> tuple[Node | None, str | None, list[Node], list[str]]:
        """The first candidate that can run mpirun -> (master, its launcher's flavour, nodes
        left, failures).

        Only `command -v mpirun`, or once per master with mpi.flavour auto `mpirun
        --version`: the full preflight (preflight.py) is never in the path of a launch."""
        failed: list[str] = []
        candidates = list(job.candidates)
        if job.names is not None:  # queued before a restart: its nodes as they are now
            candidates, failed = still_running(self.registry, job.names)
        nodes = list(candidates)
        for node in master_order(nodes, job.master):
            why, flavour_name = self._cannot_run_mpirun(node)
            if why is None:
                return node, flavour_name, nodes, failed
            log.warning("job %s: master candidate %s cannot run mpirun: %s", job.id, node.name, why)
            failed.append(f"{node.name}: {why}")
            nodes.remove(node)
        return None, None, nodes, failed

    def _cannot_run_mpirun(self, node: Node) -> tuple[str | None, str | None]:
        """(None, flavour) if `node` can run mpirun now, else (why not, None).

        With mpi.flavour auto, a master not asked before runs `<mpirun> --version` (which
        also proves it is there); the answer is kept for that master and launcher path."""
        launcher, host = self.mpi.mpirun, Host(node.ip, node.port)
        known = self.flavour_for(node)
        key = (node.ip, node.port, launcher)
        try:
            if known:
                if self.remote.has_program(host, launcher):
                    return None, known
                self.flavours.pop(key, None)
                return f"{launcher} not found", None
            rc, text = self.remote.version(host, launcher)
        except SSHError as e:
            return f"{e.reason}: {e}", None
        if rc != 0:
            self.flavours.pop(key, None)
            return (
                f"{launcher} not found" if rc == 127 else f"{launcher} --version exited {rc}"
            ), None
        try:
            self.flavours[key] = flavour.detect(text)
        except ValueError as e:
            return f"{launcher}: {e}; set mpi.flavour", None
        log.info("%s: %s is %s (%s)", node.name, launcher, *self.flavours[key])
        return None, self.flavours[key][0]

    def _confirmed_pid(self, job: Job, host: Host, job_dir: str) -> int | None:
        """The pid a launch wrote on the master, or None if it wrote none.  While the
        master cannot be asked, the job stays pending and we keep asking (a job that
        may be running is never recorded as failed); a stop leaves it for the next run."""
        backoff, down_since = BACKOFF_S[0], self.clock.monotonic()
        while True:
            try:
                return self.remote.pid(host, job_dir)
            except SSHError as e:
                check_reachable(self.mpi.lost_after_s, self.clock, down_since, e)
                log.warning(
                    "job %s: cannot read the pid file on %s: %s; retrying in %.1f s",
                    *(job.id, host.ip, e, backoff),
                )
            if self.clock.wait(self.stop, backoff):
                raise Stopped()
            backoff = min(backoff * 2, BACKOFF_S[1])

    def _relaunched(self, job: Job, rec: JobRecord) -> Launched | LaunchFailed:
        host, job_dir = placed(rec)
        pid = self._confirmed_pid(job, host, job_dir)
        if pid is None:
            return LaunchFailed(
                JobState.LOST,
                JobReason.LAUNCH_INTERRUPTED,
                "the daemon restarted while launching; no job process was recorded",
            )
        return Launched(pid)
