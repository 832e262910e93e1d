"""The REST API end to end: the real daemon on the real cluster, over HTTP."""

import ast
import json
import re
import subprocess
import sys
import time

import pytest

SEED_KEYS = ["name", "labels", "phase", "ip"]


def worker_names(cluster):
    return [h.name for h in cluster.workers]


def by_name(nodes):
    return {n["name"]: n for n in nodes}


# ---- GET /api/nodes/ ---------------------------------------------------------


def test_nodes_exactly_as_the_seed(daemon, cluster):
    for path in ("/api/nodes/", "/api/nodes", "/api/pods/", "/api/pods"):
        status, headers, raw = daemon.request("GET", path)
        assert status == 200 and headers["content-type"].startswith("application/json")
        nodes = json.loads(raw)
        assert [n["name"] for n in nodes] == worker_names(cluster)  # dashboard host excluded
        for n, h in zip(nodes, cluster.workers, strict=False):
            assert list(n)[:4] == SEED_KEYS
            assert all(isinstance(n[k], str) for k in SEED_KEYS)
            assert n["labels"] == str(dict(sorted(h.labels.items())))
            assert ast.literal_eval(n["labels"]) == h.labels
            assert (n["phase"], n["ip"], n["reason"]) == ("Running", h.ip, "ok")
            assert n["port"] == 22 and n["namespace"] == "default"


def test_natural_name_order(daemon, cluster):
    late = cluster.add_host(name=f"{cluster.release}-mlbench-worker-10")
    names = [n["name"] for n in daemon.wait_nodes(lambda ns: late.name in by_name(ns))]
    assert names == [*worker_names(cluster)[:3], late.name]  # worker-2 before worker-10


@pytest.mark.parametrize(
    "selector, expect",
    [
        ("", ["dashboard-0", "worker-0", "worker-1", "worker-2"]),
        ("component!=worker", ["dashboard-0"]),
        ("app=mlbench,component=worker", ["worker-0", "worker-1", "worker-2"]),
        ("!component", []),
    ],
)
def test_selector(start_daemon, cluster, selector, expect):
    d = start_daemon(wait_running=False, discovery={"selector": selector})
    nodes = d.wait_nodes(lambda ns: len(ns) == len(expect))
    assert [n["name"] for n in nodes] == [f"{cluster.release}-mlbench-{e}" for e in expect]


def test_bearer_token(start_daemon, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)  # the daemon refuses a token file others can read
    d = start_daemon(server={"token_file": str(token)})
    for headers in (
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret-token"},
        {"Authorization": ""},
    ):
        status, h, raw = d.request("GET", "/api/nodes/", headers=headers)
        assert status == 401 and h["www-authenticate"].startswith("Bearer")
        assert json.loads(raw)["error"] == "unauthorized"
    assert d.request("GET", "/api/nodes/")[0] == 200
    assert d.request("GET", "/healthz", headers={"Authorization": ""})[0] == 200


def test_every_error_is_json(daemon):
    cases = [
        ("GET", "/api/nothing", None, 404),
        ("PUT", "/api/nodes/", None, 405),
        ("POST", "/api/mpi_jobs/", b"{not json", 400),
        ("POST", "/api/mpi_jobs/", b"\n", 400),  # whitespace is no JSON (schemathesis found it)
        ("POST", "/api/mpi_jobs/", b"[1, 2]", 400),
        ("POST", "/api/mpi_jobs/", b"x" * (2 << 20), 413),
        ("GET", "/api/mpi_jobs/nope", None, 404),
        ("GET", "/api/nodes/?refresh=maybe", None, 400),
        ("POST", "/api/mpi_jobs/", b"{}", 415),  # no Content-Type
        ("POST", "/api/mpi_jobs/", b"[" * 100_000, 400),  # too deep for json.loads: not a 500
        ("POST", "/api/preflight/", b"[" * 100_000, 400),
        ("GET", "/api/mpi_jobs/" + "z" * 10_000, None, 404),  # echoes at most 100 characters
    ]
    for method, path, body, want in cases:
        headers = {"Content-Type": "application/json"} if body and want != 415 else {}
        status, headers, raw = daemon.request(method, path, body, headers=headers)
        assert status == want, (method, path, raw)
        assert headers["content-type"].startswith("application/json")
        err = json.loads(raw)
        assert set(err) >= {"error", "message"} and err["message"]
        assert b"Traceback" not in raw and b"<html" not in raw.lower()
        assert len(raw) < 400, raw[:200]
        if body and body.startswith(b"[["):
            assert err["field"] == "body" and "nested deeper than 32" in err["message"]


# ---- node faults, as the API shows them ------------------------------------------------


def phase_of(daemon, name, phase, timeout=20):
    return by_name(
        daemon.wait_nodes(
            lambda ns: name in by_name(ns) and by_name(ns)[name]["phase"] == phase, timeout
        )
    )[name]


@pytest.mark.parametrize(
    "fault, undo, phase, reasons",
    [
        ("stop_sshd", "start_sshd", "Unknown", {"connection-refused"}),
        ("partition", "heal", "Unknown", {"connect-timeout", "connection-lost", "no-banner"}),
        ("replace_host_key", "restore_host_key", "Failed", {"host-key-changed"}),
    ],
)
def test_node_fault_shows_then_clears(daemon, cluster, fault, undo, phase, reasons):
    h = cluster.workers[1]
    getattr(cluster, fault)(h)
    n = phase_of(daemon, h.name, phase)
    assert n["reason"] in reasons and n["message"]
    if n["reason"] == "host-key-changed":
        assert "SHA256:" in n["message"]  # both fingerprints, to compare by hand
    getattr(cluster, undo)(h)
    assert phase_of(daemon, h.name, "Running")["reason"] == "ok"


def test_frozen_host_is_unknown_and_the_api_never_waits(daemon, cluster):
    h = cluster.workers[2]
    cluster.freeze(h)
    t0 = time.monotonic()
    n = phase_of(
        daemon, h.name, "Unknown", timeout=2 + 1 + 10
    )  # connect timeout + interval + slack
    assert n["reason"] in ("no-banner", "connect-timeout", "connection-lost")
    assert time.monotonic() - t0 < 15
    slowest = 0.0
    for _ in range(20):
        t = time.monotonic()
        assert daemon.request("GET", "/api/nodes/")[0] == 200
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 1.0
    cluster.thaw(h)
    phase_of(daemon, h.name, "Running")


@pytest.mark.parametrize(
    "setting, reason",
    [
        ("wrong client key", "auth-failed"),
        ("empty known_hosts", "host-key-unknown"),
    ],
)
def test_untrusted_nodes_fail(start_daemon, cluster, tmp_path, setting, reason):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ssh = (
        {"key_file": str(cluster.wrong_key)}
        if setting == "wrong client key"
        else {"known_hosts": str(empty), "use_system_known_hosts": False}
    )
    d = start_daemon(wait_running=False, ssh=ssh)
    nodes = d.wait_nodes(lambda ns: len(ns) == 3 and all(n["phase"] == "Failed" for n in ns))
    assert {n["reason"] for n in nodes} == {reason}


def test_dns_down_keeps_the_last_list_and_says_stale(daemon, cluster):
    cluster.stop_dns()
    deadline = time.monotonic() + 15
    while True:
        status, headers, raw = daemon.request("GET", "/api/nodes/")
        if "x-discovery-stale" in headers:
            break
        assert time.monotonic() < deadline, "never marked stale"
        time.sleep(0.2)
    assert status == 200 and [n["name"] for n in json.loads(raw)] == worker_names(cluster)
    health = daemon.json("GET", "/healthz")[1]
    assert health["discovery_stale"] is True and headers["x-discovery-stale"]
    assert "discovery_stale_reason" not in health  # open to all: counts only
    assert health["discovery_age_s"] >= 0  # the last good list is kept, and ages
    cluster.start_dns()
    deadline = time.monotonic() + 15
    while "x-discovery-stale" in daemon.request("GET", "/api/nodes/")[1]:
        assert time.monotonic() < deadline, "still stale after DNS came back"
        time.sleep(0.2)


def test_membership_follows_dns(daemon, cluster):
    new = cluster.add_host()
    n = phase_of(daemon, new.name, "Running", timeout=10)
    assert n["ip"] == new.ip
    gone = cluster.workers[1]
    cluster.unpublish(gone)
    daemon.wait_nodes(lambda ns: gone.name not in by_name(ns), timeout=10)


def test_refresh_waits_for_a_fresh_probe(daemon, cluster):
    before = by_name(daemon.json("GET", "/api/nodes/")[1])
    time.sleep(0.05)
    t = time.monotonic()
    status, nodes = daemon.json("GET", "/api/nodes/?refresh=1")
    assert status == 200 and time.monotonic() - t < 10
    for n in nodes:
        assert n["last_probe"] > before[n["name"]]["last_probe"]


# ---- POST /api/mpi_jobs/ -------------------------------------------------------------


def test_empty_post_runs_the_default_job_as_the_seed(daemon, cluster):
    status, job = daemon.json("POST", "/api/mpi_jobs/")
    assert status == 200
    assert list(job)[:4] == ["nodes", "command", "master_name", "response"]
    assert job["nodes"] == [
        [h.ip, "default", h.name, str(dict(sorted(h.labels.items())))] for h in cluster.workers
    ]
    argv = ast.literal_eval(job["command"])
    assert argv[0] == "/usr/bin/mpirun" and argv[-1] == str(cluster.mpi_program)
    assert argv[argv.index("--host") + 1] == ",".join(h.ip for h in cluster.workers)
    assert job["master_name"] == cluster.workers[0].name
    for h in cluster.workers:
        assert re.search(rf"rank \d of 3 on {re.escape(h.ip)}: sum=3", job["response"])
    assert "allreduce ok 3" in job["response"]
    assert (job["state"], job["exit_code"]) == ("succeeded", 0) and job["id"]
    # one timestamp format across the API: RFC 3339, UTC, milliseconds
    _, nodes = daemon.json("GET", "/api/nodes/")
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
    for t in [job["created"], job["started"], job["finished"]] + [n["last_probe"] for n in nodes]:
        assert stamp.match(t), t
    assert job["created"] <= job["started"] <= job["finished"]


def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_sync_answer_of_a_large_job_is_streamed_not_held(daemon, cluster):
    """A sync POST for a job that wrote 150 MB: the daemon (in this process) must not
    build the answer in memory (that would be the log, its decoded text and its JSON:
    several times 150 MB); it streams it after the job ends."""
    import http.client
    import threading
    import urllib.parse

    nbytes = 150_000_000
    peak, base, done = [0], _rss_kb(), threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_kb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    u = urllib.parse.urlsplit(daemon.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    try:
        conn.request(
            "POST",
            "/api/mpi_jobs/",
            body=json.dumps(
                {
                    "nodes": [cluster.workers[0].name],
                    "program": [str(cluster.mpi_program), "--bytes", str(nbytes)],
                }
            ),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()  # the job is over; from here on the client holds the body
        done.set()
        sampler.join()
        assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
        job = json.loads(resp.read())
    finally:
        conn.close()
    assert (job["state"], list(job)[:4]) == (
        "succeeded",
        ["nodes", "command", "master_name", "response"],
    )
    assert len(job["response"]) >= nbytes and "allreduce ok 1" in job["response"]
    assert (peak[0] - base) / 1024 < 100, (
        f"RSS grew {(peak[0] - base) / 1024:.0f} MB before the answer"
    )


def test_failing_job_reports_its_exit_code(daemon, cluster):
    status, job = daemon.json(
        "POST", "/api/mpi_jobs", {"program": [str(cluster.mpi_program), "--exit", "3"]}
    )
    assert status == 200 and (job["state"], job["exit_code"]) == ("failed", 3)


def test_async_job_logs_paging_and_follow(daemon, cluster):
    body = {
        "program": [str(cluster.mpi_program), "--bytes", "300000", "--sleep", "1"],
        "wait": False,
        "nodes": [h.name for h in cluster.workers[:2]],
    }
    status, headers, raw = daemon.request("POST", "/api/mpi_jobs/", body)
    job = json.loads(raw)
    assert status == 202 and headers["location"] == f"/api/mpi_jobs/{job['id']}"
    status, _, streamed = daemon.request("GET", f"/api/mpi_jobs/{job['id']}/logs?follow=1")
    assert status == 200
    done = daemon.wait_job(job["id"])
    assert done["state"] == "succeeded"
    paged, offset = b"", 0
    while True:
        status, h, chunk = daemon.request(
            "GET", f"/api/mpi_jobs/{job['id']}/logs/?offset={offset}&limit=65536"
        )
        assert status == 200 and len(chunk) <= 65536
        if not chunk:
            break
        paged += chunk
        offset = int(h["x-next-offset"])
    assert paged == streamed and b"allreduce ok 2" in paged
    # rank 1's line may land inside rank 0's output (mpirun forwards chunks, not lines)
    assert (
        len(re.sub(rb"rank \d of 2 on [\d.]+: sum=1 expected=1\n|allreduce ok 2\n", b"", paged))
        == 300000
    )
    listed = daemon.json("GET", "/api/mpi_jobs/?limit=5")[1]
    assert listed[0]["id"] == job["id"]  # newest first


@pytest.mark.parametrize(
    "body, field",
    [
        ({"program": "prog"}, "program"),
        ({"program": []}, "program"),
        ({"program": ["a\0b"]}, "program"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"np": 0}, "np"),
        ({"nodes": "x"}, "nodes"),
        ({"bogus": 1}, "bogus"),
        ({"wait": "yes"}, "wait"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"selector": "a=(b"}, "selector"),
    ],
)
def test_bad_input_is_400_naming_the_field(daemon, body, field):
    status, err = daemon.json("POST", "/api/mpi_jobs/", body)
    assert status == 400 and err["field"] == field, err
    assert field in err["message"]


def test_unusable_nodes(daemon, cluster):
    status, err = daemon.json("POST", "/api/mpi_jobs/", {"nodes": ["no-such-node"]})
    assert status == 409 and "no-such-node" in err["message"]
    status, err = daemon.json("POST", "/api/mpi_jobs/", {"master": cluster.hosts[3].name})
    assert status == 409
    for h in cluster.workers:
        cluster.stop_sshd(h)
    daemon.wait_nodes(lambda ns: all(n["phase"] == "Unknown" for n in ns))
    status, err = daemon.json("POST", "/api/mpi_jobs/")
    assert status == 503 and err["message"]


def test_queue_full_is_429_and_cancel_stops_everything(start_daemon, cluster):
    d = start_daemon(mpi={"max_concurrent_jobs": 1, "queue_size": 1})
    sleeper = {"program": [str(cluster.mpi_program), "--sleep", "60"], "wait": False}
    first = d.json("POST", "/api/mpi_jobs/", sleeper)[1]
    second = d.json("POST", "/api/mpi_jobs/", sleeper)[1]
    status, err = d.json("POST", "/api/mpi_jobs/", sleeper)
    assert status == 429 and err["error"] == "queue-full"
    assert d.json("GET", f"/api/mpi_jobs/{second['id']}")[1]["state"] == "pending"
    deadline = time.monotonic() + 30
    while "rank 2 of 3" not in d.request("GET", f"/api/mpi_jobs/{first['id']}/logs")[2].decode():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for job in (second, first):
        status, _got = d.json("DELETE", f"/api/mpi_jobs/{job['id']}")
        assert status in (200, 202)  # 202: the sweep took longer than server.cancel_answer_s
        assert d.wait_job(job["id"], timeout=60)["state"] == "cancelled"
    left = [cmd for _, cmd in cluster.user_processes() if re.search(r"mpirun|orted|mpiprog", cmd)]
    assert left == []
    assert d.json("DELETE", f"/api/mpi_jobs/{first['id']}")[0] == 409


def test_cli_run_exits_with_the_job_code(daemon, cluster):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlbench_daemon",
            "run",
            "--url",
            daemon.url,
            "--",
            str(cluster.mpi_program),
            "--argv",
            "hello world",
            "--exit",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 7, r.stderr
    assert b"hello world".hex() in r.stdout and "allreduce ok 3" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "mlbench_daemon", "nodes", "--url", daemon.url, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and [n["name"] for n in json.loads(r.stdout)] == worker_names(cluster)


def test_metrics(daemon, cluster):
    daemon.json("POST", "/api/mpi_jobs/", {"program": [str(cluster.mpi_program), "--exit", "2"]})
    cluster.stop_sshd(cluster.workers[1])
    phase_of(daemon, cluster.workers[1].name, "Unknown")
    status, headers, raw = daemon.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = dict(re.findall(r"^(mlbench_daemon_\S+) (\S+)$", text, re.M))
    assert values['mlbench_daemon_nodes{phase="Running"}'] == "2.0"
    assert values['mlbench_daemon_nodes{phase="Unknown"}'] == "1.0"
    assert float(values['mlbench_daemon_jobs{state="failed"}']) >= 1
    assert float(values["mlbench_daemon_probe_latency_seconds_count"]) > 0
    assert float(values['mlbench_daemon_probe_failures_total{reason="connection-refused"}']) >= 1
    assert float(values["mlbench_daemon_job_duration_seconds_count"]) >= 1
    assert any(
        k.startswith(
            'mlbench_daemon_http_requests_total{method="POST",route="/api/mpi_jobs",status="200"}'
        )
        for k in values
    )


def test_label_rules_slots_and_np(start_daemon, cluster):
    w0, w1, w2 = cluster.workers
    d = start_daemon(
        discovery={"label_rules": [{"match": w0.name, "labels": {"slots": "2", "rack": "a"}}]}
    )
    node = by_name(d.json("GET", "/api/nodes/")[1])[w0.name]
    assert node["labels"] == str(dict(sorted({**w0.labels, "slots": "2", "rack": "a"}.items())))
    status, job = d.json("POST", "/api/mpi_jobs/", {"np": 4})
    assert status == 200 and job["exit_code"] == 0, job
    argv = ast.literal_eval(job["command"])
    assert argv[argv.index("--host") + 1] == f"{w0.ip}:2,{w1.ip},{w2.ip}"
    assert argv[argv.index("-np") + 1] == "4"
    placed = re.findall(r"rank \d of 4 on (\S+):", job["response"])
    assert sorted(placed) == sorted([w0.ip, w0.ip, w1.ip, w2.ip])


def test_a_waiting_sync_request_holds_its_place(start_daemon, cluster):
    import threading

    d = start_daemon(mpi={"max_concurrent_jobs": 1, "queue_size": 1})
    first = d.json(
        "POST",
        "/api/mpi_jobs/",
        {"program": [str(cluster.mpi_program), "--sleep", "60"], "wait": False},
    )[1]
    result = {}
    sync = threading.Thread(
        target=lambda: result.update(
            zip(
                ("status", "job"),
                d.json("POST", "/api/mpi_jobs/", {"program": [str(cluster.mpi_program)]}),
                strict=False,
            )
        )
    )
    sync.start()
    deadline = time.monotonic() + 10
    while len(d.json("GET", "/api/mpi_jobs/")[1]) < 2:
        assert time.monotonic() < deadline, "the sync request never queued"
        time.sleep(0.05)
    assert d.json("POST", "/api/mpi_jobs/", {"wait": False})[0] == 429  # its place is taken
    assert d.json("DELETE", f"/api/mpi_jobs/{first['id']}")[0] in (200, 202)  # 202: still sweeping
    sync.join(120)
    assert result["status"] == 200 and result["job"]["state"] == "succeeded"
    assert "allreduce ok 3" in result["job"]["response"]
