"""Ranks reach the daemon without the operator's token (issue 22 item 4), on the real
cluster: a real run (POST /api/runs/, mlbench-core's client) gets its capability from the
run_env hook (runenv.py) and a reverse forward on each node's SSH session (ssh/forward.py);
its MPI ranks post metrics as mlbench-core's post_metric does (a form) through the URL the
run gives them, to the real metric store of a loopback-bound daemon; a node that refuses
forwarding or holds the port is reported, and the run falls back to a routable bind address
or fails saying why; the capability dies with the run; HTTP Basic through a real ~/.netrc
with `requests`."""

import json
import logging
import subprocess
import threading
import time
import urllib.parse

import paramiko
import requests

from mlbench_daemon import capability
from mlbench_daemon.runenv import RUN_ENV, URL_ENV
from tests.helpers import HANG, wait_for

PORT = 18080  # metrics.forward_port's default


# Each rank posts one point from its node as mlbench-core's post_metric does (a form with
# its fields; the nodes' python3 has no `requests`), to the URL from its environment; then
# tries to read the job list with the same capability, which must be refused.
RANK = r"""
import os, socket, urllib.error, urllib.parse, urllib.request
rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
base = "http://" + os.environ["MLBENCH_DASHBOARD_URL"] + "/api/"
form = {"run_id": os.environ["MLBENCH_RUN_ID"], "name": "from-" + socket.gethostname(),
        "value": rank,
        "cumulative": "False", "date": "2026-12-05 10:00:0" + rank,
        "metadata": "rank " + rank}
req = urllib.request.Request(base + "metrics/", data=urllib.parse.urlencode(form).encode())
with urllib.request.urlopen(req, timeout=60) as r:
    print("rank", rank, "posted", r.status, flush=True)
try:
    urllib.request.urlopen(base + "mpi_jobs/", timeout=60)
    print("rank", rank, "read the jobs", flush=True)
except urllib.error.HTTPError as e:
    print("rank", rank, "refused", e.code, flush=True)
"""


def _client(d):
    from tests.mlbench_core import api_client

    return api_client(urllib.parse.urlsplit(d.url).netloc)


def _until_final(api, run_id):
    got = []

    def final():
        run = api.get_run(run_id).result().json()
        got[:] = [run]
        return run["state"] in ("finished", "failed")

    wait_for(final, timeout=120, what=f"run {run_id} to end")
    return got[0]


def spy_run_env(d):
    """The RunEnvs the daemon's real hook gives (values are never stored, so the test keeps
    them to try the capability after the run)."""
    given, hook = [], d.daemon.runs.run_env

    def passing(run, nodes):
        got = hook(run, nodes)
        given.append(got)
        return got

    d.daemon.runs.run_env = passing
    return given


def rank_script(cluster):
    path = cluster.dir / "bin" / "post_metric.py"
    path.write_text(RANK)
    path.chmod(0o644)
    return path


CONNECT = r"""
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("open")
except OSError as e:
    print("closed", e)
"""


def nodes_of(d, cluster):
    return [
        s.node for s in d.daemon.registry.nodes() if s.node.ip in {w.ip for w in cluster.workers}
    ]


def test_ranks_post_through_the_reverse_forward_and_the_capability_ends(
    start_daemon, cluster, caplog
):
    caplog.set_level(logging.INFO)
    d = start_daemon()
    api = _client(d)
    piped = d.daemon.pool.forwards.piped
    given = spy_run_env(d)
    cmd = f"python3 {rank_script(cluster)}"
    n = len(cluster.workers)
    r = api.create_run("fwd", n, custom_image_name="x", custom_image_command=cmd).result()
    assert r.status_code == 201, r.text
    run = _until_final(api, r.json()["id"])
    assert run["state"] == "finished", run
    meta = run["job_metadata"]
    assert meta["notes"] == [], meta  # every node took its forward
    for rank in range(n):
        assert f"rank {rank} posted 201" in meta["stdout"], meta["stdout"]
        assert f"rank {rank} refused 403" in meta["stdout"], meta["stdout"]
    (env,) = [g.env for g in given]
    url, secret = env[URL_ENV], env[URL_ENV].rsplit("/", 1)[1]
    assert url == f"127.0.0.1:{PORT}{capability.PREFIX}{secret}" and env[RUN_ENV] == str(run["id"])

    # the real metric store has one point per rank, each from its own node
    got = api.get_run_metrics(run["id"]).result()
    assert got.status_code == 200, got.text
    series = {k: v for k, v in got.json().items() if k.startswith("from-")}
    assert len(series) == n, series  # n nodes, each posting through its own forward
    assert sorted(float(p["value"]) for ps in series.values() for p in ps) == list(range(n))
    assert d.daemon.pool.forwards.piped >= piped + 2 * n
    answers = json.dumps([api.get_run(run["id"]).result().json(), api.get_runs().result().json()])
    assert secret not in answers
    job = d.json("GET", f"/api/mpi_jobs/{run['job_id']}")[1]
    assert secret not in json.dumps(job)

    # the run ended: its capability is gone, and nothing listens on the nodes' port
    assert d.daemon.caps.check(secret) is None and d.daemon.caps.live() == 0
    u = d.url + capability.PREFIX + secret
    answer_ = requests.post(u + "/api/metrics/", data={"run_id": run["id"]}, timeout=HANG)
    assert answer_.status_code == 404 and "ended" in answer_.json()["message"]
    for w in cluster.workers:
        r = cluster.ssh(w, ["python3", "-c", CONNECT, str(PORT)])
        assert r.stdout.startswith("closed"), (w.name, r)
    assert api.get_run_metrics(run["id"]).result().json() == got.json()  # nothing lost

    d.daemon.audit.flush()
    audit = open(d.daemon.audit.path).read()
    assert "run_capability" in audit
    assert secret not in audit and secret not in caplog.text and "run-cap" not in audit
    assert api.delete_run(run["id"]).result().status_code == 204  # frees the shared daemon


def test_a_node_refusing_forwards_is_reported_and_the_run_falls_back_or_is_refused(
    start_daemon, cluster, tmp_path, monkeypatch
):
    no_fwd, taken = cluster.workers[0], cluster.workers[1]
    cluster.set_sshd_option(no_fwd, "AllowTcpForwarding", "local")  # local only: no remote
    holder = subprocess.Popen(
        ["ip", "netns", "exec", taken.ns, "python3", "-c",
         # SO_REUSEADDR: the last test's forwarded connections may be in TIME_WAIT there
         f"import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
         f"socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {PORT})); "
         "s.listen(); print('bound', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "bound"
        d = start_daemon()  # loopback: the nodes cannot reach it but through a forward
        api = _client(d)
        n = len(cluster.workers)
        cmd = f"python3 {rank_script(cluster)}"
        r = api.create_run("refused", n, custom_image_name="x", custom_image_command=cmd)
        r = r.result()
        assert r.status_code == 201, r.text
        run = _until_final(api, r.json()["id"])
        assert run["state"] == "failed" and run["job_id"] is None, run
        msg = " ".join(run["job_metadata"]["notes"])
        assert f"{no_fwd.name} refused the reverse forward" in msg and "AllowTcpForwarding" in msg
        assert (
            f"{taken.name} refused the reverse forward of port {PORT}: port {PORT} is taken" in msg
        )
        assert "127.0.0.1 only" in msg
        assert d.daemon.caps.live() == 0  # nothing minted survives a refused run
        ok = cluster.workers[2]
        r = cluster.ssh(ok, ["python3", "-c", CONNECT, str(PORT)])
        assert r.stdout.startswith("closed"), r  # its forward was closed again
        assert api.delete_run(run["id"]).result().status_code == 204

        token = tmp_path / "token"
        token.write_text("fallback-token-0123456789\n")
        token.chmod(0o600)
        h = start_daemon(server={"host": cluster.head_ip, "token_file": str(token)})
        given = spy_run_env(h)
        # mlbench-core's client sends no token: requests takes it from ~/.netrc (HTTP Basic)
        home = tmp_path / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("NETRC", raising=False)
        netrc = home / ".netrc"
        netrc.write_text(
            f"machine {cluster.head_ip}\n  login x\n  password fallback-token-0123456789\n"
        )
        netrc.chmod(0o600)
        api = _client(h)
        r = api.create_run("fallback", n, custom_image_name="x", custom_image_command=cmd)
        r = r.result()
        assert r.status_code == 201, r.text
        run = _until_final(api, r.json()["id"])
        assert run["state"] == "finished", run
        port = h.daemon.bound()[1]
        assert sorted(run["job_metadata"]["notes"]) == sorted(
            [
                f"{no_fwd.name} refused the reverse forward of port {PORT}: its sshd refuses "
                f"remote port forwarding (AllowTcpForwarding); ranks post to "
                f"{cluster.head_ip}:{port}",
                f"{taken.name} refused the reverse forward of port {PORT}: port {PORT} is taken "
                f"on the node; ranks post to {cluster.head_ip}:{port}",
            ]
        )
        (env,) = [g.env for g in given]
        assert env[URL_ENV].startswith(f"{cluster.head_ip}:{port}{capability.PREFIX}")
        for rank in range(n):  # no token: the capability is enough
            assert f"rank {rank} posted 201" in run["job_metadata"]["stdout"], run
        got = api.get_run_metrics(run["id"]).result().json()
        assert len([k for k in got if k.startswith("from-")]) == n and h.daemon.caps.live() == 0
        assert api.delete_run(run["id"]).result().status_code == 204
    finally:
        holder.kill()
        holder.wait()


def test_basic_auth_from_netrc_with_requests(start_daemon, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("netrc-token-0123456789abcdef\n")
    token.chmod(0o600)
    d = start_daemon(server={"token_file": str(token)}, wait_running=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    url = d.url + "/api/nodes/"
    assert requests.get(url, timeout=HANG).status_code == 401  # no ~/.netrc yet
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1\n  login mlbench\n  password wrong-token\n")
    netrc.chmod(0o600)
    assert requests.get(url, timeout=HANG).status_code == 401
    netrc.write_text(
        "machine 127.0.0.1\n  login mlbench\n  password netrc-token-0123456789abcdef\n"
    )
    r = requests.get(url, timeout=HANG)
    assert r.status_code == 200 and isinstance(r.json(), list)
    assert r.request.headers["Authorization"].startswith("Basic ")  # what requests sent
    who = requests.get(d.url + "/api/whoami", timeout=HANG).json()
    assert (who["name"], who["role"]) == ("admin", "admin")


def test_global_requests_on_one_connection_never_take_each_others_reply(cluster, tmp_path):
    """The probe loop's keepalives and the forwards share a connection's one reply slot:
    each caller gets its own reply (a forward of port 0 its port, a keepalive sshd's
    refusal), from many threads at once."""
    from mlbench_daemon.ssh import Pool
    from mlbench_daemon.ssh.forward import BIND
    from tests.test_ssh import ssh_cfg

    pool = Pool(ssh_cfg(cluster, tmp_path))
    try:
        h = cluster.workers[0]
        pool.probe(h.ip, 22, h.fqdn)
        conn = pool.connection(h.ip, 22)
        wrong = []

        def forwards():
            for _ in range(15):
                deadline = time.monotonic() + HANG
                reply = conn.global_reply("tcpip-forward", deadline, (BIND, 0))
                if not isinstance(reply, paramiko.Message):
                    wrong.append(("forward", reply))
                    continue
                port = reply.get_int()
                if not 0 < port < 65536:
                    wrong.append(("port", port))
                if conn.global_request("cancel-tcpip-forward", deadline, (BIND, port)) is not True:
                    wrong.append(("cancel", port))

        def keepalives():
            for _ in range(30):
                got = conn.global_request("keepalive@openssh.com", time.monotonic() + HANG)
                if got is not False:
                    wrong.append(("keepalive", got))

        threads = [threading.Thread(target=f) for f in (forwards, keepalives) * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG)
        assert not any(t.is_alive() for t in threads) and wrong == []
        assert conn.connects == 1
    finally:
        pool.close()


def test_a_reconnected_session_gets_its_forward_again(cluster, tmp_path):
    from mlbench_daemon.ssh import Pool
    from tests.test_ssh import ssh_cfg

    pool = Pool(ssh_cfg(cluster, tmp_path))
    target = socket_server()
    try:
        h = cluster.workers[1]
        pool.probe(h.ip, 22, h.fqdn)
        pool.forward(h.ip, 22, PORT, target.getsockname())
        assert cluster.ssh(h, ["python3", "-c", CONNECT, str(PORT)]).stdout.startswith("open")
        pool.connection(h.ip, 22).close()  # the session is lost: sshd drops its forward
        wait_for(
            lambda: cluster.ssh(h, ["python3", "-c", CONNECT, str(PORT)]).stdout.startswith(
                "closed"
            ),
            what="sshd to drop the lost session's forward",
        )
        pool.probe(h.ip, 22)  # reconnects; the forward is asked for again
        assert pool.connection(h.ip, 22).connects == 2
        wait_for(
            lambda: cluster.ssh(h, ["python3", "-c", CONNECT, str(PORT)]).stdout.startswith("open"),
            what="the forward on the new session",
        )
        pool.unforward(h.ip, 22, PORT)
        assert pool.forwards.ports(h.ip, 22) == {}
    finally:
        target.close()
        pool.close()


def socket_server():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s
