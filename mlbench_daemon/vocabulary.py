"""The daemon's words, each declared once: job states, node phases and every reason code.

All are ``StrEnum``: a member *is* its string (``JobState.PENDING == "pending"``,
``json.dumps`` and ``str()`` give the bare value), so records, JSON answers, metrics
labels and log lines read as before, and a typo is an ``AttributeError`` at import
time instead of a silently new word.

=================  ===============================================================
enum               where the words appear
=================  ===============================================================
``JobState``       a job's ``state`` (store, API, metrics ``state`` label, CLI)
``Phase``          a node's ``phase`` (registry, API, metrics ``phase`` label, CLI)
``JobReason``      a final job's ``reason``
``FailureKind``    a job's ``failure.kind`` (README's troubleshooting table)
``SSHReason``      ``SSHError.reason``; a node's ``reason`` after a failed probe
``NodeReason``     a node's ``reason`` otherwise
``DiscoveryReason``  ``DiscoveryError.reason``; the registry's ``stale_reason``
``StoreReason``    why the state dir (database or logs) cannot be written
``JobWait``        what a job not yet final waits for (its ``waiting.reason``)
``FlavourName``    a job's ``flavour`` (``mpi.flavour``); preflight adds ``unknown``
``CheckName``      a preflight check's ``check``
``CheckStatus``    a preflight check's ``status``
``ProcessState``   a rank's process ``state`` in a roll-call (``/proc/<pid>/stat``)
``StackSource``    where a roll-call's rank ``stack`` came from
``Role``           a token's role (tokens file, route table, ``/api/whoami``)
``Refusal``        why a request was refused (audit log ``outcome``, metrics ``reason``)
``RunState``       an MLBench run's ``state`` (MLBench's own words)
``HookEvent``      what a webhook event says happened (``job.<event>``; webhooks.py)
``Delivery``       how one webhook delivery attempt ended (metrics ``outcome`` label)
=================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def is_final(self) -> bool:
        """A final state never changes again (the job's processes are over or given up on)."""
        return self not in (JobState.PENDING, JobState.RUNNING)


FINAL_STATES = tuple(s for s in JobState if s.is_final)


class Phase(StrEnum):
    PENDING = "Pending"  # discovered, first probe not finished
    RUNNING = "Running"  # SSH login and `true` succeeded
    UNKNOWN = "Unknown"  # could not reach the host (SSHError Unreachable)
    FAILED = "Failed"  # reached, but refused or untrusted (SSHError Untrusted)


class JobReason(StrEnum):
    CANCELLED = "cancelled"  # DELETE /api/mpi_jobs/<id>
    TIMEOUT = "timeout"  # the job's timeout_s ran out
    DAEMON_RESTARTED = "daemon-restarted"  # queued when the daemon died; cannot be relaunched
    LAUNCH_INTERRUPTED = "launch-interrupted"  # the daemon died while launching; no process
    LAUNCH_FAILED = "launch-failed"  # the launch on the master failed
    NO_USABLE_MASTER = "no-usable-master"  # no candidate could run mpirun
    REMOTE_RECORD_MISSING = "remote-record-missing"  # the job directory vanished
    NO_EXIT_STATUS = "no-exit-status"  # processes gone without an exit status
    MASTER_UNREACHABLE = "master-unreachable"  # unreachable for mpi.lost_after_s
    DAEMON_ERROR = "daemon-error"  # a bug in the daemon ended the follower


CANCEL_REASONS = (JobReason.CANCELLED, JobReason.TIMEOUT)


class FailureKind(StrEnum):
    """A job's ``failure.kind``: what went wrong, for every job that did not succeed."""

    RANK_EXIT = "rank-exit"  # a rank exited non-zero, aborted, or skipped MPI_Finalize
    RANK_SIGNAL = "rank-signal"  # a rank was killed by a signal
    DAEMON_LAUNCH = "daemon-launch"  # mpirun could not start its daemon on a node
    EXE_NOT_FOUND = "exe-not-found"  # the program is missing or not executable on a node
    LOST_CONTACT = "lost-contact"  # mpirun lost its daemon on a node during the job
    TCP_CONNECT = "tcp-connect"  # a rank could not connect to another
    NOT_ENOUGH_SLOTS = "not-enough-slots"  # np over the slots of the host list
    TIMEOUT = "timeout"  # JobReason.TIMEOUT
    CANCELLED = "cancelled"  # JobReason.CANCELLED
    MASTER_LOST = "master-lost"  # JobReason.MASTER_UNREACHABLE
    NO_MASTER = "no-master"  # JobReason.NO_USABLE_MASTER
    LAUNCH_FAILED = "launch-failed"  # JobReason.LAUNCH_FAILED
    JOB_LOST = "job-lost"  # the job's record on the master is gone or incomplete
    UNKNOWN = "unknown"  # the launcher gave no known cause


class SSHReason(StrEnum):
    CONNECTION_REFUSED = "connection-refused"
    CONNECT_TIMEOUT = "connect-timeout"
    NO_BANNER = "no-banner"
    NETWORK_UNREACHABLE = "network-unreachable"
    CONNECTION_LOST = "connection-lost"
    SSH_ERROR = "ssh-error"
    COMMAND_TIMEOUT = "command-timeout"
    AUTH_FAILED = "auth-failed"
    HOST_KEY_UNKNOWN = "host-key-unknown"
    HOST_KEY_CHANGED = "host-key-changed"


class NodeReason(StrEnum):
    NOT_PROBED_YET = "not-probed-yet"
    OK = "ok"


class StoreReason(StrEnum):
    """Why a write to the state dir failed (``store.store_reason`` classifies the error)."""

    DISK_FULL = "state-disk-full"  # ENOSPC, EDQUOT, sqlite "database or disk is full"
    READ_ONLY = "state-read-only"  # EROFS, EACCES, EPERM, sqlite "readonly database"
    WRITE_FAILED = "state-write-failed"  # any other error of a write


class JobWait(StrEnum):
    """What a job that is not final waits for, with the time its progress is checked next."""

    QUEUED = "queued"  # a free slot (mpi.max_concurrent_jobs); checked when a running job is
    LAUNCHING = "launching"  # its master being chosen and mpirun started over SSH
    RUNNING = "running"  # its output, followed; a silent master is asked for its status
    RECONNECTING = "reconnecting"  # its master, unreachable: tried again with backoff
    STORE_RETRY = "store-retry"  # the state dir, which cannot be written: tried again
    CANCELLING = "cancelling"  # the kill and the sweep of its hosts
    FINISHING = "finishing"  # the record of its end (the failure's cause may need a preflight)
    UNFOLLOWED = "unfollowed"  # nothing: no thread of this daemon follows it (it is stopping);
    # the next start re-attaches it
    HELD = "held"  # its nodes, held by a run (a benchmark has its nodes to itself): `detail`


class DiscoveryReason(StrEnum):
    NOT_DISCOVERED_YET = "not-discovered-yet"
    DNS_TIMEOUT = "dns-timeout"
    NXDOMAIN = "nxdomain"
    NO_MEMBERS = "no-members"
    DNS_ERROR = "dns-error"


class FlavourName(StrEnum):
    """The MPI launchers the daemon drives (jobs/flavour.py holds how each is driven)."""

    OPENMPI4 = "openmpi4"
    OPENMPI5 = "openmpi5"
    MPICH = "mpich"


UNKNOWN_FLAVOUR = "unknown"  # preflight's answer when the master's launcher is not recognised
PREFLIGHT_FLAVOURS = (*FlavourName, UNKNOWN_FLAVOUR)


class CheckName(StrEnum):
    """A preflight check's ``check``, in the order they run."""

    MASTER_SSH = "master-ssh"
    LAUNCHER_DAEMON = "launcher-daemon"
    MPI_VERSION = "mpi-version"
    PROGRAM = "program"
    DIRS = "dirs"
    TCP = "tcp"
    SLOTS = "slots"


class CheckStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_CHECKED = "not-checked"  # the node could not run the check (says why)


class ProcessState(StrEnum):
    """A process's state letter in ``/proc/<pid>/stat``, named (proc(5))."""

    RUNNING = "running"  # R
    SLEEPING = "sleeping"  # S: interruptible wait
    DISK_SLEEP = "disk-sleep"  # D: uninterruptible wait
    STOPPED = "stopped"  # T
    TRACING_STOP = "tracing-stop"  # t: stopped by a tracer (a debugger holds it)
    ZOMBIE = "zombie"  # Z
    DEAD = "dead"  # X
    IDLE = "idle"  # I (kernel threads)
    PARKED = "parked"  # P

    @classmethod
    def from_letter(cls, letter: str) -> ProcessState | None:
        """The state of a letter; None for one this list does not know (a newer kernel's)."""
        return _STATE_LETTERS.get(letter)


_STATE_LETTERS = {
    "R": ProcessState.RUNNING, "S": ProcessState.SLEEPING, "D": ProcessState.DISK_SLEEP,
    "T": ProcessState.STOPPED, "t": ProcessState.TRACING_STOP, "Z": ProcessState.ZOMBIE,
    "X": ProcessState.DEAD, "x": ProcessState.DEAD, "I": ProcessState.IDLE,
    "P": ProcessState.PARKED,
}  # fmt: skip


class StackSource(StrEnum):
    """Where a roll-call's ``stack`` of a rank came from."""

    PY_SPY = "py-spy"  # Python frames (`py-spy dump --nonblocking`)
    EU_STACK = "eu-stack"  # native frames of the main thread (`eu-stack -1 -p`)
    GDB = "gdb"  # native frames of the main thread (`gdb -batch -p`)
    WCHAN = "wchan"  # only the kernel function it waits in (/proc/<pid>/wchan)
    NONE = "none"  # nothing could be read (the rank's process was not found or vanished)


class Role(StrEnum):
    """What a token may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"  # reads
    SUBMITTER = "submitter"  # also launches, runs preflights, cancels its own jobs
    ADMIN = "admin"  # everything, including cancelling anyone's job

    def allows(self, needed: Role) -> bool:
        order = tuple(Role)
        return order.index(self) >= order.index(needed)


class Refusal(StrEnum):
    """Why a request was refused before (or instead of) doing anything."""

    NO_TOKEN = "no-token"  # no `Authorization: Bearer` header
    BAD_TOKEN = "bad-token"  # not a token of this daemon
    REVOKED = "revoked"  # a token revoked with `mlbench-daemon token revoke`
    ROLE = "role"  # the token's role may not call this route
    NOT_OWNER = "not-owner"  # a submitter cancelling another's job
    HOST = "host"  # browser safety: a foreign Host
    ORIGIN = "origin"  # browser safety: a foreign Origin
    MEDIA_TYPE = "media-type"  # a body that is not application/json
    CAPABILITY = "capability"  # a run capability URL that is unknown, or asked for another route


class HookEvent(StrEnum):
    """What happened to a job, as a webhook event names it: ``<subject>.<event>`` with a
    subject of ``HOOK_SUBJECTS`` (``job.failed``)."""

    STARTED = "started"  # running: the launcher has a pid
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    STALLED = "stalled"  # a stall episode, once its roll-call is taken (or the episode ended)


class RunHookEvent(StrEnum):
    """What happened to an MLBench run, as a webhook event names it (``run.finished``):
    the run states' words (``RunState``), and `cancelled` for a run ended by a cancel."""

    STARTED = "started"  # its nodes are chosen and its job submitted
    FINISHED = "finished"  # its job succeeded
    FAILED = "failed"  # it could not start, or its job failed or was lost
    CANCELLED = "cancelled"  # deleted before it ended, or its job was cancelled


HOOK_SUBJECTS = ("job", "run")  # what an event is about
HOOK_EVENTS = (*(f"job.{e}" for e in HookEvent), *(f"run.{e}" for e in RunHookEvent))


class Delivery(StrEnum):
    """How one webhook delivery attempt ended."""

    DELIVERED = "delivered"  # the receiver answered 2xx
    RETRY = "retry"  # it failed (no answer, timeout, non-2xx): tried again after a backoff
    GAVE_UP = "gave-up"  # the event is older than webhooks.max_age_s (or its hook is gone)


def checked(reason: str, allowed: Iterable[str], what: str) -> str:
    """`reason` if it is one of `allowed`; ValueError otherwise (also under ``python -O``)."""
    allowed = tuple(allowed)
    if reason not in allowed:
        raise ValueError(f"{what}: unknown reason {reason!r} (known: {', '.join(allowed)})")
    return reason


class RunState(StrEnum):
    """An MLBench run's state, in MLBench's words (mlbench-dashboard's ModelRun)."""

    INITIALIZED = "initialized"  # waiting for num_workers nodes free of other runs and jobs
    STARTED = "started"  # its job is launched (or queued for a slot)
    FINISHED = "finished"  # its job succeeded
    FAILED = "failed"  # its job failed, was cancelled or lost

    @property
    def is_final(self) -> bool:
        return self in (RunState.FINISHED, RunState.FAILED)
