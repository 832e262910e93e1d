"""MLBench runs, driven by mlbench-core 3.0.0's own ApiClient (tests/mlbench_core.py) against
the daemon on the test cluster; and the pure parts (template, form, dates, ranks)."""

import json
import time
import urllib.parse

import pytest

from mlbench_daemon import config, template
from mlbench_daemon.errors import BadRequest
from mlbench_daemon.jobs import flavour, runspec
from mlbench_daemon.timefmt import mlbench_date, parse_mlbench_date
from tests.helpers import wait_for
from tests.test_jobs import job_processes

RESNET = "PyTorch Cifar-10 ResNet-20"  # mlbench-core's MLBENCH_IMAGES key
RESNET_IMAGE = "mlbench/pytorch-cifar10-resnet20-all-reduce:latest"


# ---- pure: templates, forms, dates, ranks ---------------------------------------------------


def test_a_template_is_split_without_a_shell_and_filled_per_word():
    argv = template.render(
        "prog --hosts {hosts} 'a b' $HOME;rm --r{rank}", {"hosts": "1.2.3.4,5.6.7.8", "rank": "3"}
    )
    assert argv == ["prog", "--hosts", "1.2.3.4,5.6.7.8", "a b", "$HOME;rm", "--r3"]
    assert template.render("p {{x}}", {}) == ["p", "{x}"]


@pytest.mark.parametrize(
    "text, named",
    [
        ("prog {user}", "{user}"),
        ("prog {}", "{}"),
        ("prog {rank.real}", "{rank.real}"),
        ("prog {rank!r}", "conversion"),
        ("prog {rank:>3}", "format"),
        ("prog 'open", "split"),
        ("", "empty"),
        ("prog {rank", "braces"),
    ],
)
def test_a_bad_template_names_why(text, named):
    with pytest.raises(template.TemplateError) as e:
        template.words(text)
    assert named in str(e.value)


FORM = {  # as mlbench-core's create_run sends it
    "name": "r1",
    "num_workers": "2",
    "num_cpus": "2.0",
    "max_bandwidth": "1000",
    "gpu_enabled": "false",
    "light_target": "false",
    "run_all_nodes": "false",
    "image_name": RESNET_IMAGE,
}
CATALOGUE = {"pytorch-cifar10-resnet20-all-reduce": "main.py --rank {rank} --backend {backend}"}


def test_the_form_mlbench_core_sends():
    spec = runspec.parse(FORM, CATALOGUE)  # short catalogue key, image string asked
    assert (spec.num_workers, spec.backend, spec.run_all_nodes, spec.gpu) == (
        2,
        "mpi",
        False,
        False,
    )
    assert runspec.parse({**FORM, "backend": "GLOO"}, CATALOGUE).backend == "gloo"
    assert runspec.parse(FORM, {RESNET_IMAGE: "x {rank}"}).template == "x {rank}"
    custom = runspec.parse(
        {**FORM, "image_name": "custom_image", "custom_image_name": "me/img",
         "custom_image_command": "run {rank}", "backend": "custom_backend",
         "custom_backend": "NCCL", "run_all_nodes": "True", "light_target": "TRUE"},
        {},
    )  # fmt: skip
    assert (custom.template, custom.backend, custom.run_all_nodes, custom.light) == (
        "run {rank}", "nccl", True, True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, field",
    [
        ({"image_name": "mlbench/nope:latest"}, "image_name"),
        ({"num_workers": "0"}, "num_workers"),
        ({"num_workers": "two"}, "num_workers"),
        ({"run_all_nodes": "maybe"}, "run_all_nodes"),
        ({"colour": "red"}, "colour"),
        ({"image_name": "custom_image"}, "custom_image_command"),
        (
            {"image_name": "custom_image", "custom_image_command": "p {user}"},
            "custom_image_command",
        ),
        ({"backend": "custom_backend"}, "custom_backend"),
    ],
)
def test_a_bad_form_names_its_field(change, field):
    with pytest.raises(BadRequest) as e:
        runspec.parse({**FORM, **change}, CATALOGUE)
    assert e.value.field == field, e.value.message
    if field == "custom_image_command" and "custom_image_command" in change:
        assert "{user}" in e.value.message


def test_form_values_take_json_as_the_form_would():
    assert runspec.form_values({"a": True, "b": 2, "c": "x"}) == {"a": "true", "b": "2", "c": "x"}
    with pytest.raises(BadRequest):
        runspec.form_values({"a": [1]})


def test_dates_as_mlbench_sends_and_reads_them():
    t = parse_mlbench_date("2026-12-05 09:16:58.123456")  # str(datetime): a space, no Z
    assert t == parse_mlbench_date("2026-12-05T09:16:58.123456Z")
    assert mlbench_date(t) == "2026-12-05T09:16:58.123456Z"
    with pytest.raises(ValueError):
        parse_mlbench_date("yesterday")


def test_ranks_per_backend():
    spec = runspec.parse({**FORM, "gpu_enabled": "true"}, CATALOGUE)
    mpi = runspec.plan(spec, 7, ["10.0.0.1", "10.0.0.2"])
    assert mpi.program == ("main.py", "--rank", "0", "--backend", "mpi", "--gpu")
    assert (mpi.hosts, mpi.apps) == (("10.0.0.1", "10.0.0.2"), ())
    gloo = runspec.parse({**FORM, "backend": "gloo", "run_all_nodes": "true"}, CATALOGUE)
    apps = runspec.plan(gloo, 7, ["10.0.0.1", "10.0.0.2"]).apps
    assert [(h, a[2]) for h, a in apps] == [("10.0.0.1", "0"), ("10.0.0.2", "1")]
    first = runspec.plan(runspec.parse({**FORM, "backend": "gloo"}, CATALOGUE), 7, ["a", "b"])
    assert (first.hosts, first.apps) == (("a",), ())


@pytest.mark.parametrize("name", ["openmpi4", "openmpi5", "mpich"])
def test_mpmd_argv_puts_rank_i_on_host_i(name):
    f = flavour.get(name)
    argv = f.mpmd_argv("mpirun", [], [("h0", ["p", "0"]), ("h1", ["p", "1"])], ["X"])
    assert argv.count(":") == 1
    assert flavour.mpmd_hosts(name, argv) == ["h0", "h1"]
    assert flavour.rank_count(name, argv) == 2


# ---- on the cluster, through mlbench-core's client ------------------------------------------


def _client(d):
    from tests.mlbench_core import api_client

    return api_client(urllib.parse.urlsplit(d.url).netloc)


def _poll(fn, timeout=120):
    """fn()'s first true value, polled until `timeout` s."""
    found = []
    wait_for(lambda: found.append(fn()) or found[-1], timeout=timeout)
    return found[-1]


def _until_final(api, run_id, timeout=120):
    def final():
        run = api.get_run(run_id).result().json()
        return run if run["state"] in ("finished", "failed") else None

    return _poll(final, timeout)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_mlbench_core_runs_a_catalogue_entry_and_a_custom_image(start_daemon, cluster):
    prog = str(cluster.mpi_program)
    d = start_daemon(mpi={"catalogue": {RESNET_IMAGE: f"{prog} --argv {{run_id}} {{backend}}"}})
    api = _client(d)
    r = api.create_run("bench-1", 2, image=RESNET, backend="MPI").result()
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["state"] in ("initialized", "started") and run["num_workers"] == 2
    done = _until_final(api, run["id"])
    assert done["state"] == "finished", done
    meta = done["job_metadata"]
    assert "allreduce ok 2" in meta["stdout"], meta
    assert len(meta["pods"]) == 2 and meta["master_name"] in [p[2] for p in meta["pods"]]
    assert meta["command"].endswith(f"{prog} --argv {run['id']} mpi")
    assert done["finished_at"].endswith("Z") and done["created_at"].endswith("Z")
    # `mlbench status`: get_runs, find by name; `charts` reads num_workers
    listed = [x for x in api.get_runs().result().json() if x["name"] == "bench-1"]
    assert [x["num_workers"] for x in listed] == [2]
    # custom_image; a failing command is `failed`
    bad = api.create_run(
        "bench-2", 1, custom_image_name="x", custom_image_command="/bin/false {rank}"
    ).result()
    assert bad.status_code == 201, bad.text
    assert _until_final(api, bad.json()["id"])["state"] == "failed"
    assert d.json("GET", "/api/runs/")[0] == 200  # checked against the served document
    assert d.json("GET", f"/api/runs/{run['id']}")[0] == 200
    # `mlbench delete`
    assert api.delete_run(run["id"]).result().status_code == 204
    assert api.get_run(run["id"]).result().status_code == 404
    assert [x["name"] for x in api.get_runs().result().json()] == ["bench-2"]
    # more nodes than exist: 400 saying why, nothing made
    big = api.create_run("big", 99, custom_image_name="x", custom_image_command=prog).result()
    assert big.status_code == 400 and "could never start" in big.json()["message"]


@pytest.mark.cluster
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["openmpi4", "openmpi5", "mpich"])
def test_mpmd_ranks_and_a_delete_that_leaves_nothing(start_daemon, cluster, launcher):
    """backend gloo + run_all_nodes: one MPMD launch, each process its own {rank} on its
    own node, with every launcher; a delete while it runs leaves nothing on any host."""
    d = start_daemon(mpi=cluster.mpi_config(launcher))
    api = _client(d)
    run = api.create_run(
        "mpmd", 2, custom_image_name="x",
        custom_image_command='sh -c "echo rank={rank} of {hosts} on $(hostname)"',
        backend=None, custom_backend="gloo", run_all_nodes=True,
    ).result().json()  # fmt: skip
    done = _until_final(api, run["id"])
    assert done["state"] == "finished", done
    out = done["job_metadata"]["stdout"]
    ips = done["job_metadata"]["pods"]
    hosts = ",".join(p[0] for p in ips)
    # rank i ran on node i of the run (a host's hostname is its node's name)
    assert sorted(out) == [f"rank={i} of {hosts} on {p[2]}" for i, p in enumerate(ips)], out
    assert " : " in done["job_metadata"]["command"]
    # a long MPMD run, deleted while it runs: nothing left on any host
    long = api.create_run(
        "long", 2, custom_image_name="x", custom_image_command="sleep 30{rank}",
        custom_backend="gloo", run_all_nodes=True,
    ).result().json()  # fmt: skip
    wait_for(lambda: len(job_processes(cluster)) >= 2, timeout=60)
    assert api.delete_run(long["id"]).result().status_code == 204
    wait_for(lambda: job_processes(cluster) == [], timeout=60)


@pytest.mark.cluster
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["openmpi4", "openmpi5", "mpich"])
def test_a_failing_mpmd_rank_is_named_on_its_own_node(start_daemon, cluster, launcher):
    """An MPMD run whose rank 2 exits 3 after MPI_Finalize (the program built for the
    launcher: another MPI's build runs under Hydra as singletons, each "rank 0 of 1",
    and ends 0) fails with code 3; where the launcher names the rank, the failure names
    rank 2's node (the third of the run), never the master's.

    OpenMPI 4 prints its "Process name / Exit code" notice.  OpenMPI 5 (PRRTE) sees rank
    2's non-zero exit every time but prints that notice only if the exit is handled while
    other ranks still run; in lockstep with them it often is not (1 run in 4 here), and
    its output then names no rank: the code alone is given.  Hydra prints nothing for a
    non-zero exit (its status is the OR of the ranks' codes); with -print-all-exitcodes
    in mpi.args its per-host codes name the host, hence rank 2."""
    prog = cluster.program_for(launcher)

    def fail(d):
        api = _client(d)
        run = api.create_run(
            "mpmd-fail", 3, custom_image_name="x",
            custom_image_command=f"{prog} --exit-rank 2 3",
            custom_backend="gloo", run_all_nodes=True,
        ).result().json()  # fmt: skip
        done = _until_final(api, run["id"])
        assert done["state"] == "failed", done
        job = d.json("GET", f"/api/mpi_jobs/{done['job_id']}")[1]
        log = d.request("GET", f"/api/mpi_jobs/{done['job_id']}/logs")[2].decode()
        assert job["exit_code"] == 3 and job["failure"]["exit_code"] == 3, (job, log)
        assert "rank 2 of 3 on" in log, log  # one MPI job of 3 ranks, not 3 singletons
        return job["failure"], done["job_metadata"]["pods"][2][2], log

    mpi = cluster.mpi_config(launcher)
    failure, third, log = fail(start_daemon(mpi=mpi))
    named = launcher == "openmpi4" or (launcher == "openmpi5" and "Process name:" in log)
    want = (2, third) if named else (None, None)
    assert (failure["rank"], failure["node"]) == want, (failure, log)
    why = {"openmpi5": "only while other ranks run", "mpich": "-print-all-exitcodes in mpi.args"}
    assert named or why[launcher] in failure["message"], failure
    if launcher == "mpich":
        opt_in = {**mpi, "args": [*mpi["args"], "-print-all-exitcodes"]}
        failure, third, log = fail(start_daemon(mpi=opt_in))
        assert (failure["rank"], failure["node"]) == (2, third), (failure, log)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_runs_hold_their_nodes(start_daemon, cluster):
    """3 workers, max_concurrent_jobs 2: a run of 2 holds its nodes; a second run of 2 waits
    (position 1) and never shares one; a plain job waits naming the run; both start in
    turn once the first run ends."""
    d = start_daemon(mpi={"max_concurrent_jobs": 2})
    api = _client(d)

    def create(name, n, command):
        r = api.create_run(name, n, custom_image_name="x", custom_image_command=command)
        return r.result().json()

    # its ranks outlive a TERM for a while: the sweep of its delete takes time
    first = create("first", 2, "sh -c 'trap \"\" TERM; sleep 300 & wait; sleep 300'")
    assert first["state"] == "started", first
    # answered before its job is launched: its master is the node it is launched on first
    meta = first["job_metadata"]
    assert meta["master_name"] == meta["pods"][0][2], meta
    second = create("second", 2, "true")
    assert second["state"] == "initialized"
    assert second["job_metadata"]["waiting"]["position"] == 1
    status, job = d.json("POST", "/api/mpi_jobs/", {"program": ["true"], "wait": False})
    assert status == 202, job

    def held():
        j = d.json("GET", f"/api/mpi_jobs/{job['id']}")[1]
        return j if (j["waiting"] or {}).get("reason") == "held" else None

    j = _poll(held, 30)
    assert f"run {first['id']} holds" in j["waiting"]["detail"]
    # the held job has no slot of the two: a job on the free node runs meanwhile
    held_names = {p[2] for p in first["job_metadata"]["pods"]}
    free = [h.name for h in cluster.workers if h.name not in held_names]
    body = {"program": ["true"], "nodes": free, "wait": False}
    status, other = d.json("POST", "/api/mpi_jobs/", body)
    assert status == 202, other
    assert d.wait_job(other["id"], timeout=60)["state"] == "succeeded"
    time.sleep(2)  # nothing moves while the first run holds its nodes
    assert api.get_run(second["id"]).result().json()["state"] == "initialized"
    assert d.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["state"] == "pending"
    assert api.delete_run(first["id"]).result().status_code == 204
    # the plain job came first (it had nodes busy): it runs, then the second run
    _poll(lambda: d.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["state"] == "succeeded")
    swept = d.wait_job(first["job_id"], timeout=60)  # the plain job waited for its sweep
    assert d.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["started"] >= swept["finished"]
    done = _until_final(api, second["id"])
    assert done["state"] == "finished"
    firsts = {p[2] for p in api.get_runs().result().json()[0]["job_metadata"]["pods"]}
    assert len(firsts) == 2


@pytest.mark.cluster
def test_a_cross_site_form_cannot_create_a_run(daemon):
    form = urllib.parse.urlencode({**FORM, "image_name": "custom_image",
                                   "custom_image_command": "true"}).encode()  # fmt: skip
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, raw = daemon.request(
        "POST", "/api/runs/", body=form, headers={**headers, "Origin": "http://evil.example"}
    )
    assert status == 403 and "Origin" in json.loads(raw)["message"]
    assert daemon.json("GET", "/api/runs/")[1] == []
    status, _, raw = daemon.request("POST", "/api/mpi_jobs/", body=form, headers=headers)
    assert status == 415  # a route without form=True
    status, _, raw = daemon.request("POST", "/api/runs/", body=form, headers=headers)
    assert status == 201, raw
    runs = daemon.json("GET", "/api/runs/")[1]
    assert [r["name"] for r in runs] == ["r1"]
    # this daemon lives on past the test: its run must not keep its nodes' forward port
    # (metrics.forward_port) from the next test's daemon
    assert daemon.request("DELETE", f"/api/runs/{runs[0]['id']}")[0] == 204


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_restart_keeps_a_runs_holds_and_delete_fires_the_callbacks(
    start_daemon, cluster, tmp_path
):
    from tests.conftest import LiveDaemon

    first = start_daemon(mpi={"max_concurrent_jobs": 2})  # a slot for the plain job
    api = _client(first)
    run = api.create_run(
        "holder", 2, custom_image_name="x", custom_image_command="sleep 300"
    ).result().json()  # fmt: skip
    assert run["state"] == "started", run
    _poll(lambda: api.get_run(run["id"]).result().json()["job_metadata"]["master_name"])
    first.stop()  # the run's job goes on on the cluster
    again = LiveDaemon(tmp_path / "daemon0.toml")  # the same state dir
    try:
        again.wait_nodes(lambda ns: all(x["phase"] == "Running" for x in ns) and len(ns) == 3)
        ended, deleted = [], []
        again.daemon.runs.on_ended(ended.append)
        again.daemon.runs.on_deleted(deleted.append)
        assert [r.id for r in again.daemon.runs.live()] == [run["id"]]
        api = _client(again)
        held_nodes = api.get_run(run["id"]).result().json()["job_metadata"]["pods"]
        assert again.daemon.runs.by_pod(held_nodes[0][2]).id == run["id"]
        _, job = again.json("POST", "/api/mpi_jobs/", {"program": ["true"], "wait": False})
        waiting = _poll(
            lambda: (again.json("GET", f"/api/mpi_jobs/{job['id']}")[1]["waiting"] or {}).get(
                "detail"
            ),
            30,
        )
        assert f"run {run['id']} holds" in waiting
        assert api.delete_run(run["id"]).result().status_code == 204
        assert deleted == [run["id"]] and [(r.id, r.state) for r in ended] == [
            (run["id"], "failed")
        ]
        assert again.daemon.runs.get_run(run["id"]) is None
        assert again.wait_job(job["id"])["state"] == "succeeded"
        wait_for(lambda: job_processes(cluster) == [], timeout=60)
    finally:
        again.stop()


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_four_nodes_two_slots(make_cluster, tmp_path):
    """mpi.max_concurrent_jobs 2 on 4 workers: two runs of 3 nodes, the second waiting with
    its position until the first ends, never on a node the first holds; two runs of 2 at
    once on disjoint nodes."""
    from tests.conftest import LiveDaemon

    c = make_cluster(workers=4)
    path = c.write_config(
        tmp_path / "d.toml", tmp_path / "state", server={"port": 0},
        log={"level": "warning"}, mpi={"max_concurrent_jobs": 2},
    )  # fmt: skip
    d = LiveDaemon(path)
    try:
        d.wait_nodes(lambda ns: len(ns) == 4 and all(x["phase"] == "Running" for x in ns), 60)
        api = _client(d)

        def create(name, n, command):
            r = api.create_run(name, n, custom_image_name="x", custom_image_command=command)
            return r.result().json()

        def pods(run_id):
            run = api.get_run(run_id).result().json()
            return {p[2] for p in run["job_metadata"]["pods"]}

        a = create("a", 3, "sleep 8")
        b = create("b", 3, "true")
        assert a["state"] == "started" and b["state"] == "initialized"
        assert b["job_metadata"]["waiting"]["position"] == 1
        assert _until_final(api, a["id"])["state"] == "finished"
        assert _until_final(api, b["id"])["state"] == "finished"
        ran_a, ran_b = pods(a["id"]), pods(b["id"])
        assert len(ran_a) == len(ran_b) == 3
        a_job = d.json("GET", f"/api/mpi_jobs/{a['job_id']}")[1]
        b_job = d.json("GET", f"/api/mpi_jobs/{api.get_run(b['id']).result().json()['job_id']}")[1]
        assert b_job["started"] >= a_job["finished"]  # never at once: they share nodes
        x, y = create("x", 2, "sleep 5"), create("y", 2, "sleep 5")
        assert x["state"] == y["state"] == "started"  # at once
        assert not pods(x["id"]) & pods(y["id"])  # on disjoint nodes
        assert _until_final(api, x["id"])["state"] == "finished"
        assert _until_final(api, y["id"])["state"] == "finished"
    finally:
        d.stop()


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_roles_and_the_audit_of_runs(start_daemon, tmp_path):
    from mlbench_daemon import tokens
    from mlbench_daemon.vocabulary import Role

    path = str(tmp_path / "tokens.json")
    token = {
        who: tokens.add(path, who, role)
        for who, role in (("vera", Role.VIEWER), ("alice", Role.SUBMITTER),
                          ("bob", Role.SUBMITTER), ("root", Role.ADMIN))
    }  # fmt: skip
    d = start_daemon(wait_running=False, server={"tokens_file": path})
    d.token = token["root"]  # the document's fetch and the wait for the nodes
    d.wait_nodes(lambda ns: ns and all(x["phase"] == "Running" for x in ns))
    form = urllib.parse.urlencode(
        {**FORM, "image_name": "custom_image", "custom_image_command": "sleep 60"}
    ).encode()

    def call(who, method, url, body=None):
        headers = {"Authorization": f"Bearer {token[who]}" if who else ""}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        status, _, raw = d.request(method, url, body=body, headers=headers)
        return status, (json.loads(raw) if raw else None)

    assert call(None, "GET", "/api/runs/")[0] == 401
    assert call("vera", "POST", "/api/runs/", form)[0] == 403
    status, run = call("alice", "POST", "/api/runs/", form)
    assert status == 201 and run["submitted_by"] == "alice"
    assert call("vera", "GET", f"/api/runs/{run['id']}")[0] == 200
    status, refused = call("bob", "DELETE", f"/api/runs/{run['id']}")
    assert (status, refused["error"]) == (403, "not-owner") and "alice" in refused["message"]
    assert call("vera", "GET", f"/api/runs/{run['id']}")[1]["state"] == "started"
    assert call("root", "DELETE", f"/api/runs/{run['id']}")[0] == 204
    lines = [json.loads(x) for x in open(tmp_path / "state0" / "audit.log")]
    runs = [(x["token"], x["method"], x["status"]) for x in lines if "/api/runs" in x["path"]]
    assert ("alice", "POST", 201) in runs and ("bob", "DELETE", 403) in runs
    assert ("root", "DELETE", 204) in runs


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_the_env_hook_reaches_the_ranks_and_no_answer(start_daemon, cluster):
    from mlbench_daemon.jobs.runs import RunEnv

    d = start_daemon()
    secret = "s3cret-value-of-the-hook"
    seen = []

    def hook(run, nodes):
        seen.append((run.id, run.state, run.nodes, [n.name for n in nodes]))
        return RunEnv({"MLBENCH_RUN_SECRET": secret}, ("node-x refused forwarding",))

    d.daemon.runs.run_env = hook
    api = _client(d)
    prog = str(cluster.mpi_program)
    run = api.create_run(
        "env", 2, custom_image_name="x", custom_image_command=f"{prog} --env MLBENCH_RUN_SECRET"
    ).result().json()  # fmt: skip
    done = _until_final(api, run["id"])
    assert done["state"] == "finished", done
    meta = done["job_metadata"]
    assert f"env 1 MLBENCH_RUN_SECRET={secret}" in meta["stdout"]  # the program printed it
    assert meta["notes"] == ["node-x refused forwarding"]
    assert seen == [(run["id"], "started", tuple(seen[0][3]), seen[0][3])] and len(seen[0][3]) == 2
    assert secret not in meta["command"]
    job = d.json("GET", f"/api/mpi_jobs/{done['job_id']}")[1]
    assert job["env"] == {"MLBENCH_RUN_SECRET": "***"} and secret not in job["command"]
    # the hook refuses (no routable address for the ranks): the run fails saying why
    from mlbench_daemon.runenv import RunRefused

    def refuse(run, nodes):
        raise RunRefused("the daemon listens on loopback only and node-x refused forwarding")

    d.daemon.runs.run_env = refuse
    r = api.create_run("refused", 1, custom_image_name="x", custom_image_command="true").result()
    assert r.status_code == 201, r.text
    failed = api.get_run(r.json()["id"]).result().json()
    assert failed["state"] == "failed" and failed["job_id"] is None, failed
    assert failed["job_metadata"]["notes"] == [
        "the daemon listens on loopback only and node-x refused forwarding"
    ]
    assert failed["finished_at"] is not None


class _JobsOf:
    """What Runs reads of Jobs to prune: the store (no job is involved)."""

    def __init__(self, store):
        self.store = store

    def set_held(self, held):
        pass


def test_runs_that_ended_before_keep_days_are_pruned_with_their_metrics(tmp_path):
    from mlbench_daemon.jobs.runs import Runs
    from mlbench_daemon.store import Store
    from mlbench_daemon.vocabulary import RunState

    store = Store(str(tmp_path))
    now, day = 1_800_000_000.0, 86400.0
    made = {}
    for name, state, ended in (
        ("old", RunState.FINISHED, now - 8 * day),
        ("old-failed", RunState.FAILED, now - 7.5 * day),
        ("recent", RunState.FINISHED, now - 6 * day),
        ("live", RunState.STARTED, None),
        ("waiting", RunState.INITIALIZED, None),
    ):
        rec = store.create_run(name=name, state=state, num_workers=1, spec={}, finished_at=ended)
        made[name] = rec.id
    cfg = config.load(None, environ={"MLBENCH_DAEMON_DISCOVERY_SERVICE": "x.invalid"})
    runs = Runs(cfg, _JobsOf(store), None)
    deleted = []
    runs.on_deleted(deleted.append)
    assert runs.prune(0, now=now) == [] and deleted == []  # 0: keep them
    assert runs.prune(7, now=now) == [made["old"], made["old-failed"]]
    assert deleted == [made["old"], made["old-failed"]]  # the daemon drops their metrics
    assert [r.name for r in store.runs()] == ["recent", "live", "waiting"]
