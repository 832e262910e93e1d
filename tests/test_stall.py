"""Stalls on the cluster (jobs/stall.py): real MPI jobs over real sshd, real mpirun on every
flavour, real roll-calls (gdb/eu-stack, py-spy for mpi4py).

The 4-rank programs are test_rollcall's: every rank prints "ready", then rank 1 sleeps
before MPI_Allreduce while the others wait in it, so the output stops growing; plus a
silent CPU-bound program (tests/data/rollcall/spin.c) whose ranks all spin in one
function.  The episode logic itself is proved on a manual clock in test_stall_logic.py;
the time bounds here are generous, apart from the one the daemon reports itself: the
quiet when the stall was detected (`detected` - `since`)."""

import datetime
import json
import os
import subprocess

import pytest

from mlbench_daemon.jobs import stall
from tests import test_rollcall, test_web
from tests.cluster import MPIS
from tests.helpers import HANG, http, served, wait_for
from tests.test_flavours import mpi_or_skip
from tests.test_jobs import wait_job_ended
from tests.test_rollcall import DATA, OVERSUBSCRIBE, PYSPY_VENV, cancel_running, stall_env

built = test_rollcall.built  # the stall programs, built once per session

AFTER = 4.0  # stall_after_s of these jobs: checked every second
# a timer thread may wake late on a loaded machine: slack on top of the daemon's own bound
SCHEDULING_SLACK_S = 3.0


def epoch(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stalled_with_roll_call(get, timeout=HANG):
    """Poll `get()` (the job's answer) until it is stalled with its roll-call -> the job."""
    seen = {}

    def ready():
        seen.update(get())
        assert seen["state"] in ("pending", "running"), seen
        s = seen["stalled"]
        return s is not None and (s["roll_call"] is not None or s["roll_call_error"])

    wait_for(ready, timeout=timeout, what="the job stalled, with its roll-call")
    return seen


def submit_ready(e, program, np=4, **fields):
    """Submit a job whose ranks each print "ready <rank>" (or "spinning"); wait for all."""
    job = e.jobs.submit({"program": program, "np": np, "wait": False, **fields})

    def ready():
        text = e.jobs.read_log(job["id"], 0, 1 << 20)[0].decode(errors="replace")
        assert e.jobs.get(job["id"])["state"] in ("pending", "running"), text
        return text.count("\n") >= np

    wait_for(ready, timeout=HANG, what="every rank's first line")
    return job["id"]


def check_bound(s):
    quiet = epoch(s["detected"]) - epoch(s["since"])
    print(f"stall detected after {quiet:.2f} s of quiet (bound {AFTER} + "
          f"{stall.check_interval(AFTER)} s)")  # fmt: skip
    assert AFTER <= quiet <= AFTER + stall.check_interval(AFTER) + SCHEDULING_SLACK_S, s


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(MPIS))
def test_a_rank_sleeping_before_the_allreduce_stalls_the_job_and_is_the_one_suspect(
    cluster, tmp_path, built, name
):
    progs, _ = built
    if name not in progs:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    e = stall_env(cluster, tmp_path, name, stall_after_s=AFTER)  # the config's default
    try:
        job_id = submit_ready(e, [str(progs[name]), "600"])
        job = stalled_with_roll_call(lambda: e.jobs.get(job_id))
        s = job["stalled"]
        check_bound(s)
        rc = s["roll_call"]
        assert rc is not None, s
        one = next(r for r in rc["ranks"] if r["rank"] == 1)
        assert [(x["rank"], x["node"]) for x in s["suspects"]] == [(1, one["node"])], rc
        assert "sleep" in (s["suspects"][0]["top_frame"] or ""), rc
        assert [g["ranks"] for g in rc["groups"]] == [[0, 2, 3], [1]], rc
        assert e.jobs.stalled_count() == 1
        assert e.jobs.get(job_id)["state"] == "running"  # a signal, not a verdict
    finally:
        cancel_running(e)
        e.close()


@pytest.mark.timeout(600)
def test_mpi4py_ranks_stall_with_py_spy_naming_the_function_rank_1_waits_in(cluster, tmp_path):
    python = PYSPY_VENV / "bin" / "python3"
    if not (PYSPY_VENV / "bin" / "py-spy").exists() or not python.exists():
        pytest.skip(f"no mpi4py and py-spy venv at {PYSPY_VENV} (.ci/run makes it)")
    script = cluster.dir / "bin" / "stall.py"
    script.parent.mkdir(exist_ok=True)
    script.write_bytes((DATA / "stall.py").read_bytes())
    for w in cluster.workers:  # the nodes have py-spy on their PATH
        cluster.set_env(w, PATH=f"{PYSPY_VENV / 'bin'}:/usr/local/bin:/usr/bin:/bin")
    e = stall_env(cluster, tmp_path, "openmpi4")
    try:
        job_id = submit_ready(e, [str(python), str(script), "600"], stall_after_s=AFTER)
        s = stalled_with_roll_call(lambda: e.jobs.get(job_id))["stalled"]
        check_bound(s)
        assert [(x["rank"], x["top_frame"]) for x in s["suspects"]] == [
            (1, "nap_before_allreduce (stall.py)")
        ], s
        rc = s["roll_call"]
        assert [r["stack_source"] for r in rc["ranks"]] == ["py-spy"] * 4, rc
        assert [g["ranks"] for g in rc["groups"]] == [[0, 2, 3], [1]], rc
    finally:
        cancel_running(e)
        e.close()


@pytest.mark.timeout(600)
def test_a_job_printing_every_5_s_is_never_stalled_at_8(cluster, tmp_path):
    e = stall_env(cluster, tmp_path, "openmpi4")
    try:
        tick = "for i in 1 2 3 4 5; do echo tick $i; sleep 5; done"
        job = e.jobs.submit(
            {"program": ["/bin/sh", "-c", tick], "np": 1, "stall_after_s": 8, "wait": False}
        )
        seen = []

        def ended():
            seen.append(e.jobs.get(job["id"]))
            return seen[-1]["state"] not in ("pending", "running")

        wait_for(ended, timeout=HANG, interval=0.25, what="the ticking job to end")
        assert seen[-1]["state"] == "succeeded", seen[-1]
        assert [j for j in seen if j["stalled"] is not None] == []
        assert seen[-1]["stalls"] == []
    finally:
        e.close()


@pytest.fixture(scope="session")
def spin(cluster_session):
    """A C MPI program whose ranks print "spinning", then spin in spin() for ever."""
    m = MPIS["openmpi4"]
    out = cluster_session.dir / "bin" / "spin-openmpi4"
    out.parent.mkdir(exist_ok=True)
    subprocess.run([m.mpicc, "-g", "-O0", "-o", out, DATA / "spin.c"], check=True, timeout=120)
    return out


@pytest.mark.timeout(600)
def test_a_silent_cpu_bound_job_is_stalled_with_every_rank_on_a_cpu_and_no_suspect(
    cluster, tmp_path, spin
):
    """The honest case: a stall says only that the output stopped.  Ranks computing in
    silence look like this: every rank busy in one place, so no rank is odd."""
    e = stall_env(cluster, tmp_path, "openmpi4")
    try:
        job_id = submit_ready(e, [str(spin)], stall_after_s=AFTER)
        s = stalled_with_roll_call(lambda: e.jobs.get(job_id))["stalled"]
        rc = s["roll_call"]
        print(json.dumps([(r["rank"], r["state"], r["cpu_percent"]) for r in rc["ranks"]]))
        assert s["suspects"] == [] and rc["suspects"] == [], rc
        assert [g["ranks"] for g in rc["groups"]] == [[0, 1, 2, 3]], rc
        assert all("spin" in g["key"][0] for g in rc["groups"]), rc["groups"]
        # every rank runnable and using CPU; how much of a core each gets depends on the
        # machine's load (4 ranks on 3 workers, here 2 cores shared with other work), so
        # the figures are printed, not bounded
        load = os.getloadavg()[0]
        mean = sum(r["cpu_percent"] for r in rc["ranks"]) / 4
        print(f"silent CPU-bound ranks: mean {mean:.0f} % CPU in the sample (load {load:.1f})")
        for r in rc["ranks"]:
            assert r["state"] == "running" and r["cpu_s"] > 0, r
    finally:
        cancel_running(e)
        e.close()


@pytest.mark.timeout(600)
def test_a_stalled_job_that_fails_carries_the_last_roll_calls_suspects(cluster, tmp_path, built):
    progs, _ = built
    e = stall_env(cluster, tmp_path, "openmpi4")
    try:
        job_id = submit_ready(e, [str(progs["openmpi4"]), "600"], stall_after_s=AFTER)
        s = stalled_with_roll_call(lambda: e.jobs.get(job_id))["stalled"]
        one = next(r for r in s["roll_call"]["ranks"] if r["rank"] == 1)
        node = next(st.node for st in e.registry.nodes() if st.node.name == one["node"])
        # rank 1 dies (as the cluster user, over the daemon's own pool): the job fails
        e.pool.run(node.ip, node.port, ["kill", "-KILL", str(one["pid"])], timeout=30)
        done = e.jobs.wait(job_id, HANG)
        assert done["state"] == "failed", done
        assert [(x["rank"], x["node"]) for x in done["failure"]["suspects"]] == [
            (1, one["node"])
        ], done["failure"]
        assert done["stalled"] is None and len(done["stalls"]) == 1
        assert done["stalls"][0]["ended"] is not None
    finally:
        e.close()


@pytest.mark.timeout(600)
def test_kill_9_and_restart_keep_the_stalled_record_and_its_roll_call(cluster, tmp_path, built):
    progs, _ = built
    mpi = mpi_or_skip(cluster, "openmpi4")
    mpi = {**mpi, "args": [*mpi["args"], *OVERSUBSCRIBE["openmpi4"]], "cancel_grace_s": 1.0}
    with served(cluster, tmp_path, ssh={"use_system_known_hosts": False}, mpi=mpi) as d:
        body = {"program": [str(progs["openmpi4"]), "600"], "np": 4, "wait": False,
                "stall_after_s": AFTER}  # fmt: skip
        job_id = json.loads(http(d.url + "/api/mpi_jobs/", "POST", body)[1])["id"]

        def get():
            return json.loads(http(f"{d.url}/api/mpi_jobs/{job_id}")[1])

        before = stalled_with_roll_call(get)["stalled"]
        assert before["roll_call"] is not None, before
        assert b"mlbench_daemon_jobs_stalled 1.0" in http(d.url + "/metrics")[1]
        d.kill_and_restart()
        after = get()
        assert after["state"] == "running" and after["stalled"] is not None, after
        for key in ("since", "detected", "roll_call", "suspects"):
            assert after["stalled"][key] == before[key], key
        assert after["stalled"]["quiet_s"] >= before["quiet_s"]
        wait_for(  # followed again: the gauge counts it, and no second episode began
            lambda: b"mlbench_daemon_jobs_stalled 1.0" in http(d.url + "/metrics")[1],
            what="the gauge after the restart",
        )
        assert get()["stalled"]["detected"] == before["detected"]
        http(f"{d.url}/api/mpi_jobs/{job_id}", "DELETE")
        done = wait_job_ended(d.url, job_id)
        assert done["state"] == "cancelled" and done["stalls"][0]["roll_call"] is not None
        assert [x["rank"] for x in done["failure"]["suspects"]] == [1], done["failure"]


# --- the page: the stall banner and the roll-call table ----------------------------------

browser = test_web.browser  # Debian's chromium through Playwright, once per module


@pytest.mark.timeout(300)
def test_the_page_shows_the_stall_banner_and_the_roll_call_grouped_suspects_first(
    browser, start_daemon, cluster, built
):
    progs, _ = built
    mpi = mpi_or_skip(cluster, "openmpi4")
    d = start_daemon(mpi={"args": [*mpi["args"], *OVERSUBSCRIBE["openmpi4"]],
                          "cancel_grace_s": 1.0})  # fmt: skip
    body = {"program": [str(progs["openmpi4"]), "600"], "np": 4, "wait": False,
            "stall_after_s": AFTER}  # fmt: skip
    status, job = d.json("POST", "/api/mpi_jobs/", body)
    assert status == 202, job
    tab = test_web.Tab(browser, d.url)
    try:
        page = tab.open(f"#/jobs/{job['id']}")
        banner = test_web.wait_text(
            page.locator("#job-stall"), r"Stalled for \d+ s.*Suspects: rank 1 on", timeout=HANG
        )
        assert "The job still runs" in banner
        caption = test_web.wait_text(page.locator("#ranks-caption"), r"when the job stalled")
        assert "4 ranks, 2 stack group(s), 1 suspect(s)" in caption
        groups = page.locator("#ranks tbody")
        assert groups.count() == 2
        assert groups.nth(0).locator("th.group").inner_text().startswith("Suspect: rank 1 ")
        assert groups.nth(0).locator("tr.suspect").count() == 1
        assert groups.nth(1).locator("th.group").inner_text().startswith("Group: ranks 0, 2, 3 ")
        assert groups.nth(1).locator("tr").count() == 4  # its heading and three ranks
        assert "sleep" in groups.nth(0).locator("td.stack").inner_text()

        page.click("#ranks-take")  # a roll-call now: the table shows the newer one
        test_web.wait_text(page.locator("#ranks-caption"), r"taken on request", timeout=HANG)
        assert page.locator("#ranks tbody").count() == 2
        assert groups.nth(0).locator("th.group").inner_text().startswith("Suspect: rank 1 ")
        page.wait_for_timeout(2500)  # a refresh round of the job's poller
        assert tab.console_errors() == [] and tab.errors == [] and tab.csp() == []
    finally:
        tab.close()
        d.json("DELETE", f"/api/mpi_jobs/{job['id']}")
        d.wait_job(job["id"])
