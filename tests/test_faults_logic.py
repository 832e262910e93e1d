"""Store faults while jobs run, on the job state machine (issue 19, item 1), without root.

The real remote scripts run through tests/localjobs.LocalPool; time is a ManualClock.
The one stand-in is FaultyStore: a Store whose writes fail (disk full) while the test
says so, the fault no real part produces at will.  test_faults.py fills a real tmpfs."""

import errno
import sqlite3
import threading
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlbench_daemon.jobs import manager
from mlbench_daemon.store import Store, StoreError
from mlbench_daemon.vocabulary import JobReason, JobState, JobWait, StoreReason
from tests.helpers import HANG, wait_for
from tests.localjobs import LocalJobs, gate, sh

pytestmark = [pytest.mark.logic, pytest.mark.timeout(600)]


class FailingLog:
    """A log file whose writes fail like a full disk's: the first write under the fault
    writes half its bytes (a short write), the next raises ENOSPC."""

    def __init__(self, f, store):
        self.f, self.store, self.short = f, store, False

    def write(self, data):
        if not self.store.logs_fail:
            return self.f.write(data)
        if self.short or len(data) < 2:
            self.short = False
            raise OSError(errno.ENOSPC, "No space left on device")
        self.short = True
        return self.f.write(bytes(data[: len(data) // 2]))

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FaultyStore(Store):
    """Record writes fail while `records_fail` is set, log appends while `logs_fail` is;
    `failing` sets both."""

    def __init__(self, state_dir):
        super().__init__(state_dir)
        self.records_fail = self.logs_fail = False
        self.failed = 0  # writes refused so far

    @property
    def failing(self):
        return self.records_fail or self.logs_fail

    @failing.setter
    def failing(self, value):
        self.records_fail = self.logs_fail = value

    def _refuse(self):
        if self.records_fail:
            self.failed += 1
            raise StoreError(self.db_path, sqlite3.OperationalError("database or disk is full"))

    def create(self, **fields):
        self._refuse()
        return super().create(**fields)

    def update(self, job_id, **fields):
        self._refuse()
        return super().update(job_id, **fields)

    def log_writer(self, job_id):
        if self.logs_fail:
            self.failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return FailingLog(super().log_writer(job_id), self)


def lines(n, rc):
    """A job printing `n` numbered lines, pausing now and then, exiting `rc`."""
    script = (
        'i=0; while [ $i -lt "$1" ]; do i=$((i+1)); echo "line $i of $1";'
        ' [ $((i % 200)) = 0 ] && sleep 0.02; done; exit "$2"'
    )
    return sh(script, str(n), str(rc)), "".join(f"line {i} of {n}\n" for i in range(1, n + 1))


def check_waiting(job):
    """Every job not final says what it waits for and by when it is checked again."""
    if JobState(job["state"]).is_final:
        assert job["waiting"] is None, job
        return
    assert job["waiting"] is not None, job
    JobWait(job["waiting"]["reason"])
    datetime.fromisoformat(job["waiting"]["next_check"])
    if job["store_error"] is not None:
        assert StoreReason(job["store_error"]["reason"]) == StoreReason.DISK_FULL
        assert "\n" not in job["store_error"]["message"]


@pytest.fixture
def faulty(tmp_path):
    made = []

    def make(**mpi):
        work = tmp_path / f"d{len(made)}"
        work.mkdir()
        made.append(LocalJobs(work, store=FaultyStore, **mpi).start())
        return made[-1]

    yield make
    for lj in made:
        lj.store.failing = False
        lj.close()


def finish_all(lj, ids):
    """Let the clock run until every job's final state is written (read from the store)."""
    with lj.clock.ticking(0.5):
        wait_for(
            lambda: all(JobState(lj.store.record(i).state).is_final for i in ids),
            what="every job final in the store",
        )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    slots=st.integers(1, 2),
    jobs=st.lists(st.tuples(st.integers(1, 3000), st.sampled_from([0, 0, 3])), min_size=1,
                  max_size=3),
    faults=st.lists(st.tuples(st.booleans(), st.integers(0, 15)), min_size=1, max_size=6),
)  # fmt: skip
def test_under_store_faults_every_job_waits_with_a_reason_and_ends_complete(
    tmp_path_factory, slots, jobs, faults
):
    """Property: with record and log writes failing and recovering at any moment, every
    answer for a job not final has `waiting` (a reason and a next check); once the
    writes succeed again, every job reaches its final state, written, with its whole
    log, no byte twice, and no store_error left."""
    lj = LocalJobs(
        tmp_path_factory.mktemp("prop"), store=FaultyStore, max_concurrent_jobs=slots
    ).start()
    try:
        expected = {}
        for n, rc in jobs:
            program, out = lines(n, rc)
            expected[lj.jobs.submit({"program": program, "wait": False})["id"]] = (out, rc)
        with lj.clock.ticking(0.25):
            for failing, pause in faults:
                lj.store.failing = failing
                for _ in range(pause):
                    for job in lj.jobs.list():
                        check_waiting(job)
                    threading.Event().wait(0.01)
            lj.store.failing = False
        finish_all(lj, expected)
        for job_id, (out, rc) in expected.items():
            job = lj.jobs.get(job_id)
            check_waiting(job)
            assert job["state"] == ("succeeded" if rc == 0 else "failed"), job
            assert job["exit_code"] == rc and job["store_error"] is None, job
            assert lj.jobs.read_log(job_id, 0, 1 << 20)[0].decode() == out
    finally:
        lj.store.failing = False
        lj.close()


def test_a_disk_full_mid_job_is_shown_then_caught_up_without_a_byte_lost(faulty, tmp_path):
    """The job's output goes on while its log cannot be written; the answer shows the
    record as known (running) with store_error and store-retry; once writable, the log
    is complete and the job succeeds, with no restart."""
    lj = faulty()
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: lj.jobs.read_log(job["id"], 0, 100)[0] == b"started\n", what="started")
    lj.store.failing = True
    (tmp_path / "go").touch()  # "done" is printed while the log cannot take it
    with lj.clock.ticking(0.5):
        # the fault shows first, then the retry's wait (one step of the job's thread later)
        wait_for(
            lambda: lj.jobs.get(job["id"])["waiting"]["reason"] == "store-retry",
            what="store-retry",
        )
        shown = lj.jobs.get(job["id"])
        assert shown["state"] == "running" and shown["store_error"] is not None
        assert shown["store_error"]["reason"] == "state-disk-full"
        assert shown["store_error"]["message"] == (
            "cannot write the job's log: No space left on device; retrying"
        )
        wait_for(lambda: lj.store.failed > 3, what="a few retries")  # backoff, no giving up
        assert lj.jobs.get(job["id"])["state"] == "running"
        lj.store.failing = False
    finish_all(lj, [job["id"]])
    done = lj.jobs.wait(job["id"])
    assert (done["state"], done["response"], done["store_error"]) == (
        "succeeded",
        "started\ndone\n",
        None,
    )


def test_an_unwritable_final_state_is_kept_shown_and_written_later(faulty):
    """The job ends while its record cannot be written: the answer says succeeded (from
    memory), the store still says running, and the job stays live until it is written."""
    lj = faulty()
    gate_file = lj.tmp / "go"
    job = lj.jobs.submit({"program": gate(gate_file), "wait": False})
    wait_for(lambda: lj.jobs.read_log(job["id"], 0, 100)[0] == b"started\n", what="started")
    wait_for(lambda: lj.store.record(job["id"]).state == "running", what="running stored")
    with lj.clock.ticking(0.5):
        lj.store.records_fail = True  # the log takes the output; the final state fails
        gate_file.touch()
        wait_for(lambda: lj.jobs.get(job["id"])["state"] == "succeeded", what="succeeded shown")
        assert lj.store.record(job["id"]).state == "running"  # not written yet
        shown = lj.jobs.get(job["id"])
        assert shown["store_error"]["message"] == (
            "cannot write the job's record: database or disk is full; retrying"
        )
        assert lj.jobs.wait(job["id"])["response"] == "started\ndone\n"  # a waiter is answered
        before = lj.store.failed
        wait_for(lambda: lj.store.failed > before + 2, what="the final state retried")
        lj.store.failing = False
    finish_all(lj, [job["id"]])
    assert lj.jobs.get(job["id"])["store_error"] is None


def test_a_follower_of_a_job_that_cannot_write_ends_with_what_there_is(faulty, tmp_path):
    """A log follower and a sync waiter of a job whose writes keep failing end, once the
    fault has lasted FOLLOW_STORE_FAULT_S, with what the log holds."""
    lj = faulty()
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: lj.jobs.read_log(job["id"], 0, 100)[0] == b"started\n", what="started")
    lj.store.failing = True
    (tmp_path / "go").touch()
    got, answered = [], []
    follower = threading.Thread(target=lambda: got.extend(lj.jobs.follow_log(job["id"])))
    waiter = threading.Thread(target=lambda: answered.append(lj.jobs.wait(job["id"])))
    follower.start()
    waiter.start()
    with lj.clock.ticking(1.0):  # the fault outlasts FOLLOW_STORE_FAULT_S on the job's clock
        follower.join(HANG)
        waiter.join(HANG)
        assert not follower.is_alive(), "the follower never ended"
        assert not waiter.is_alive(), "the sync wait never ended"
        assert answered[0]["state"] == "running" and answered[0]["store_error"] is not None
        assert answered[0]["response"].startswith("started\n")
        # what the log holds: "started", and the half of "done" the short write took
        assert b"".join(got) == lj.jobs.read_log(job["id"], 0, 100)[0] == b"started\ndo"
        fault = lj.jobs.get(job["id"])["store_error"]
        assert fault is not None
        since = datetime.fromisoformat(fault["since"]).timestamp()
        assert lj.clock.time() - since >= manager.FOLLOW_STORE_FAULT_S
        lj.store.failing = False
    finish_all(lj, [job["id"]])
    assert lj.jobs.wait(job["id"])["response"] == "started\ndone\n"


def test_ending_a_queued_job_during_a_fault_does_not_wait_on_the_disk(faulty, tmp_path):
    """A queued job cancelled while records cannot be written: the cancel returns at once
    (the write is retried in a thread of its own), the answer says cancelled, and the
    record is written once the disk takes writes."""
    lj = faulty(max_concurrent_jobs=1)
    first = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    queued = lj.jobs.submit({"program": sh("echo never"), "wait": False})
    assert lj.jobs.get(queued["id"])["waiting"]["reason"] == "queued"
    lj.store.records_fail = True
    run = lj.jobs._live[queued["id"]]
    ended = threading.Thread(target=run.cancel, args=(JobReason.CANCELLED, lj.jobs._queue))
    ended.start()
    ended.join(HANG)  # no clock moves: a cancel that retried the write itself would hang
    assert not ended.is_alive(), "the cancel waited on the disk"
    shown = lj.jobs.get(queued["id"])
    assert (shown["state"], shown["waiting"]) == ("cancelled", None)
    assert shown["store_error"]["reason"] == "state-disk-full"
    assert lj.store.record(queued["id"]).state == "pending"
    lj.store.records_fail = False
    (tmp_path / "go").touch()
    finish_all(lj, [first["id"], queued["id"]])
    assert lj.store.record(queued["id"]).state == "cancelled"
