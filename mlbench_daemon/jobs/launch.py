"""Launching a job: find a master that can run mpirun, start it detached, confirm its pid.

The first stage of a ``JobRun`` (``run.launch``), also taken by a job that a
previous daemon left half-launched (``_relaunched``).  A launch whose answer is
lost is never recorded as failed while the job may be running: the pid file on
the master decides.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mlbench_daemon.discovery import Node
from mlbench_daemon.jobs import flavour
from mlbench_daemon.jobs.placement import master_order, mpirun_argv, node_row, still_running
from mlbench_daemon.jobs.remote import Host
from mlbench_daemon.ssh_errors import SSHError
from mlbench_daemon.vocabulary import JobReason, JobState

if TYPE_CHECKING:
    from mlbench_daemon.jobs.run import JobRun

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 5.0)  # first and longest pause between attempts to reach the master


class Stopped(Exception):
    """The daemon is stopping: leave the remote job running and its record as it is."""


class MasterLost(Exception):
    """The master stayed unreachable for mpi.lost_after_s: record the job lost."""


def launch(run: JobRun, rec: dict[str, Any]) -> dict[str, Any] | None:
    """Pick a master, start the job detached -> the updated record, None if it ended."""
    if rec["master_name"]:  # a previous run died while launching: did the job start?
        return _relaunched(run, rec)
    if run.cancel_reason:
        run.finish(JobState.CANCELLED, reason=run.cancel_reason)
        return None
    master, flavour_name, nodes, failed = _pick_master(run)
    if master is None or flavour_name is None:
        run.finish(JobState.FAILED, reason=JobReason.NO_USABLE_MASTER, error="; ".join(failed))
        return None
    env = run.env or {}
    command = mpirun_argv(
        run.mpi.mpirun, run.mpi.args, nodes, run.np, sorted(env), run.program, flavour_name
    )
    job_dir = f"{run.mpi.remote_dir.rstrip('/')}/{run.id}"
    run.ctx.store.update(
        run.id,
        flavour=flavour_name,
        master_name=master.name,
        master_ip=master.ip,
        master_port=master.port,
        nodes=[node_row(n) for n in nodes],
        command=command,
        remote_dir=job_dir,
        error=("; ".join(failed) or None),
    )
    run.env = None
    host = Host(master.ip, master.port)
    try:
        marker = flavour.get(flavour_name).marker_env(run.id)
        pid, why = run.ctx.remote.launch(host, job_dir, run.id, command, env, marker)
    except SSHError as e:
        # the job may have started and only the answer was lost: its pid file tells
        log.warning(
            "job %s: no answer from the launch on %s (%s); asking for its pid file",
            *(run.id, master.name, e),
        )
        pid = _confirmed_pid(run, host, job_dir)
        why = f"{e.reason}: {e}; the master has no record of the job"
    if pid is None:
        run.finish(JobState.FAILED, reason=JobReason.LAUNCH_FAILED, error=why)
        return None
    log.info("job %s: started on %s as process group %d", run.id, master.name, pid)
    return run.running(pid)


def _pick_master(run: JobRun) -> tuple[Node | None, str | None, list[Node], list[str]]:
    """The first candidate that can run mpirun -> (master, its launcher's flavour, nodes
    left, failures).

    Only `command -v mpirun`, or once per master with mpi.flavour auto `mpirun
    --version`: the full preflight (preflight.py) is never in the path of a launch."""
    failed: list[str] = []
    if run.names is not None:  # queued before a restart: its nodes as they are now
        run.candidates, failed = still_running(run.ctx.registry, run.names)
    nodes = list(run.candidates)
    for node in master_order(nodes, run.master):
        why, flavour_name = _cannot_run_mpirun(run, node)
        if why is None:
            return node, flavour_name, nodes, failed
        log.warning("job %s: master candidate %s cannot run mpirun: %s", run.id, node.name, why)
        failed.append(f"{node.name}: {why}")
        nodes.remove(node)
    return None, None, nodes, failed


def _cannot_run_mpirun(run: JobRun, node: Node) -> tuple[str | None, str | None]:
    """(None, flavour) if `node` can run mpirun now, else (why not, None).

    With mpi.flavour auto, a master not asked before runs `<mpirun> --version` (which
    also proves it is there); the answer is kept for that master and launcher path."""
    launcher, host = run.mpi.mpirun, Host(node.ip, node.port)
    known = run.ctx.flavour_for(node)
    try:
        if known:
            if run.ctx.remote.has_program(host, launcher):
                return None, known
            run.ctx.flavours.pop((node.ip, node.port, launcher), None)
            return f"{launcher} not found", None
        rc, text = run.ctx.remote.version(host, launcher)
    except SSHError as e:
        return f"{e.reason}: {e}", None
    key = (node.ip, node.port, launcher)
    if rc != 0:
        run.ctx.flavours.pop(key, None)
        return (f"{launcher} not found" if rc == 127 else f"{launcher} --version exited {rc}"), None
    try:
        run.ctx.flavours[key] = flavour.detect(text)
    except ValueError as e:
        return f"{launcher}: {e}; set mpi.flavour", None
    log.info("%s: %s is %s (%s)", node.name, launcher, *run.ctx.flavours[key])
    return None, run.ctx.flavours[key][0]


def _confirmed_pid(run: JobRun, host: Host, job_dir: str) -> int | None:
    """The pid a launch wrote on the master, or None if it wrote none.  While the
    master cannot be asked, the job stays pending and we keep asking (a job that
    may be running is never recorded as failed); a stop leaves it for the next run."""
    clock = run.ctx.clock
    backoff, down_since = BACKOFF_S[0], clock.monotonic()
    while True:
        try:
            return run.ctx.remote.pid(host, job_dir)
        except SSHError as e:
            run.check_reachable(down_since, e)
            log.warning(
                "job %s: cannot read the pid file on %s: %s; retrying in %.1f s",
                *(run.id, host.ip, e, backoff),
            )
        if clock.wait(run.ctx.stop, backoff):
            raise Stopped()
        backoff = min(backoff * 2, BACKOFF_S[1])


def _relaunched(run: JobRun, rec: dict[str, Any]) -> dict[str, Any] | None:
    host = Host(rec["master_ip"], rec["master_port"])
    pid = _confirmed_pid(run, host, rec["remote_dir"])
    if pid is None:
        run.finish(
            JobState.LOST,
            reason=JobReason.LAUNCH_INTERRUPTED,
            error="the daemon restarted while launching; no job process was recorded",
        )
        return None
    return run.running(pid)
