"""Stalls (jobs/stall.py) without root: the episode logic on given times, and a job on the
local pool (tests/localjobs.py) whose time is a ManualClock, so the quiet of
`stall_after_s` passes without waiting.  The roll-call is the Context's seam
(``ctx.roll_call``): here a fixed answer naming rank 1; tests/test_stall.py takes real
ones on the cluster."""

import datetime
import json

import pytest

from mlbench_daemon.errors import BadRequest
from mlbench_daemon.jobs import stall
from mlbench_daemon.jobs.request import validate
from mlbench_daemon.shapes import RollCall, Suspect
from tests.helpers import wait_for
from tests.localjobs import LocalJobs, settle, sh

pytestmark = [pytest.mark.logic, pytest.mark.timeout(60)]

AFTER = 8.0  # stall_after_s of the jobs here: checked every 2 s


# --- the episodes, on given times -----------------------------------------------------------


def test_an_episode_opens_once_the_quiet_reaches_stall_after_s_and_ends_when_output_grows():
    s = stall.Stalls([], quiet_since=100.0)
    assert s.check(107.9, AFTER) is None
    episode = s.check(108.0, AFTER)
    assert episode is not None and (episode["since"], episode["detected"]) == (100.0, 108.0)
    assert s.check(120.0, AFTER) is None  # one episode at a time: one roll-call per episode
    assert s.grew(121.0) and s.open is None and episode["ended"] == 121.0
    assert not s.grew(122.0)  # no episode under way: nothing ended
    assert s.check(129.9, AFTER) is None  # the quiet counts from the last growth
    assert s.check(130.0, AFTER) is not None and len(s.episodes) == 2


def test_zero_turns_detection_off():
    assert stall.Stalls([], quiet_since=0.0).check(1e6, 0.0) is None


def test_only_the_newest_roll_call_is_kept_whole_and_older_episodes_keep_their_suspects():
    s = stall.Stalls([], quiet_since=0.0)
    first = s.check(10.0, AFTER)
    assert first is not None
    s.roll_call_taken(first, {"suspects": [{"rank": 1}]}, None)
    s.grew(11.0)
    second = s.check(20.0, AFTER)
    assert second is not None
    s.roll_call_taken(second, {"suspects": []}, None)
    assert first["roll_call"] is None and first["suspects"] == [{"rank": 1}]
    assert stall.last_suspects(s.episodes) == []  # the last roll-call's, even when empty
    s.grew(21.0)
    third = s.check(30.0, AFTER)
    assert third is not None
    s.roll_call_taken(third, None, "job x is failed: a roll-call needs a running job's ranks")
    assert second["roll_call"] == {"suspects": []}  # a failed roll-call keeps the last one
    assert third["roll_call_error"].startswith("job x is failed")
    assert stall.last_suspects([]) is None


def test_the_record_keeps_at_most_max_episodes_oldest_dropped():
    s = stall.Stalls([], quiet_since=0.0)
    for i in range(stall.MAX_EPISODES + 3):
        assert s.check(i * 100.0 + AFTER, AFTER) is not None
        s.grew(i * 100.0 + 50.0)
        s.quiet_since = (i + 1) * 100.0
    assert len(s.episodes) == stall.MAX_EPISODES
    assert s.episodes[0]["since"] == 300.0


def test_an_episode_left_open_by_a_previous_daemon_goes_on_from_its_own_since():
    s = stall.Stalls([{"since": 5.0, "detected": 13.0, "ended": None, "roll_call": None,
                       "roll_call_error": None, "suspects": []}], quiet_since=500.0)  # fmt: skip
    assert s.quiet_since == 5.0 and s.check(600.0, AFTER) is None


def test_view_shows_the_open_episode_of_a_running_job_with_its_quiet_so_far():
    s = stall.Stalls([], quiet_since=1_800_000_000.0)
    s.check(1_800_000_010.0, AFTER)
    stalled, stalls = stall.view(s.episodes, 1_800_000_012.5, running=True)
    assert stalled is not None and stalled["quiet_s"] == 12.5 and stalled["ended"] is None
    assert stalls == []
    stalled, stalls = stall.view(s.episodes, 1_800_000_012.5, running=False)
    assert stalled is None and len(stalls) == 1  # never lost from the answer


def test_the_check_interval_is_a_quarter_of_stall_after_s_within_bounds():
    assert stall.check_interval(8.0) == 2.0
    assert stall.check_interval(600.0) == stall.CHECK_MAX_S
    assert stall.check_interval(0.1) == stall.CHECK_MIN_S


@pytest.mark.parametrize("value", [-1, True, "5", 1e9])
def test_a_bad_stall_after_s_is_refused_naming_the_field(value):
    with pytest.raises(BadRequest) as e:
        validate({"stall_after_s": value}, ["true"])
    assert e.value.field == "stall_after_s"


# --- a job on the local pool -----------------------------------------------------------------


@pytest.fixture
def local(tmp_path):
    made = []

    def make(**mpi):
        lj = LocalJobs(tmp_path / f"d{len(made)}", **mpi).start()
        made.append(lj)
        lj.roll_calls = []
        lj.jobs._ctx.roll_call = lambda job_id: _fake_roll_call(lj, job_id)
        return lj

    (tmp_path / "d0").mkdir()
    yield make
    for m in made:
        m.close()


def _fake_roll_call(lj, job_id):
    lj.roll_calls.append(job_id)
    return RollCall(
        job_id=job_id, taken="2027-01-15T08:00:00.000Z", took_s=0.5, sample_s=0.2, ranks=[],
        groups=[], suspects=[Suspect(rank=1, node="w-1", top_frame="nanosleep")],
        nodes_failed=[],
    )  # fmt: skip


def _epoch(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def steps(lj, seconds, step=0.5):
    """Advance the clock `seconds` in `step`s, letting the stall timer fire and re-arm."""
    for _ in range(round(seconds / step)):
        lj.clock.advance(step)
        wait_for(lambda: lj.clock.pending_timers(), what="the stall timer armed again")


TWO_STEPS = (
    'echo started; while [ ! -e "$1/go1" ]; do sleep 0.01; done; echo more;'
    'while [ ! -e "$1/go2" ]; do sleep 0.01; done; exit 5'
)


def started(lj, tmp_path, script=TWO_STEPS, armed=True, **fields):
    """A job printing "started", then "more" once go1 exists, then exiting 5 once go2 does
    (`script`: another)."""
    job = lj.jobs.submit({"program": sh(script, str(tmp_path)), "wait": False, **fields})
    wait_for(lambda: lj.jobs.read_log(job["id"], 0, 100)[0] == b"started\n", what="started")
    if armed:
        wait_for(lambda: lj.clock.pending_timers(), what="the stall timer armed")
    return job["id"]


def test_a_quiet_job_is_stalled_within_stall_after_s_plus_one_interval_and_stays_running(
    local, tmp_path
):
    lj = local()
    job_id = started(lj, tmp_path, stall_after_s=AFTER)
    steps(lj, AFTER - 1)
    settle()
    assert lj.jobs.get(job_id)["stalled"] is None and lj.roll_calls == []
    steps(lj, 1 + stall.check_interval(AFTER))
    wait_for(lambda: (lj.jobs.get(job_id)["stalled"] or {}).get("roll_call"), what="stalled")
    job = lj.jobs.get(job_id)
    assert job["state"] == "running" and lj.jobs.stalled_count() == 1
    s = job["stalled"]
    assert s["quiet_s"] >= AFTER and s["ended"] is None
    quiet_when_seen = _epoch(s["detected"]) - _epoch(s["since"])
    assert AFTER <= quiet_when_seen <= AFTER + stall.check_interval(AFTER)
    assert s["suspects"] == [{"rank": 1, "node": "w-1", "top_frame": "nanosleep"}]
    steps(lj, 3 * AFTER)
    assert lj.roll_calls == [job_id]  # once per episode, however long it lasts
    assert lj.jobs.get(job_id)["stalled"]["quiet_s"] >= 4 * AFTER

    (tmp_path / "go1").touch()  # output again: the stall is over, its history stays
    wait_for(lambda: lj.jobs.get(job_id)["stalled"] is None, what="the stall over")
    job = lj.jobs.get(job_id)
    assert lj.jobs.stalled_count() == 0 and job["state"] == "running"
    (ended,) = job["stalls"]
    assert ended["ended"] is not None and ended["suspects"] == s["suspects"]
    assert ended["roll_call"]["suspects"] == s["suspects"]

    (tmp_path / "go2").touch()  # it fails later: the failure names the last suspects
    done = lj.run_clock_until_final(job_id, 0.5)
    assert done["state"] == "failed" and done["failure"]["suspects"] == s["suspects"]
    # (the clock runs on until the job's end is seen: a second stall may begin meanwhile)
    assert done["stalled"] is None and done["stalls"][0]["since"] == ended["since"]


def test_a_job_that_fails_while_stalled_ends_the_stall_and_carries_its_suspects(local, tmp_path):
    lj = local(stall_after_s=AFTER)  # the config's default, no field in the request
    silent = 'echo started; while [ ! -e "$1/go" ]; do sleep 0.01; done; exit 5'
    job_id = started(lj, tmp_path, silent)
    steps(lj, AFTER + stall.check_interval(AFTER))
    wait_for(lambda: (lj.jobs.get(job_id)["stalled"] or {}).get("roll_call"), what="stalled")
    (tmp_path / "go").touch()
    done = lj.run_clock_until_final(job_id, 0.5)
    assert [s["rank"] for s in done["failure"]["suspects"]] == [1]
    (episode,) = done["stalls"]  # ended with the job
    assert done["stalled"] is None and episode["ended"] == done["finished"]


def test_the_job_field_zero_turns_off_the_configured_default(local, tmp_path):
    lj = local(stall_after_s=2.0)
    job_id = started(lj, tmp_path, armed=False, stall_after_s=0)
    assert lj.clock.pending_timers() == []  # not even checked
    for _ in range(20):
        lj.clock.advance(1.0)
    settle(0.2)
    assert lj.jobs.get(job_id)["stalled"] is None and lj.roll_calls == []


def test_a_job_that_never_stalls_has_none(local, tmp_path):
    lj = local()
    job_id = started(lj, tmp_path, stall_after_s=AFTER)
    (tmp_path / "go1").touch()
    steps(lj, AFTER / 2)
    (tmp_path / "go2").touch()
    done = lj.run_clock_until_final(job_id, 0.5)
    assert (done["stalled"], done["stalls"]) == (None, [])
    assert "suspects" not in done["failure"] and lj.roll_calls == []


def test_a_restart_keeps_the_open_stall_and_its_roll_call_without_taking_another(local, tmp_path):
    lj = local()
    job_id = started(lj, tmp_path, stall_after_s=AFTER)
    steps(lj, AFTER + stall.check_interval(AFTER))
    wait_for(lambda: (lj.jobs.get(job_id)["stalled"] or {}).get("roll_call"), what="stalled")
    before = lj.jobs.get(job_id)["stalled"]
    lj.restart()
    lj.jobs._ctx.roll_call = lambda j: _fake_roll_call(lj, j)
    wait_for(lambda: lj.clock.pending_timers(), what="the stall timer armed after the restart")
    steps(lj, 2 * AFTER)
    after = lj.jobs.get(job_id)["stalled"]
    assert (after["since"], after["detected"], after["roll_call"]) == (
        before["since"], before["detected"], before["roll_call"],
    )  # fmt: skip
    assert after["quiet_s"] >= before["quiet_s"] + 2 * AFTER
    assert lj.roll_calls == [job_id] and lj.jobs.stalled_count() == 1


def test_a_job_list_sums_up_each_roll_call_and_the_job_keeps_it_whole(local, tmp_path):
    from mlbench_daemon.api import DOCUMENT
    from mlbench_daemon.shapes import NodeProblem, RankGroup, RankReport
    from tests.helpers import check_answer

    lj = local(stall_after_s=AFTER, max_concurrent_jobs=2)
    rank = dict(node="w-0", pid=7, state="S", cpu_s=1.0, cpu_percent=0.0, rss_bytes=1,
                wchan="poll", stack_source="wchan", stack_error=None, stack=["poll"])  # fmt: skip
    lj.jobs._ctx.roll_call = lambda job_id: RollCall(
        job_id=job_id, taken="2027-01-15T08:00:00.000Z", took_s=0.5, sample_s=0.2,
        ranks=[RankReport(rank=r, **rank) for r in range(3)],
        groups=[RankGroup(ranks=[0, 2], key=["do_poll"]), RankGroup(ranks=[1], key=["x"])],
        suspects=[Suspect(rank=1, node="w-0", top_frame="x")],
        nodes_failed=[NodeProblem(node="w-1", error="unreachable")],
    )  # fmt: skip
    quiet = lj.jobs.submit({"program": sh("echo started; sleep 60"), "wait": False})["id"]
    wait_for(lambda: lj.jobs.read_log(quiet, 0, 100)[0] == b"started\n", what="started")
    wait_for(lambda: lj.clock.pending_timers(), what="the stall timer armed")
    steps(lj, AFTER + stall.check_interval(AFTER))
    wait_for(lambda: (lj.jobs.get(quiet)["stalled"] or {}).get("roll_call"), what="stalled")
    other = lj.jobs.submit({"program": sh("echo hi"), "wait": False, "stall_after_s": 0})
    lj.jobs.wait(other["id"])
    listed = {j["id"]: j for j in lj.jobs.list()}
    whole = lj.jobs.get(quiet)
    assert len(whole["stalled"]["roll_call"]["ranks"]) == 3  # the job keeps it whole
    summed = listed[quiet]["stalled"]
    counts = {"ranks": 3, "groups": [2, 1], "nodes_failed": ["w-1"]}
    assert summed["roll_call"] == {"taken": "2027-01-15T08:00:00.000Z", "took_s": 0.5, **counts}
    assert summed["suspects"] == whole["stalled"]["suspects"]
    assert {k: v for k, v in summed.items() if k not in ("roll_call", "quiet_s")} == {
        k: v for k, v in whole["stalled"].items() if k not in ("roll_call", "quiet_s")
    }
    assert listed[other["id"]] == lj.jobs.get(other["id"])  # no stall: as the job answers
    body = json.dumps(list(listed.values())).encode()
    check_answer(DOCUMENT, "GET", "/api/mpi_jobs/", 200, "application/json", body)
    with pytest.raises(AssertionError, match="does not match"):  # the whole one is not a summary
        check_answer(DOCUMENT, "GET", "/api/mpi_jobs/", 200, "application/json",
                     json.dumps([whole]).encode())  # fmt: skip
