"""The job logic, fast and without root: queue, cancel results, re-attach decisions,
timeouts, mpi.lost_after_s, retries after a broken status answer.

The real remote scripts run here through tests/localjobs.LocalPool (real sh, tail,
flock, kill), time is a ManualClock (timeouts and lost_after_s without sleeping).
The cluster tests (test_jobs.py) prove the same paths over real sshd and mpirun.
"""

import errno
import os
import re
import shutil
import subprocess

import pytest

from mlbench_daemon.errors import BadRequest, Conflict, InsufficientStorage, QueueFull
from mlbench_daemon.jobs import remote
from mlbench_daemon.jobs.launch import BACKOFF_S
from mlbench_daemon.ssh import Result
from mlbench_daemon.ssh_errors import SSHError, Unreachable, Untrusted
from mlbench_daemon.store import StoreError
from tests.helpers import wait_for
from tests.localjobs import LocalJobs, LocalPool, gate, settle, sh

pytestmark = [pytest.mark.logic, pytest.mark.timeout(60)]


@pytest.fixture
def local(tmp_path):
    made = []

    def make(**mpi):
        made.append(LocalJobs(tmp_path / f"d{len(made)}", **mpi).start())
        return made[-1]

    (tmp_path / "d0").mkdir()
    (tmp_path / "d1").mkdir()
    yield make
    for m in made:
        m.close()


def log_of(lj, job_id):
    return lj.jobs.read_log(job_id, 0, 1 << 20)[0]


# --- one job ------------------------------------------------------------------------------


def test_a_job_runs_to_its_exit_code_with_its_output(local):
    lj = local()
    done = lj.jobs.wait(lj.jobs.submit({"program": sh("echo hi; exit 3"), "wait": False})["id"])
    assert (done["state"], done["exit_code"], done["response"]) == ("failed", 3, "hi\n")
    assert done["master_name"] == "w-0" and done["reason"] is None
    wait_for(lambda: not list(lj.home.glob(".mlbench-daemon/jobs/*")), what="the job dir removed")


def test_no_usable_master_fails_the_job_naming_each_candidate(local):
    lj = local(mpirun="/nonexistent/mpirun")
    done = lj.jobs.wait(lj.jobs.submit({"wait": False})["id"])
    assert (done["state"], done["reason"]) == ("failed", "no-usable-master")
    assert done["error"] == (
        "w-0: /nonexistent/mpirun not found; w-1: /nonexistent/mpirun not found"
    )


def test_an_unreachable_master_candidate_is_skipped(local):
    lj = local()
    lj.pool.cut("127.77.0.1")
    done = lj.jobs.wait(lj.jobs.submit({"program": sh("echo x"), "wait": False})["id"])
    assert (done["state"], done["master_name"]) == ("succeeded", "w-1")
    assert done["error"].startswith("w-0: connection-refused: ")
    assert [n[2] for n in done["nodes"]] == ["w-1"]


# --- the SSHError("ssh-error") bug ----------------------------------------------------------


def test_ssh_error_accepts_its_reasons_and_rejects_others_with_a_value_error():
    """SSHError("ssh-error", ...) used to raise AssertionError (empty reasons); a wrong
    reason must be a ValueError, also under python -O."""
    assert SSHError("ssh-error", "x").reason == "ssh-error"
    assert Unreachable("ssh-error", "x").phase == "Unknown"
    with pytest.raises(ValueError, match="auth-failed"):
        Unreachable("auth-failed", "x")
    with pytest.raises(ValueError):
        Untrusted("no-such-reason", "x")


def test_a_broken_status_answer_is_retried_not_a_daemon_error(local):
    """The status check exits non-zero once: the follower retries (as after a lost link)
    and the job ends succeeded; before, the error escaped as AssertionError and the job
    was recorded lost with reason daemon-error."""
    lj = local()
    broken = []

    def fault(ip, argv):
        if remote.STATUS in argv and not broken:
            broken.append(ip)
            return Result(2, b"", b"sh: cannot fork")
        return None

    lj.pool.fault = fault
    job = lj.jobs.submit({"program": sh("echo out"), "wait": False})
    wait_for(lambda: broken, what="the broken status answer")
    done = lj.run_clock_until_final(job["id"], BACKOFF_S[0])
    assert (done["state"], done["exit_code"], done["response"]) == ("succeeded", 0, "out\n")
    assert lj.pool.ran(remote.STATUS) == 2


def test_status_answers_are_parsed_or_refused():
    assert remote.Status.parse("done 3 17\n") == remote.Status("done", 3, 17)
    assert remote.Status.parse("done x 17") == remote.Status("done", None, 17)
    assert remote.Status.parse("running - 5") == remote.Status("running", None, 5)
    assert remote.Status.parse("missing") == remote.Status("missing")
    for bad in ("", "done 1", "what 1 2", "running - x"):
        with pytest.raises(ValueError):
            remote.Status.parse(bad)


# --- the queue ------------------------------------------------------------------------------


def test_queue_is_fifo_and_bounded(local, tmp_path):
    lj = local(max_concurrent_jobs=1, queue_size=2)
    first = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    second = lj.jobs.submit({"program": sh("echo second"), "wait": False})
    third = lj.jobs.submit({"program": sh("echo third"), "wait": False})
    with pytest.raises(QueueFull, match="1 job\\(s\\) running and 2 queued"):
        lj.jobs.submit({"program": sh("echo x"), "wait": False})
    lj.wait_state(first["id"], "running")
    settle()
    assert lj.state(second["id"]) == lj.state(third["id"]) == "pending"
    (tmp_path / "go").touch()
    jobs = [lj.jobs.wait(j["id"]) for j in (first, second, third)]
    assert [j["state"] for j in jobs] == ["succeeded"] * 3
    assert jobs[0]["finished"] <= jobs[1]["started"] <= jobs[1]["finished"] <= jobs[2]["started"]


def test_two_slots_run_two_jobs_at_once(local, tmp_path):
    lj = local(max_concurrent_jobs=2, queue_size=0)
    a = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    b = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    with pytest.raises(QueueFull):
        lj.jobs.submit({"wait": False})
    lj.wait_state(a["id"], "running")
    lj.wait_state(b["id"], "running")
    (tmp_path / "go").touch()
    assert {lj.jobs.wait(j["id"])["state"] for j in (a, b)} == {"succeeded"}


# --- cancel ---------------------------------------------------------------------------------


# A cancel whose kill cannot end the job answers 202 once server.cancel_answer_s has
# passed: these tests wait that long for real, so they set it short (0.5 s; the default's
# 2 s was 6 of the logic stage's seconds). They still fail a cancel that answers 200
# early, or waits past its bound.
ANSWER_SOON = {"cancel_answer_s": 0.5}


def test_cancel_results(local, tmp_path):
    lj = local(max_concurrent_jobs=1, queue_size=1, server=ANSWER_SOON)
    running = lj.jobs.submit({"program": gate(tmp_path / "never"), "wait": False})
    queued = lj.jobs.submit({"program": sh("echo never"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, running["id"]), what="the job to start")

    status, done = lj.jobs.cancel(queued["id"])  # dequeued: never launched, final at once
    assert status == 200
    assert (done["state"], done["reason"], done["master_name"]) == ("cancelled", "cancelled", None)

    lj.pool.cut("127.77.0.1")  # the master: the kill cannot be delivered, and is tried again
    status, job = lj.jobs.cancel(running["id"])
    assert (status, job["state"]) == (202, "running")
    assert re.fullmatch(r"cancelled not delivered to w-0: .*; trying again in 5 s", job["error"])
    assert BACKOFF_S[1] in lj.clock.pending_timers()
    status, _ = lj.jobs.cancel(running["id"])  # under way: answered at once, nothing new
    assert status == 202

    lj.pool.heal("127.77.0.1")
    done = lj.run_clock_until_final(running["id"], 0.5)  # the kill is tried again
    # "killed" if the group outlived the grace (here: as a zombie until init reaps it)
    assert re.fullmatch(
        r"cancelled: process group (terminated|killed); verified no process left on 2 host\(s\)",
        done["error"],
    ), done["error"]
    with pytest.raises(Conflict, match="already cancelled"):
        lj.jobs.cancel(running["id"])


def test_a_cancel_the_store_cannot_record_answers_507_and_still_kills(local, tmp_path):
    # a full disk (every record write fails; a real one cannot be timed to the cancel's
    # writes): the answer names the reason, and the kill and sweep go on all the same
    lj = local(server=ANSWER_SOON)
    job = lj.jobs.submit({"program": gate(tmp_path / "never"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    pid = lj.store.record(job["id"]).pid
    full = OSError(errno.ENOSPC, "No space left on device")

    def update(job_id, **fields):
        lj.store.fault = StoreError(lj.store.db_path, full)
        raise lj.store.fault

    lj.store.update = update
    lj.store.fault = StoreError(lj.store.db_path, full)  # as a write (or the probe) met it
    with pytest.raises(InsufficientStorage) as e:
        lj.jobs.cancel(job["id"])
    assert e.value.error == "state-disk-full"
    assert "the cancel goes on" in e.value.message and "state-disk-full" in e.value.message
    wait_for(lambda: not group_alive(pid), what="the job's process group to be killed")


def group_alive(pid):
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_job_that_ends_while_its_kill_is_undelivered_keeps_its_own_end(local, tmp_path):
    lj = local(server=ANSWER_SOON)
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    lj.pool.cut("127.77.0.1")
    status, got = lj.jobs.cancel(job["id"])
    assert status == 202 and "not delivered" in got["error"]
    (tmp_path / "go").touch()  # it ends by itself before the kill is tried again (in 5 s)
    lj.pool.heal("127.77.0.1")
    done = lj.run_clock_until_final(job["id"], 0.5)
    assert (done["state"], done["reason"], done["error"]) == ("succeeded", None, None)
    assert done["response"] == "started\ndone\n"


def test_cancel_of_an_unknown_or_unfollowed_job_is_refused(local):
    lj = local()
    rec = lj.store.create(command=["x"])
    with pytest.raises(Conflict, match="not followed by this daemon"):
        lj.jobs.cancel(rec.id)


# --- timeouts and lost_after_s: on the manual clock -------------------------------------------


def test_timeout_cancels_when_the_clock_says_so(local, tmp_path):
    lj = local()
    job = lj.jobs.submit({"program": gate(tmp_path / "never"), "timeout_s": 30, "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    assert lj.clock.pending_timers() == [30.0]
    lj.clock.advance(29.9)
    settle()
    assert lj.state(job["id"]) == "running"
    lj.clock.advance(0.1)
    done = lj.run_clock_until_final(job["id"], 0.5)
    assert (done["state"], done["reason"], done["exit_code"]) == ("cancelled", "timeout", None)
    assert re.match(
        r"timeout: process group (terminated|killed); verified no process", done["error"]
    )


def test_an_undelivered_timeout_is_tried_again(local, tmp_path):
    lj = local(lost_after_s=0)
    job = lj.jobs.submit({"program": gate(tmp_path / "never"), "timeout_s": 10, "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    lj.pool.cut("127.77.0.1")
    lj.clock.advance(10)
    wait_for(lambda: "not delivered" in (lj.jobs.get(job["id"])["error"] or ""), what="a try")
    assert lj.state(job["id"]) == "running"
    wait_for(lambda: BACKOFF_S[1] in lj.clock.pending_timers(), what="the retry timer")
    lj.pool.heal("127.77.0.1")
    lj.clock.advance(BACKOFF_S[1])
    done = lj.run_clock_until_final(job["id"], 0.5)
    assert (done["state"], done["reason"]) == ("cancelled", "timeout")


def test_master_unreachable_for_lost_after_s_makes_the_job_lost(local, tmp_path):
    lj = local(lost_after_s=20, max_concurrent_jobs=1)
    job = lj.jobs.submit({"program": gate(tmp_path / "never"), "wait": False})
    nxt = lj.jobs.submit({"program": sh("echo next"), "nodes": ["w-1"], "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    lj.pool.cut("127.77.0.1")
    for _ in range(19):
        lj.clock.advance(1)
    settle()
    assert lj.state(job["id"]) == "running"
    done = lj.run_clock_until_final(job["id"], 1)
    assert lj.clock.now < 60
    assert (done["state"], done["reason"]) == ("lost", "master-unreachable")
    assert done["error"].startswith("the master was unreachable for 20 s (")
    assert lj.jobs.wait(nxt["id"])["state"] == "succeeded"  # the slot was freed


def test_lost_after_s_0_keeps_trying(local, tmp_path):
    lj = local(lost_after_s=0)
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    lj.pool.cut("127.77.0.1")
    for _ in range(100):
        lj.clock.advance(BACKOFF_S[1])
    assert lj.state(job["id"]) == "running"
    (tmp_path / "go").touch()
    lj.pool.heal("127.77.0.1")
    done = lj.run_clock_until_final(job["id"], BACKOFF_S[1])
    assert (done["state"], done["response"]) == ("succeeded", "started\ndone\n")


# --- re-attach after a restart ----------------------------------------------------------------


def test_restart_reattaches_a_running_job_and_completes_its_log(local, tmp_path):
    lj = local()
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    lj.restart()
    (tmp_path / "go").touch()
    done = lj.jobs.wait(job["id"])
    assert (done["state"], done["response"]) == ("succeeded", "started\ndone\n")


# The job writes this many bytes while the daemon is away: enough to be packed (CATCH_UP_MIN)
AWAY = "seq 1 400000; "  # 2,888,896 bytes


def test_a_restart_catches_up_what_was_written_meanwhile_packed_and_exact(local, tmp_path):
    lj = local()
    script = (
        'echo started; while [ ! -e "$1" ]; do sleep 0.01; done; ' + AWAY + ': > "$1.wrote"; '
        'while [ ! -e "$2" ]; do sleep 0.01; done; echo done'
    )
    go, more = tmp_path / "go", tmp_path / "more"
    job = lj.jobs.submit({"program": sh(script, str(go), str(more)), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    catch_ups = lambda: [argv for _, argv in lj.pool.calls if remote.CATCH_UP in argv]  # noqa: E731
    assert catch_ups() == []  # a job followed from its start has nothing to catch up
    lj.jobs.stop()
    go.touch()
    wait_for((tmp_path / "go.wrote").exists, what="the output written while away")
    lj.restart()
    away = b"started\n" + b"".join(b"%d\n" % i for i in range(1, 400001))
    assert len(away) - len(b"started\n") >= remote.CATCH_UP_MIN
    wait_for(lambda: lj.jobs.log_size(job["id"]) == len(away), what="the catch-up")
    more.touch()
    done = lj.jobs.wait(job["id"])
    whole = open(lj.store.log_path(job["id"]), "rb").read()
    assert (done["state"], whole) == ("succeeded", away + b"done\n")
    # all of it came packed: the plain follow after the restart started past it
    follows = [argv for _, argv in lj.pool.calls if remote.FOLLOW in argv]
    assert follows[-1][-1] == str(len(away) + 1)
    assert len(catch_ups()) == 1  # once, after the restart


def packed(data: bytes) -> bytes:
    """`data` as the master's zstd packs it (CATCH_UP)."""
    return subprocess.run(["zstd", "-1", "-q", "-c"], input=data, capture_output=True).stdout


class Chunks:
    """A Stream of given chunks (closed: whether close() was called)."""

    def __init__(self, chunks):
        self.chunks, self.closed = chunks, False

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        self.closed = True


DIGITS = b"".join(b"%d" % (i % 10) * 99 + b"\n" for i in range(10))


@pytest.mark.parametrize("first", [1, 1000])  # the mark alone, or with packed bytes
def test_caught_up_unpacks_in_bounded_pieces_and_a_cut_gives_a_prefix(first):
    data = DIGITS * 50_000  # 50 MB that packs to a few KB
    wire = b"z" + packed(data)
    chunks = [wire[:first]] + [wire[i : i + 1000] for i in range(first, len(wire), 1000)]
    stream = Chunks(chunks)
    pieces = list(remote.CaughtUp(stream))
    assert b"".join(pieces) == data and stream.closed
    assert max(map(len, pieces)) <= remote.UNPACK_SIZE
    cut = b"".join(remote.CaughtUp(Chunks(chunks[: len(chunks) // 2])))
    assert 0 < len(cut) < len(data) and data.startswith(cut)


def test_caught_up_is_empty_without_the_mark():
    for chunks in ([], [b"plain output"], [b"", b"z"]):
        stream = Chunks(chunks)
        assert list(remote.CaughtUp(stream)) == [] and stream.closed


def test_the_catch_up_script_packs_only_enough_bytes_and_only_with_zstd(tmp_path, monkeypatch):
    job = tmp_path / "job"
    job.mkdir()
    data = DIGITS * (remote.CATCH_UP_MIN // len(DIGITS) + 1)
    (job / "out").write_bytes(data)
    r = remote.Remote(LocalPool(tmp_path), 10.0)
    host = remote.Host("127.0.0.1", 22)
    assert b"".join(r.catch_up(host, str(job), 5, 10.0)) == data[5:]
    enough = len(data) - remote.CATCH_UP_MIN
    assert b"".join(r.catch_up(host, str(job), enough, 10.0)) == data[enough:]
    assert list(r.catch_up(host, str(job), enough + 1, 10.0)) == []  # too few: FOLLOW's
    tools = tmp_path / "bin"  # a master without zstd
    tools.mkdir()
    for tool in ("sh", "stat", "tail"):
        (tools / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(tools))
    assert list(r.catch_up(host, str(job), 0, 10.0)) == []


# A job with rank_output, its launcher's tagged output printed by the program itself (the
# stand-in mpirun tags nothing): rank 1's pieces end without a newline, the next tag
# follows on the same line; launcher lines come between.
TAGGED = """i=0
while [ $i -lt 300 ]; do
  printf '[1,0]<stdout>:line %d\\n[1,1]<stdout>:part %d' $i $i
  printf '[1,2]<stderr>:x\\n---- mpirun\\n[1,1]<stdout>: end\\n'
  i=$((i+1))
done
echo '[1,0]<stdout>:started'
while [ ! -e "$1" ]; do sleep 0.01; done
printf '[1,2]<stdout>:last'
"""


def test_rank_output_splits_the_log_and_a_restart_loses_and_doubles_nothing(local, tmp_path):
    lj = local()
    job = lj.jobs.submit(
        {"program": sh(TAGGED, str(tmp_path / "go")), "np": 3, "rank_output": True, "wait": False}
    )
    assert job["rank_output"] and "--tag-output" in job["command"]
    wait_for(lambda: b"started" in lj.jobs.read_log(job["id"], 0, 1 << 20, 0)[0], what="rank 0")
    lj.restart()  # the rank logs hold more than their checkpoint (none yet): cut and split again
    (tmp_path / "go").touch()
    done = lj.jobs.wait(job["id"])
    assert done["state"] == "succeeded"
    want = {
        0: "".join(f"line {i}\n" for i in range(300)) + "started\n",
        1: "".join(f"part {i} end\n" for i in range(300)),
        2: "x\n" * 300 + "last",
    }
    for rank, text in want.items():
        assert lj.jobs.read_log(job["id"], 0, 1 << 20, rank)[0] == text.encode()
        assert lj.jobs.log_size(job["id"], rank) == len(text)
        assert b"".join(lj.jobs.follow_log(job["id"], 0, rank=rank)) == text.encode()
    assert done["response"].count("---- mpirun\n") == 300  # the combined log keeps all
    with pytest.raises(BadRequest, match=r"has ranks 0 to 2, not 3") as info:
        lj.jobs.read_log(job["id"], 0, 10, 3)
    assert info.value.field == "rank"
    plain = lj.jobs.wait(lj.jobs.submit({"program": sh("echo hi"), "wait": False})["id"])
    assert not plain["rank_output"] and "--tag-output" not in plain["command"]
    with pytest.raises(BadRequest, match="not submitted with rank_output: true"):
        lj.jobs.read_log(plain["id"], 0, 10, 0)


def test_a_stale_cancel_note_is_cleared_when_the_job_succeeds(local, tmp_path):
    # issue 19: a kill wrote its note, the daemon restarted before the job's end, and
    # the job, re-attached, succeeded: its error must not still say "cancelled: ..."
    lj = local()
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    note = "cancelled: process group gone; verified no process left on 1 host(s)"
    lj.store.update(job["id"], error=note)  # what _kill_and_sweep writes
    lj.restart()
    assert lj.jobs.get(job["id"])["error"] == note
    (tmp_path / "go").touch()
    done = lj.jobs.wait(job["id"])
    assert (done["state"], done["error"]) == ("succeeded", None)


def test_a_kill_recorded_before_a_restart_ends_the_job_cancelled(local, tmp_path):
    # the kill terminated the group, the daemon restarted before recording the end: the
    # re-attached job is cancelled (by that kill), whatever exit status is left
    lj = local()
    job = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    wait_for(lambda: b"started" in log_of(lj, job["id"]), what="the job to start")
    note = "timeout: process group terminated; verified no process left on 1 host(s)"
    lj.store.update(job["id"], error=note)
    lj.restart()
    (tmp_path / "go").touch()
    done = lj.jobs.wait(job["id"])
    assert (done["state"], done["reason"], done["error"]) == ("cancelled", "timeout", note)


def test_restart_decides_for_each_unfinished_record(local, tmp_path):
    lj = local(max_concurrent_jobs=1)
    blocker = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    requeued = lj.jobs.submit({"program": sh("echo again"), "nodes": ["w-1"], "wait": False})
    secret = lj.jobs.submit({"program": sh("echo x"), "env": {"K": "v"}, "wait": False})
    wait_for(lambda: b"started" in log_of(lj, blocker["id"]), what="the job to start")
    # a launch the daemon died in: master chosen, no pid file written on it
    half = lj.store.create(command=["x"], remote_dir=".mlbench-daemon/jobs/nothing-here")
    lj.store.update(half.id, master_name="w-0", master_ip="127.77.0.1", master_port=22)
    lj.restart()

    lost = lj.jobs.get(secret["id"])
    assert (lost["state"], lost["reason"]) == ("lost", "daemon-restarted")
    assert "env values are never stored" in lost["error"]
    assert lj.jobs.wait(half.id)["reason"] == "launch-interrupted"
    (tmp_path / "go").touch()
    assert lj.jobs.wait(blocker["id"])["state"] == "succeeded"
    again = lj.jobs.wait(requeued["id"])
    assert (again["state"], again["master_name"], again["response"]) == (
        "succeeded",
        "w-1",
        "again\n",
    )


def test_a_requeued_job_whose_nodes_are_gone_fails_naming_them(local, tmp_path):
    lj = local(max_concurrent_jobs=1)
    blocker = lj.jobs.submit({"program": gate(tmp_path / "go"), "wait": False})
    requeued = lj.jobs.submit({"program": sh("echo x"), "nodes": ["w-1"], "wait": False})
    wait_for(lambda: b"started" in log_of(lj, blocker["id"]), what="the job to start")
    lj.registry.statuses = lj.registry.statuses[:1]  # w-1 left the cluster meanwhile
    lj.restart()
    (tmp_path / "go").touch()
    done = lj.jobs.wait(requeued["id"])
    assert (done["state"], done["reason"]) == ("failed", "no-usable-master")
    assert done["error"] == "w-1: not Running after the restart"
