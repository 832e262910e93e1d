"""Ranks reach the daemon without the operator's token (issue 22 item 4), on the real
cluster: the run_env hook (runenv.py) mints a run's capability and opens a reverse forward
on each node's SSH session (ssh/forward.py); a real MPI job's ranks post through the URL it
gives them to a loopback-bound daemon; a node that refuses forwarding or holds the port is
reported, and the run falls back to a routable bind address or is refused; the capability
dies with the run; HTTP Basic through a real ~/.netrc with `requests`.

The metrics route is another part's (the metrics store); until it is merged, a small real
route stands in for it (`POST /api/metrics/`, registered through the route table machinery
like any route), recording what it was posted and the run scope the capability gave it."""

import dataclasses
import json
import logging
import subprocess
import threading
import time

import paramiko
import pytest
import requests

from mlbench_daemon import capability
from mlbench_daemon.api.common import Deps, as_json, body
from mlbench_daemon.api.plugin import register
from mlbench_daemon.openapi import Route, answer, ref
from mlbench_daemon.runenv import RUN_ENV, URL_ENV, RunRefused
from mlbench_daemon.vocabulary import Role
from tests.helpers import HANG, wait_for

PORT = 18080  # metrics.forward_port's default


@dataclasses.dataclass(frozen=True)
class Run:
    """The fields of the runs registry's RunView the hook reads."""

    id: int
    nodes: tuple[str, ...]


def stand_in_metrics(d):
    """Give the live daemon a POST /api/metrics/ that records (scope, body)."""
    posted = []
    lock = threading.Lock()

    def post(deps: Deps) -> str:
        import bottle

        with lock:
            posted.append((bottle.request.environ.get(capability.SCOPE), body(deps.max_body_bytes)))
        return as_json({"ok": True}, 201)

    route = Route(
        "POST", "/api/metrics/", post, "postMetricStandIn", "stand-in", "meta",
        {201: answer("posted", ref("Error"))}, role=Role.SUBMITTER,
    )  # fmt: skip
    register(d.daemon.app, [route], Deps(None, None, None, 1 << 20, None, "", False))
    return posted


# Each rank posts one point from its node, as a rank would: urllib, a JSON body, the URL
# from its environment (form bodies are another part's, with the metrics route).
RANK = r"""
import json, os, socket, urllib.request
rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK")
body = {"run_id": os.environ["MLBENCH_RUN_ID"], "name": "rank@" + rank,
        "value": socket.gethostname(), "cumulative": "False"}
req = urllib.request.Request("http://" + os.environ["MLBENCH_DASHBOARD_URL"] + "/api/metrics/",
                             data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    print("rank", rank, "posted", r.status, flush=True)
"""

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
    posted = stand_in_metrics(d)
    nodes = nodes_of(d, cluster)
    run = Run(11, tuple(n.name for n in nodes))
    env = d.daemon.run_env(run, nodes)
    url, secret = env.env[URL_ENV], env.env[URL_ENV].rsplit("/", 1)[1]
    assert env.notes == () and url == f"127.0.0.1:{PORT}{capability.PREFIX}{secret}"
    assert env.env[RUN_ENV] == "11" and d.daemon.caps.check(secret) == 11
    piped = d.daemon.pool.forwards.piped

    status, job = d.json(
        "POST", "/api/mpi_jobs/",
        {"program": ["python3", "-c", RANK], "np": 3, "env": dict(env.env), "wait": True},
    )  # fmt: skip
    assert status == 200 and job["state"] == "succeeded", job
    assert all(f"rank {r} posted 201" in job["response"] for r in range(3)), job["response"]
    assert sorted(p[1]["name"] for p in posted) == ["rank@0", "rank@1", "rank@2"]
    assert {p[0] for p in posted} == {11}  # every post scoped to the run
    assert len({p[1]["value"] for p in posted}) == 3  # from three nodes, each its own forward
    assert d.daemon.pool.forwards.piped == piped + 3
    assert secret not in json.dumps({k: v for k, v in job.items() if k != "response"})

    # the capability reads nothing, through the forward as from here
    r = cluster.ssh(cluster.workers[0], ["curl", "-s", f"http://{url}/api/nodes/"])
    assert '"error": "forbidden"' in r.stdout and secret not in r.stdout, r
    u = d.url + capability.PREFIX + secret
    assert requests.get(u + "/api/mpi_jobs/", timeout=HANG).status_code == 403
    assert requests.post(u + "/api/mpi_jobs/", json={}, timeout=HANG).status_code == 403

    d.daemon.run_env.ended(run)  # what runs.on_ended calls
    assert d.daemon.caps.check(secret) is None
    answer_ = requests.post(u + "/api/metrics/", json={"run_id": 11}, timeout=HANG)
    assert answer_.status_code == 404 and "ended" in answer_.json()["message"]
    for w in cluster.workers:  # the forwards are gone: nothing listens on the nodes' port
        r = cluster.ssh(w, ["python3", "-c", CONNECT, str(PORT)])
        assert r.stdout.startswith("closed"), (w.name, r)
    assert len(posted) == 3

    d.daemon.audit.flush()
    audit = open(d.daemon.audit.path).read()
    assert "run_capability" in audit
    assert secret not in audit and secret not in caplog.text and "run-cap" not in audit


def test_a_node_refusing_forwards_is_reported_and_the_run_falls_back_or_is_refused(
    start_daemon, cluster, tmp_path
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
        nodes = nodes_of(d, cluster)
        with pytest.raises(RunRefused) as e:
            d.daemon.run_env(Run(21, tuple(n.name for n in nodes)), nodes)
        msg = str(e.value)
        assert f"{no_fwd.name} refused the reverse forward" in msg and "AllowTcpForwarding" in msg
        assert (
            f"{taken.name} refused the reverse forward of port {PORT}: port {PORT} is taken" in msg
        )
        assert "127.0.0.1 only" in msg and e.value.status == 503
        assert d.daemon.caps.live() == 0  # nothing minted survives a refused run
        ok = cluster.workers[2]
        r = cluster.ssh(ok, ["python3", "-c", CONNECT, str(PORT)])
        assert r.stdout.startswith("closed"), r  # its forward was closed again

        token = tmp_path / "token"
        token.write_text("fallback-token-0123456789\n")
        token.chmod(0o600)
        h = start_daemon(server={"host": cluster.head_ip, "token_file": str(token)})
        posted = stand_in_metrics(h)
        nodes = nodes_of(h, cluster)
        env = h.daemon.run_env(Run(22, tuple(n.name for n in nodes)), nodes)
        port = h.daemon.bound()[1]
        url = env.env[URL_ENV]
        assert url.startswith(f"{cluster.head_ip}:{port}{capability.PREFIX}")
        assert sorted(env.notes) == sorted(
            [
                f"{no_fwd.name} refused the reverse forward of port {PORT}: its sshd refuses "
                f"remote port forwarding (AllowTcpForwarding); ranks post to "
                f"{cluster.head_ip}:{port}",
                f"{taken.name} refused the reverse forward of port {PORT}: port {PORT} is taken "
                f"on the node; ranks post to {cluster.head_ip}:{port}",
            ]
        )
        post = (
            "import json, urllib.request, sys; r = urllib.request.urlopen(urllib.request."
            "Request(sys.argv[1], data=b'{\"run_id\": \"22\"}', headers={'Content-Type': "
            "'application/json'}), timeout=30); print(r.status)"
        )
        r = cluster.ssh(no_fwd, ["python3", "-c", post, f"http://{url}/api/metrics/"])
        assert r.stdout.strip() == "201", r  # no token: the capability is enough
        assert posted == [(22, {"run_id": "22"})]
        h.daemon.run_env.ended(Run(22, ()))
        assert h.daemon.caps.live() == 0
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
