"""jobs.Jobs: request validation, and whole jobs on the real namespace cluster
(real sshd, real mpirun across hosts, the real ssh.Pool and nodes.Registry)."""

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlbench_daemon import config
from mlbench_daemon.discovery import Discovery
from mlbench_daemon.errors import BadRequest, Conflict, QueueFull, Unavailable
from mlbench_daemon.jobs import Jobs, Request, json_with_response, remote, run, to_json, validate
from mlbench_daemon.nodes import Registry
from mlbench_daemon.ssh import Pool, Unreachable, watch
from mlbench_daemon.store import Store
from tests.helpers import HANG, append_log, cancel_job, http, served, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ["/bin/prog"]
SEED_KEYS = ["nodes", "command", "master_name", "response"]


# --- the follow script, run locally (real sh, tail, flock) ---------------------------------


@pytest.mark.parametrize("tail_knows_the_switch", [True, False])
def test_follow_streams_to_the_end_with_or_without_tails_polling_switch(
    tmp_path, tail_knows_the_switch
):
    """FOLLOW asks GNU tail to poll (fewer, larger SSH packets); a tail that does not
    know the switch must still follow the whole output to the job's end."""
    job, fake = tmp_path / "job", tmp_path / "bin"
    job.mkdir()
    fake.mkdir()
    calls = tmp_path / "tail-calls"
    reject = "" if tail_knows_the_switch else 'echo "tail: unrecognized option" >&2; exit 1'
    (fake / "tail").write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case " $* " in *" ---disable-inotify "*) {reject};; esac
exec {shutil.which("tail")} "$@"
""")
    (fake / "tail").chmod(0o755)
    # the job: holds the lock as the wrapper does, writes 200 lines over about a second
    ready = job / "ready"
    writer = subprocess.Popen(
        [
            "sh",
            "-c",
            "exec 9> lock; flock -x 9; : > out; : > ready; i=0; "
            "while [ $i -lt 200 ]; do echo line $i >> out; i=$((i+1)); "
            "[ $((i % 20)) = 0 ] && sleep 0.1; done; echo 0 > rc",
        ],
        cwd=job,
    )
    deadline = time.monotonic() + HANG
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    follow = subprocess.run(
        ["sh", "-c", remote.FOLLOW, "sh", str(job), "1"],
        env=env,
        capture_output=True,
        timeout=HANG,
    )
    writer.wait(HANG)
    assert follow.returncode == 0
    assert follow.stdout == b"".join(b"line %d\n" % i for i in range(200))
    following = calls.read_text().splitlines()[-1]  # the tail that followed
    assert "-F" in following.split()
    assert ("---disable-inotify" in following.split()) == tail_knows_the_switch


# --- the sync answer, streamed (no cluster) -----------------------------------------------


@pytest.fixture(scope="module")
def one_store(tmp_path_factory):
    """One store for every example: opening a store per example was most of the test's time."""
    store = Store(tmp_path_factory.mktemp("streamed"))
    yield store
    store.close()


@settings(max_examples=200, deadline=None)
@given(
    log=st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode)),
    chunk=st.integers(1, 9),
    master=st.one_of(st.none(), st.text(max_size=5)),
)
def test_streamed_sync_answer_is_the_json_of_the_whole_answer(one_store, log, chunk, master):
    """Whatever the bytes (split UTF-8, invalid sequences, quotes, controls) and
    wherever the chunks split them, the streamed document is json.dumps of the
    job dict with the whole log decoded as "response"."""
    store = one_store  # each example is a job of its own in it
    rec = store.create(command=["mpirun", "x"], env_names=["K"])
    if master is not None:
        rec = store.update(rec.id, master_name=master)
    append_log(store, rec.id, log)
    job = to_json(rec)
    expect = {}
    for k, v in job.items():
        expect[k] = v
        if k == "master_name":
            expect["response"] = log.decode("utf-8", errors="replace")
    pieces = json_with_response(store, job, len(log), chunk)
    assert b"".join(pieces) == json.dumps(expect).encode()


# --- validation (no cluster) -------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ([], "body"),
        ({"bogus": 1}, "bogus"),
        ({"program": "prog"}, "program"),
        ({"program": []}, "program"),
        ({"program": ["prog", 3]}, "program"),
        ({"program": ["prog", "a\0b"]}, "program"),
        ({"program": ["prog", "\ud800"]}, "program"),
        ({"program": ["-np", "5"]}, "program"),
        ({"program": ["", "x"]}, "program"),
        ({"program": ["prog", ":", "evil"]}, "program"),
        ({"env": ["A=1"]}, "env"),
        ({"env": {"1A": "x"}}, "env"),
        ({"env": {"A-B": "x"}}, "env"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"A": 1}}, "env"),
        ({"env": {"A": "x\0"}}, "env"),
        ({"env": {"OMPI_MCA_mlbench_job_id": "x"}}, "env"),
        ({"env": {"A": "x" * 300_000}}, "env"),
        ({"np": 0}, "np"),
        ({"np": True}, "np"),
        ({"np": "2"}, "np"),
        ({"np": 1.5}, "np"),
        ({"selector": 5}, "selector"),
        ({"selector": "a=b,,c"}, "selector"),
        ({"nodes": "w-0"}, "nodes"),
        ({"nodes": []}, "nodes"),
        ({"nodes": ["w-0", "w-0"]}, "nodes"),
        ({"nodes": [None]}, "nodes"),
        ({"master": ["w-0"]}, "master"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"timeout_s": "5"}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"wait": "yes"}, "wait"),
    ],
)
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(BadRequest) as info:
        validate(body, PROGRAM)
    assert info.value.field == field and info.value.status == 400


def test_defaults_and_accepted_values():
    assert (
        validate(None, PROGRAM)
        == validate({}, PROGRAM)
        == Request(
            program=tuple(PROGRAM),
            env={},
            np=None,
            selector=None,
            nodes=None,
            master=None,
            timeout_s=None,
            wait=True,
        )
    )
    req = validate(
        {
            "program": ["p", "", ";", "ü"],
            "env": {"_A1": "$(x)\n"},
            "np": 2,
            "nodes": ["a", "b"],
            "master": "a",
            "timeout_s": 1,
            "wait": False,
        },
        PROGRAM,
    )
    assert req.program == ("p", "", ";", "ü") and req.env == {"_A1": "$(x)\n"}
    assert req.timeout_s == 1.0 and req.wait is False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from(
                ["program", "env", "np", "selector", "nodes", "master", "timeout_s", "wait", "x"]
            ),
            json_values,
        ),
    )
)
def test_any_json_body_is_accepted_or_a_400(body):
    try:
        validate(body, PROGRAM)
    except BadRequest as e:
        assert e.field
    except Exception as e:  # anything else would be a 500
        pytest.fail(f"{type(e).__name__}: {e}")


# --- the cluster -------------------------------------------------------------------------


class Env:
    """A daemon's parts wired to the cluster, as server.Daemon wires them."""

    def __init__(self, cluster, state_dir, ssh=None, **mpi):
        self.cluster = cluster
        path = cluster.write_config(
            state_dir.parent / f"{state_dir.name}.toml",
            state_dir,
            ssh={"use_system_known_hosts": False, **(ssh or {})},
            mpi=mpi,
        )
        self.config_path = path
        self.cfg = config.load(path, environ={})
        self.pool = Pool(self.cfg.ssh)
        self.registry = Registry(
            self.cfg, Discovery(self.cfg.discovery, ssh_port=self.cfg.ssh.port), self.pool
        )
        self.store = Store(self.cfg.state.dir)
        self.jobs = Jobs(self.cfg, self.registry, self.pool, self.store)
        self.registry.start()
        assert self.registry.wait_first_pass(30)
        self.jobs.start()

    def close(self):
        self.jobs.stop()
        self.registry.stop()
        self.pool.close()
        self.store.close()

    def prog(self, *args):
        return [str(self.cluster.mpi_program), *args]

    def run(self, body, timeout=HANG):
        job = self.jobs.submit(body)
        done = self.jobs.wait(job["id"], timeout)
        assert done["state"] not in ("pending", "running"), (
            f"job still {done['state']} after {timeout} s"
        )
        return done


@pytest.fixture
def env(cluster, tmp_path):
    e = Env(cluster, tmp_path / "state")
    yield e
    e.close()


def job_processes(cluster):
    """The cluster user's processes other than sshd and the daemon's probe loops: ranks,
    orted, mpirun, wrappers.

    Not the daemon's own `rm -rf -- <job dir>`: it removes the job's directory on the
    master just after the job is recorded final (so a daemon killed in between still
    finds the job's exit status on restart), and is no process of the job."""
    return [
        (pid, cmd)
        for pid, cmd in cluster.user_processes()
        if not cmd.startswith("sshd") and not _HOUSEKEEPING.search(cmd) and watch.MARK not in cmd
    ]


_HOUSEKEEPING = re.compile(r"(?:^|\s)rm -rf -- (?:\S+/)?\.mlbench-daemon/jobs/[0-9A-Za-z]+\s*$")


def wait_ranks(env, job_id, n=3):
    """Wait until every rank has printed; fail at once (with the log) if the job ends first."""

    def ready():
        text = env.jobs.read_log(job_id, 0, 1 << 20)[0].decode(errors="replace")
        if rank_lines(text, n):
            return True
        job = env.jobs.get(job_id)
        assert job["state"] in ("pending", "running"), (job, text)
        return False

    wait_for(ready, what="every rank's output")


RANK_LINE = re.compile(
    rb"rank \d+ of \d+ on [0-9.]+: sum=\d+ expected=\d+\n|allreduce ok \d+\n"
    rb"|\[[\w.-]+:\d+\] [^\n]*\n"
)  # the last: OpenMPI/PMIx diagnostics


def payload(log):
    """The log without the ranks' report lines (mpirun may splice them into rank 0's output)
    and OpenMPI's own "[host:pid] ..." diagnostics (the test hosts share /dev/shm)."""
    return RANK_LINE.sub(b"", log)


def written_bytes(n):
    """What the MPI program's --bytes N writes."""
    line = (b"0123456789" * 10)[:99] + b"\n"
    return (line * (n // 100 + 1))[:n]


def rank_lines(text, n):
    return all(f"rank {r} of {n} on " in text for r in range(n))


def argv_received(job):
    """The argv the MPI program reported ("arg N HEX" lines of its response), as bytes."""
    got = [
        line.split()[2] if len(line.split()) == 3 else ""
        for line in job["response"].splitlines()
        if line.startswith("arg ")
    ]
    return [bytes.fromhex(h) for h in got]


def test_empty_body_runs_the_default_program_on_all_running_nodes(env, cluster):
    job = env.run(None)
    assert list(job)[:4] == SEED_KEYS
    assert job["state"] == "succeeded" and job["exit_code"] == 0
    workers = sorted(cluster.workers, key=lambda h: h.index)
    assert job["nodes"] == [
        [h.ip, cluster.namespace, h.name, str(dict(sorted(h.labels.items())))] for h in workers
    ]
    assert job["master_name"] == workers[0].name
    argv = [
        env.cfg.mpi.mpirun,
        *env.cfg.mpi.args,
        "--host",
        ",".join(h.ip for h in workers),
        str(cluster.mpi_program),
    ]
    assert job["command"] == str(argv)
    assert rank_lines(job["response"], 3) and "allreduce ok 3" in job["response"]
    for h in workers:
        assert f"on {h.ip}: sum=3" in job["response"]
    assert env.jobs.get(job["id"])["state"] == "succeeded"
    assert "response" not in env.jobs.get(job["id"])
    wait_for(lambda: job_processes(cluster) == [], what="no follower, tail, flock or wrapper left")


def test_a_silent_job_keeps_one_follower(env, cluster, monkeypatch, mocker):
    """Silent longer than the follower's idle timeout: the master is probed and the
    stream kept (one stream, one remote tail at any time), and nothing is left after."""
    monkeypatch.setattr(run, "FOLLOW_IDLE_S", 0.3)
    streams = mocker.spy(env.pool, "stream")  # counts calls; the real stream runs
    job = env.jobs.submit({"program": env.prog("--sleep", "4"), "wait": False})
    tails = []
    while env.jobs.get(job["id"])["state"] in ("pending", "running"):
        tails.append(sum(cmd.startswith("tail ") for _, cmd in job_processes(cluster)))
        time.sleep(0.1)
    assert env.jobs.get(job["id"])["state"] == "succeeded", env.jobs.get(job["id"])
    assert streams.call_count == 1 and max(tails) == 1, (streams.call_count, tails)
    wait_for(lambda: job_processes(cluster) == [], what="no follower, tail, flock or wrapper left")


def test_exit_code_3_fails_the_job(env):
    job = env.run({"program": env.prog("--exit", "3"), "np": 2})
    assert (job["state"], job["exit_code"]) == ("failed", 3)
    assert "-np', '2'" in job["command"]


HOSTILE = st.sampled_from(
    [
        ";",
        "$(touch {canary})",
        "`touch {canary}`",
        "'",
        '"',
        "\n",
        "\\",
        "&&",
        "|",
        ">{canary}",
        "--host",
        "-np",
        "99",
        "ü€😀",
        "*",
        "~",
        "$HOME",
        " ",
        "",
    ]
)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        HOSTILE
        | st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12
        ).filter(lambda a: a != ":"),
        min_size=1,
        max_size=6,
    )
)
def test_hostile_argv_arrives_byte_identical_and_runs_nothing_else(env, cluster, tmp_path, args):
    canary = cluster.home / f"canary-{secrets.token_hex(4)}"
    args = [a.replace("{canary}", str(canary)) for a in args]
    job = env.run({"program": env.prog("--argv", *args), "nodes": [cluster.workers[1].name]})
    assert job["state"] == "succeeded", job
    assert argv_received(job) == [a.encode() for a in ["--argv", *args]]
    assert not canary.exists()


def test_env_reaches_every_rank_but_no_argv_record_or_log(env, cluster, caplog):
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    job = env.jobs.submit(
        {
            "program": env.prog("--env", "TOKEN", "--sleep", "4"),
            "env": {"TOKEN": secret, "OTHER": "x y"},
            "wait": False,
        }
    )
    seen_running = False
    while env.jobs.get(job["id"])["state"] in ("pending", "running"):
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    assert secret.encode() not in Path(f"/proc/{d}/cmdline").read_bytes(), d
                except OSError:
                    pass
        seen_running = seen_running or bool(job_processes(cluster))
        time.sleep(0.05)
    assert seen_running
    done = env.jobs.wait(job["id"], HANG)
    assert done["state"] == "succeeded"
    assert all(f"env {r} TOKEN={secret}" in done["response"] for r in range(3))
    assert done["env"] == {"OTHER": "***", "TOKEN": "***"}
    assert "-x', 'OTHER', '-x', 'TOKEN'" in done["command"]
    assert secret not in json.dumps({k: v for k, v in done.items() if k != "response"})
    assert secret.encode() not in (Path(env.cfg.state.dir) / "jobs.sqlite3").read_bytes()
    assert secret not in caplog.text
    assert not list(cluster.home.glob(".mlbench-daemon/jobs/*/env"))


def test_async_job_log_paging_and_follow(env):
    job = env.jobs.submit({"program": env.prog("--bytes", "250000", "--sleep", "2"), "wait": False})
    assert job["state"] in ("pending", "running") and job["exit_code"] is None
    followed = b"".join(env.jobs.follow_log(job["id"], 0))  # returns when the job has ended
    assert env.jobs.get(job["id"])["state"] == "succeeded"
    paged, offset = b"", 0
    while True:
        chunk, offset = env.jobs.read_log(job["id"], offset, 70000)
        assert len(chunk) <= 70000
        if not chunk:
            break
        paged += chunk
    assert paged == followed == env.jobs.wait(job["id"])["response"].encode()
    assert payload(followed) == written_bytes(250000)
    assert b"".join(env.jobs.follow_log(job["id"], 100)) == followed[100:]
    assert next(j["id"] for j in env.jobs.list(limit=5)) == job["id"]


def test_cancel_mid_run_leaves_no_process_on_any_host(env, cluster):
    # every rank also leaves a detached process (like a data loader) that mpirun's own
    # kill does not reach; each host sees only its own processes, so only a sweep of
    # every host ends them all
    detach = 'setsid sleep 300 </dev/null >/dev/null 2>&1 & exec "$0" --sleep 60'
    program = ["/bin/sh", "-c", detach, str(cluster.mpi_program)]
    job = env.jobs.submit({"program": program, "wait": False})
    wait_ranks(env, job["id"])
    assert any("orted" in cmd for _, cmd in job_processes(cluster))
    wait_for(
        lambda: sum(cmd.startswith("sleep 300") for _, cmd in job_processes(cluster)) == 3,
        what="a detached process on every host",
    )
    done = cancel_job(env.jobs, job["id"])
    assert done["state"] == "cancelled" and done["reason"] == "cancelled"
    assert "verified no process left on 3 host(s)" in done["error"]
    assert job_processes(cluster) == []
    with pytest.raises(Conflict):
        env.jobs.cancel(job["id"])


def test_cancel_also_ends_what_forks_while_the_sweep_kills(env, cluster):
    """Every rank leaves a detached loop that starts a new process every 50 ms: some
    start after the sweep has listed the host and before its KILL.  The sweep looks
    again until nothing marked is left, and only then says the hosts are clean."""
    spawner = "while :; do sleep 300 & sleep 0.05; done"
    detach = 'setsid sh -c "$1" </dev/null >/dev/null 2>&1 & exec "$0" --sleep 60'
    program = ["/bin/sh", "-c", detach, str(cluster.mpi_program), spawner]
    job = env.jobs.submit({"program": program, "wait": False})
    wait_ranks(env, job["id"])
    wait_for(
        lambda: sum(cmd.startswith("sleep 300") for _, cmd in job_processes(cluster)) >= 30,
        what="detached processes on every host",
    )
    done = cancel_job(env.jobs, job["id"])
    assert done["state"] == "cancelled", done
    assert "verified no process left on 3 host(s)" in done["error"], done["error"]
    assert job_processes(cluster) == []


def test_timeout_cancels_with_reason_timeout(env, cluster):
    job = env.run({"program": env.prog("--sleep", "60"), "timeout_s": 3})
    assert (job["state"], job["reason"]) == ("cancelled", "timeout")
    assert job_processes(cluster) == []


def test_queue_is_bounded_fifo(cluster, tmp_path):
    e = Env(cluster, tmp_path / "state", max_concurrent_jobs=1, queue_size=1)
    try:
        first = e.jobs.submit({"program": e.prog("--sleep", "60"), "wait": False})
        second = e.jobs.submit({"program": e.prog(), "wait": False})
        with pytest.raises(QueueFull):
            e.jobs.submit({"program": e.prog()})
        assert e.jobs.get(second["id"])["state"] == "pending"
        cancel_job(e.jobs, first["id"])
        assert e.jobs.wait(second["id"], HANG)["state"] == "succeeded"
        queued = e.jobs.submit({"program": e.prog("--sleep", "60"), "wait": False})
        assert cancel_job(e.jobs, queued["id"])["state"] == "cancelled"
    finally:
        e.close()


def test_named_nodes_master_and_conflicts(env, cluster):
    w = sorted(cluster.workers, key=lambda h: h.index)
    job = env.run({"program": env.prog(), "nodes": [w[2].name, w[1].name], "master": w[2].name})
    assert job["state"] == "succeeded" and job["master_name"] == w[2].name
    assert [n[2] for n in job["nodes"]] == [w[1].name, w[2].name]
    with pytest.raises(Conflict) as info:
        env.jobs.submit({"nodes": ["no-such-node"]})
    assert info.value.field == "nodes"
    with pytest.raises(Conflict):
        env.jobs.submit({"master": "no-such-node"})
    with pytest.raises(BadRequest):
        env.jobs.submit({"nodes": [w[1].name], "master": w[2].name})


def test_down_worker_is_excluded_and_all_down_is_503(env, cluster):
    w = sorted(cluster.workers, key=lambda h: h.index)
    cluster.stop_sshd(w[1])
    env.registry.refresh(30)
    job = env.run(None)
    assert job["state"] == "succeeded" and rank_lines(job["response"], 2)
    assert [n[2] for n in job["nodes"]] == [w[0].name, w[2].name]
    with pytest.raises(Conflict):
        env.jobs.submit({"nodes": [w[1].name]})
    for h in w:
        cluster.stop_sshd(h)
    env.registry.refresh(30)
    with pytest.raises(Unavailable):
        env.jobs.submit(None)


def test_master_failing_preflight_falls_back_to_the_next(cluster, tmp_path):
    # probes only at start: the registry keeps saying Running, so the pre-flight must catch it
    e = Env(cluster, tmp_path / "state", ssh={"probe_interval_s": 3600.0})
    try:
        w = sorted(cluster.workers, key=lambda h: h.index)
        cluster.stop_sshd(w[0])
        e.pool.drop(w[0].ip, 22)
        assert [s.phase for s in e.registry.nodes()] == ["Running"] * 3
        done = e.run({"program": e.prog()})
        assert done["state"] == "succeeded" and done["master_name"] == w[1].name
        assert [n[2] for n in done["nodes"]] == [w[1].name, w[2].name] and rank_lines(
            done["response"], 2
        )
    finally:
        e.close()


def test_partition_of_the_master_mid_job_then_heal(env, cluster):
    w = sorted(cluster.workers, key=lambda h: h.index)
    job = env.jobs.submit({"program": env.prog("--sleep", "10", "--bytes", "20000"), "wait": False})
    wait_ranks(env, job["id"])
    cluster.partition(w[0])
    try:
        for _ in range(20):  # the API keeps answering while the master is cut off
            t = time.monotonic()
            assert env.jobs.get(job["id"])["state"] == "running"
            env.jobs.read_log(job["id"], 0, 100)
            assert time.monotonic() - t < 5
            time.sleep(0.25)
    finally:
        cluster.heal(w[0])
    done = env.jobs.wait(job["id"], HANG)
    assert done["state"] == "succeeded", done
    assert rank_lines(done["response"], 3) and payload(done["response"].encode()) == written_bytes(
        20000
    )


def test_master_unreachable_for_lost_after_s_makes_the_job_lost(cluster, tmp_path):
    """A master cut off for good: after mpi.lost_after_s the job is recorded lost
    (not running forever), its slot is freed, and the next job runs elsewhere."""
    w = sorted(cluster.workers, key=lambda h: h.index)
    e = Env(cluster, tmp_path / "state", lost_after_s=2.0)
    try:
        job = e.jobs.submit({"program": e.prog("--sleep", "60"), "wait": False})
        wait_ranks(e, job["id"])
        cluster.partition(w[0])
        done = e.jobs.wait(job["id"], HANG)
        assert (done["state"], done["reason"]) == ("lost", "master-unreachable"), done
        assert "unreachable for 2 s" in done["error"] and "may still be running" in done["error"]
        wait_for(
            lambda: next(s.phase for s in e.registry.nodes()) != "Running",
            what="master not Running",
        )
        second = e.run({"program": e.prog()})  # max_concurrent_jobs = 1: the slot was freed
        assert second["state"] == "succeeded" and second["master_name"] == w[1].name
    finally:
        cluster.heal(w[0])
        e.close()


# --- the real daemon: kill -9 mid-job and restart ---------------------------------------


def wait_job_ended(url, job_id, what="the job to end"):
    """Wait until the job is neither pending nor running -> its record."""
    job = {}

    def ended():
        job.update(json.loads(http(f"{url}/api/mpi_jobs/{job_id}")[1]))
        return job["state"] not in ("pending", "running")

    wait_for(ended, what=what)
    return job


def test_daemon_killed_mid_job_reattaches_completes_the_log_and_requeues(cluster, tmp_path):
    with served(cluster, tmp_path, ssh={"use_system_known_hosts": False}) as d:
        url = d.url
        prog = [str(cluster.mpi_program), "--bytes", "300000", "--sleep", "6", "--exit", "5"]
        status, body = http(url + "/api/mpi_jobs/", "POST", {"program": prog, "wait": False})
        job_id = json.loads(body)["id"]
        assert status == 202
        wait_for(
            lambda: b"rank 2 of 3" in http(f"{url}/api/mpi_jobs/{job_id}/logs?limit=1000000")[1],
            what="ranks",
        )
        # two more wait in the queue (max_concurrent_jobs = 1): one with env values, which are
        # never stored, and one without, which can be launched again from its record
        w = sorted(cluster.workers, key=lambda h: h.index)
        queued = json.loads(
            http(
                url + "/api/mpi_jobs/",
                "POST",
                {
                    "program": [str(cluster.mpi_program)],
                    "nodes": [w[1].name, w[2].name],
                    "wait": False,
                },
            )[1]
        )
        secret = json.loads(
            http(
                url + "/api/mpi_jobs/",
                "POST",
                {"program": [str(cluster.mpi_program)], "env": {"TOKEN": "s3cret"}, "wait": False},
            )[1]
        )
        assert queued["state"] == secret["state"] == "pending"
        d.kill_and_restart()
        job = wait_job_ended(url, job_id)
        assert (job["state"], job["exit_code"]) == ("failed", 5)
        log = b"".join(paged_log(url, job_id))
        assert rank_lines(log.decode(), 3)
        assert b"exited on signal" not in log and b"-----" in log  # mpirun's notice of exit code 5
        assert payload(log[: log.index(b"-----")]) == written_bytes(
            300000
        )  # every byte, once, in order
        again = wait_job_ended(url, queued["id"], what="the queued job to end")
        assert (again["state"], again["master_name"]) == ("succeeded", w[1].name), again
        assert [n[2] for n in again["nodes"]] == [w[1].name, w[2].name] and again["started"] >= job[
            "finished"
        ]
        lost = json.loads(http(f"{url}/api/mpi_jobs/{secret['id']}")[1])
        assert (lost["state"], lost["reason"]) == (
            "lost",
            "daemon-restarted",
        ) and "env values" in lost["error"]


def paged_log(url, job_id):
    offset = 0
    while True:
        with urllib.request.urlopen(
            f"{url}/api/mpi_jobs/{job_id}/logs?offset={offset}&limit=65536", timeout=30
        ) as r:
            data = r.read()
            offset = int(r.headers["X-Next-Offset"])
        if not data:
            return
        yield data


def test_link_lost_right_after_launch_still_follows_the_job(env, mocker):
    """The launch ran on the master, but its answer never came back (a dropped link
    at the worst moment, which no real part produces on demand): the job is found by
    its pid file and followed, not reported failed while it runs unobserved."""
    real_run = env.pool.run

    def run(ip, port, argv, **kw):
        result = real_run(ip, port, argv, **kw)
        if argv[:2] == ["sh", "-c"] and "cat > env" in argv[2]:  # the launch script
            raise Unreachable("connection-lost", f"{ip}:{port}: link dropped after the launch")
        return result

    mocker.patch.object(env.pool, "run", side_effect=run)
    job = env.run({"program": env.prog("--exit", "4")})
    assert (job["state"], job["exit_code"]) == ("failed", 4), job
    assert "allreduce ok 3" in job["response"]


def test_launch_unconfirmed_while_the_master_is_cut_off_stays_pending(env, cluster, mocker):
    """The launch's answer is lost and the master is then unreachable for a while:
    the job may be running, so it stays pending (never failed) until the master
    answers, and is then followed to its end."""
    real_run = env.pool.run
    master = cluster.workers[0]

    def run(ip, port, argv, **kw):
        result = real_run(ip, port, argv, **kw)
        if argv[:2] == ["sh", "-c"] and "cat > env" in argv[2]:
            cluster.partition(master)
            raise Unreachable("connection-lost", f"{ip}:{port}: link dropped after the launch")
        return result

    mocker.patch.object(env.pool, "run", side_effect=run)
    job = env.jobs.submit({"program": env.prog("--sleep", "1"), "wait": False})
    deadline = time.monotonic() + HANG
    while not cluster.workers[0].partitioned:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(5)  # several failed attempts to read the pid file
    assert env.jobs.get(job["id"])["state"] == "pending"
    cluster.heal(master)
    done = env.jobs.wait(job["id"], HANG)
    assert (done["state"], done["exit_code"]) == ("succeeded", 0), done
    assert "allreduce ok 3" in done["response"]
