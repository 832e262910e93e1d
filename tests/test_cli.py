"""The CLI against a small real HTTP daemon stand-in (bottle on waitress, loopback).

The stand-in runs each job's program as a local subprocess, so output, exit codes
and cancellation are real, and serves the logs endpoint with the same contract as
the daemon: ``?offset=N&limit=M`` -> raw bytes + ``X-Next-Offset``; ``follow=1``
streams until the job ends.
"""

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing

import bottle
import pytest
import waitress
from waitress import wasyncore

import mlbench_daemon
from mlbench_daemon import cli, logs, metrics
from mlbench_daemon.client import Client, ExitStatus
from tests import mlbench_core

TOKEN = "s3cret-token"
HANG_S = 60  # bound on an answer that should take a moment
NODES = [
    {
        "name": "w-2",
        "labels": "{'app': 'mlbench', 'slots': '2'}",
        "label_map": {"app": "mlbench", "slots": "2"},
        "phase": "Unknown",
        "ip": "10.0.0.3",
        "reason": "connect-timeout",
    },
    {
        "name": "w-10",
        "labels": "{'app': 'mlbench'}",
        "label_map": {"app": "mlbench"},
        "phase": "Running",
        "ip": "10.0.0.11",
        "reason": None,
    },
]


class StandIn:
    def __init__(self, token=None):
        self.token = token
        self.jobs = {}
        self.requests = []
        self.cancel_stuck = False
        self.lock = threading.Lock()
        app = bottle.Bottle()
        app.route("/api/nodes/", "GET", self.nodes)
        app.route("/api/mpi_jobs/", "GET", self.list_jobs)
        app.route("/api/mpi_jobs/", "POST", self.create)
        app.route("/api/mpi_jobs/<jid>", "GET", self.get)
        app.route("/api/mpi_jobs/<jid>", "DELETE", self.cancel)
        app.route("/api/mpi_jobs/<jid>/logs", "GET", self.logs)
        app.route("/api/runs/", "GET", self.list_runs)
        app.route("/api/runs/", "POST", self.create_run)
        app.route("/api/runs/<rid>", "GET", self.get_run)
        app.route("/api/runs/<rid>", "DELETE", self.delete_run)
        self.runs = {}
        self.forms = []  # every POST /api/runs/ form, as it came
        app.add_hook("before_request", self.check)
        self.app = app

    def check(self):
        self.requests.append(
            (bottle.request.method, bottle.request.fullpath, bottle.request.query_string)
        )
        if self.token and bottle.request.get_header("Authorization") != f"Bearer {self.token}":
            raise self.error(401, "unauthorized", "missing or wrong token")

    @staticmethod
    def error(status, error, message):
        return bottle.HTTPResponse(
            json.dumps({"error": error, "message": message}),
            status,
            {"Content-Type": "application/json"},
        )

    def nodes(self):
        return json.dumps(NODES)

    def view(self, job):
        return {k: job[k] for k in ("id", "state", "exit_code", "command", "master_name")}

    def list_jobs(self):
        return json.dumps([self.view(j) for j in self.jobs.values()])

    def create(self):
        job = self.start_job(bottle.request.json or {})
        return bottle.HTTPResponse(
            json.dumps(self.view(job)),
            202,
            {"Location": f"/api/mpi_jobs/{job['id']}", "Content-Type": "application/json"},
        )

    def start_job(self, body):
        if body.get("np", 1) > 2:
            raise self.error(409, "conflict", f"np={body['np']} but only 2 Running nodes")
        argv = body.get("program") or ["echo", "default program"]
        env = dict(os.environ, **body.get("env", {}))
        with self.lock:
            jid = str(len(self.jobs) + 1)
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            job = self.jobs[jid] = {
                "id": jid,
                "state": "running",
                "exit_code": None,
                "command": str(argv),
                "master_name": "w-10",
                "out": bytearray(),
                "proc": proc,
                "body": body,
                "done": threading.Event(),
            }
        threading.Thread(target=self.pump, args=(job,), daemon=True).start()
        return job

    def pump(self, job):
        for chunk in iter(lambda: job["proc"].stdout.read1(4096), b""):
            job["out"] += chunk
        code = job["proc"].wait()
        if job["state"] != "cancelled":
            job["state"], job["exit_code"] = ("succeeded" if code == 0 else "failed"), code
        job["done"].set()

    def job(self, jid):
        if jid not in self.jobs:
            raise self.error(404, "not-found", f"no job {jid}")
        return self.jobs[jid]

    def get(self, jid):
        return json.dumps(self.view(self.job(jid)))

    def cancel(self, jid):
        job = self.job(jid)
        if self.cancel_stuck:  # the daemon's answer while a kill cannot reach the master
            return bottle.HTTPResponse(
                json.dumps(self.view(job)), 202, {"Content-Type": "application/json"}
            )
        job["state"] = "cancelled"
        job["proc"].kill()
        job["done"].wait(10)
        return json.dumps(self.view(job))

    # MLBench runs: one job each, of the catalogue entry the form names; the run's state
    # in MLBench's words follows its job's
    CATALOGUE: typing.ClassVar = {
        "mlbench/pytorch-cifar10-resnet20-all-reduce:latest": ["sh", "-c", "echo epoch 1"],
        "failing": ["sh", "-c", "sleep 0.3; echo diverged; exit 4"],
        "over-at-once": ["sh", "-c", "echo already done"],  # answered once its job ended
    }
    RUN_STATE: typing.ClassVar = {"running": "started", "succeeded": "finished"}

    def run_view(self, run):
        job = self.jobs[run["job_id"]]
        state = self.RUN_STATE.get(job["state"], "failed")
        return dict(run, state=state, finished_at=None if state == "started" else "2026-01-01")

    def list_runs(self):
        return json.dumps([self.run_view(r) for r in self.runs.values()])

    def create_run(self):
        form = dict(bottle.request.forms.decode())
        self.forms.append((bottle.request.content_type, form))
        if form.get("image_name") not in self.CATALOGUE:
            raise self.error(400, "bad-request", f"no catalogue entry {form.get('image_name')}")
        with self.lock:
            rid = len(self.runs) + 1
        job = self.start_job({"program": self.CATALOGUE[form["image_name"]]})
        if form["image_name"] == "over-at-once":
            job["done"].wait(HANG_S)
        run = {"id": rid, "name": form["name"], "created_at": "2026-01-01", "job_id": job["id"]}
        run["num_workers"] = int(form["num_workers"])
        self.runs[rid] = run
        return bottle.HTTPResponse(
            json.dumps(self.run_view(run)), 201, {"Content-Type": "application/json"}
        )

    def get_run(self, rid):
        if int(rid) not in self.runs:
            raise self.error(404, "not-found", f"no run {rid}")
        return json.dumps(self.run_view(self.runs[int(rid)]))

    def delete_run(self, rid):
        self.get_run(rid)
        self.jobs[self.runs.pop(int(rid))["job_id"]]["proc"].kill()
        return bottle.HTTPResponse(b"", 204)

    def logs(self, jid):
        job = self.job(jid)
        offset = int(bottle.request.query.get("offset", 0))
        limit = int(bottle.request.query.get("limit", 5))  # tiny, so clients must page
        if bottle.request.query.get("follow") == "1":

            def stream(pos=offset):
                while True:
                    done = job["done"].is_set()
                    if len(job["out"]) > pos:
                        chunk = bytes(job["out"][pos:])
                        pos += len(chunk)
                        yield chunk
                    elif done:
                        return
                    else:
                        time.sleep(0.02)

            bottle.response.content_type = "application/octet-stream"
            return stream()
        chunk = bytes(job["out"][offset : offset + limit])
        return bottle.HTTPResponse(
            chunk,
            200,
            {"Content-Type": "application/octet-stream", "X-Next-Offset": str(offset + len(chunk))},
        )


@pytest.fixture
def standin(request):
    token = getattr(request, "param", None)
    s = StandIn(token)
    server = waitress.create_server(s.app, host="127.0.0.1", port=0, threads=6)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    s.url = f"http://127.0.0.1:{server.effective_port}"
    yield s
    for job in s.jobs.values():
        if job["proc"].poll() is None:
            job["proc"].kill()
            job["proc"].wait()
    # close inside the loop's own thread: closing from here races its select()
    server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
    thread.join(10)
    server.task_dispatcher.shutdown()


class Out(io.StringIO):
    """A text stdout with a .buffer, like sys.stdout."""

    def __init__(self, tty=False):
        super().__init__()
        self.buffer = io.BytesIO()
        self.tty = tty

    def isatty(self):
        return self.tty

    def text(self):
        return self.getvalue() + self.buffer.getvalue().decode()


def run_cli(argv, environ=None, tty=False):
    out = Out(tty)
    code = cli.main(argv, environ=environ or {}, out=out)
    return code, out.text()


# --- global options -------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"], environ={})
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlbench-daemon {mlbench_daemon.__version__}"


def test_globals_before_and_after_the_command(standin):
    for argv in (
        ["--url", standin.url, "--json", "nodes"],
        ["nodes", "--url", standin.url, "--json"],
    ):
        code, text = run_cli(argv)
        assert code == 0
        assert json.loads(text) == NODES


def test_url_from_environment(standin):
    code, text = run_cli(["--json", "nodes"], environ={"MLBENCH_DAEMON_URL": standin.url})
    assert code == 0 and json.loads(text) == NODES


def test_unreachable_daemon_is_one_line_exit_2(capsys, unused_port):
    url = f"http://127.0.0.1:{unused_port}"
    code, _ = run_cli(["--url", url, "nodes"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"mlbench-daemon: cannot reach daemon at {url}: ")
    assert err.count("\n") == 1


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- nodes / jobs ---------------------------------------------------------------------


def test_nodes_table(standin):
    code, text = run_cli(["--url", standin.url, "nodes"])
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "IP", "REASON", "LABELS"]
    assert lines[1].split() == [
        "w-2",
        "Unknown",
        "10.0.0.3",
        "connect-timeout",
        "app=mlbench,slots=2",
    ]
    assert lines[2].split() == ["w-10", "Running", "10.0.0.11", "app=mlbench"]
    assert "\033[" not in text


def test_nodes_phase_coloured_on_a_tty(standin):
    code, text = run_cli(["--url", standin.url, "nodes"], tty=True)
    assert code == 0
    assert "\033[32mRunning\033[0m" in text and "\033[31mUnknown\033[0m" in text
    # columns still line up: the IP column starts at the same place on every line
    lines = [
        line.replace("\033[32m", "").replace("\033[31m", "").replace("\033[0m", "")
        for line in text.splitlines()
    ]
    ips = ("10.0.0.3", "10.0.0.11")
    assert len({line.index(ip) for line, ip in zip(lines[1:], ips, strict=True)}) == 1


@pytest.mark.parametrize("standin", [TOKEN], indirect=True)
def test_token_file_is_sent(standin, tmp_path, capsys):
    code, _ = run_cli(["--url", standin.url, "nodes"])
    assert code == 1
    assert capsys.readouterr().err == "mlbench-daemon: HTTP 401: missing or wrong token\n"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, text = run_cli(["nodes", "--url", standin.url, "--token-file", str(token_file)])
    assert code == 0 and "w-10" in text
    code, text = run_cli(
        ["nodes", "--url", standin.url], environ={"MLBENCH_DAEMON_TOKEN_FILE": str(token_file)}
    )
    assert code == 0


def test_unreadable_token_file(tmp_path, capsys):
    code, _ = run_cli(["--token-file", str(tmp_path / "absent"), "nodes"])
    assert code == 2
    assert capsys.readouterr().err.startswith("mlbench-daemon: token file: cannot read ")


# --- run / logs / cancel --------------------------------------------------------------


def test_run_streams_output_and_exits_with_the_job_code(standin):
    code, text = run_cli(
        [
            "--url",
            standin.url,
            "run",
            "--np",
            "2",
            "--env",
            "GREETING=hi there",
            "--",
            "sh",
            "-c",
            'echo "$GREETING"; sleep 0.3; echo second; exit 3',
        ]
    )
    assert code == 3
    assert text == "hi there\nsecond\n"
    body = next(iter(standin.jobs.values()))["body"]
    assert body == {
        "wait": False,
        "np": 2,
        "env": {"GREETING": "hi there"},
        "program": ["sh", "-c", 'echo "$GREETING"; sleep 0.3; echo second; exit 3'],
    }


def test_run_success_and_large_output(standin):
    code, text = run_cli(["--url", standin.url, "run", "--", "seq", "1", "20000"])
    assert code == 0
    assert text == "".join(f"{i}\n" for i in range(1, 20001))


def test_run_default_program_sends_no_program(standin):
    code, text = run_cli(
        ["run", "--url", standin.url, "--node", "w-10", "--master", "w-10", "--timeout", "5"]
    )
    assert code == 0 and text == "default program\n"
    body = next(iter(standin.jobs.values()))["body"]
    assert body == {"wait": False, "nodes": ["w-10"], "master": "w-10", "timeout_s": 5.0}


def test_run_refused_prints_the_message(standin, capsys):
    code, _ = run_cli(["--url", standin.url, "run", "--np", "9", "--", "true"])
    assert code == 1
    assert capsys.readouterr().err == "mlbench-daemon: HTTP 409: np=9 but only 2 Running nodes\n"


def test_run_bad_env_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--env", "NOEQUALS", "--", "true"], environ={})
    assert e.value.code == 2
    assert "expected K=V" in capsys.readouterr().err


def test_logs_pages_through_bounded_chunks(standin):
    run_cli(["--url", standin.url, "run", "--", "echo", "0123456789abcdefghij"])
    code, text = run_cli(["--url", standin.url, "logs", "1"])
    assert code == 0 and text == "0123456789abcdefghij\n"
    pages = [q for m, p, q in standin.requests if p == "/api/mpi_jobs/1/logs" and "follow" not in q]
    assert len(pages) == 6  # 21 bytes in chunks of 5, then the empty one


def test_logs_follow(standin):
    job_id = _start(standin, ["sh", "-c", "echo a; sleep 0.5; echo b"])
    code, text = run_cli(["--url", standin.url, "logs", "-f", job_id])
    assert code == 0 and text == "a\nb\n"


def test_jobs_and_cancel(standin):
    job_id = _start(standin, ["sleep", "30"])
    code, text = run_cli(["--url", standin.url, "jobs"])
    assert code == 0
    assert text.splitlines()[0].split() == [
        "ID",
        "STATE",
        "EXIT",
        "MASTER",
        "BY",
        "NAME",
        "COMMAND",
    ]
    assert text.splitlines()[1].split()[:3] == [job_id, "running", "w-10"]
    args = ["jobs", "--state", "running", "--tag", "team:ml", "--tag", "a:b", "--by", "alice"]
    code, _ = run_cli(["--url", standin.url, *args, "--name", "nightly"])
    assert code == 0
    assert standin.requests[-1][1:] == (
        "/api/mpi_jobs/",
        "state=running&tag=team%3Aml&tag=a%3Ab&submitted_by=alice&name=nightly",
    )
    code, text = run_cli(["--url", standin.url, "cancel", job_id])
    assert code == 0 and text == f"job {job_id}: cancelled\n"
    code, _ = run_cli(["--url", standin.url, "cancel", "99"])
    assert code == 1


def test_cancel_still_going_after_the_wait_exits_3_saying_so(standin, monkeypatch, capfd):
    # the real daemon's 202 followed to the end is in test_cancel.py; here one never ends
    monkeypatch.setattr(cli, "CANCEL_WAIT_S", 1.0)
    standin.cancel_stuck = True
    job_id = _start(standin, ["sleep", "30"])
    code, text = run_cli(["--url", standin.url, "cancel", job_id])
    assert (code, text) == (ExitStatus.STILL_CANCELLING, "")
    err = capfd.readouterr().err
    assert f"job {job_id} is still running 1 s after the cancel; the daemon goes on" in err
    gets = [r for r in standin.requests if r[:2] == ("GET", f"/api/mpi_jobs/{job_id}")]
    assert len(gets) >= 1  # it polled


def _start(standin, argv):
    client = Client(standin.url)
    return client.json("POST", "/api/mpi_jobs/", {"program": argv, "wait": False})["id"]


def test_run_ctrl_c_cancels_the_job(standin):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlbench_daemon",
            "--url",
            standin.url,
            "run",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"started\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert b"cancelling job 1" in err
    assert standin.jobs["1"]["state"] == "cancelled"
    assert ("DELETE", "/api/mpi_jobs/1", "") in standin.requests


# --- serve ----------------------------------------------------------------------------


@pytest.mark.parametrize("journal", [False, True])
def test_serve_bad_config_is_one_line_exit_2(tmp_path, journal):
    p = tmp_path / "c.toml"
    p.write_text('[discovery]\nservice = "s"\n[ssh]\nport = "abc"\n')
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLBENCH_DAEMON_") and k not in ("JOURNAL_STREAM", "INVOCATION_ID")
    }
    if journal:  # as systemd runs it: the line is logged with priority 3 (error)
        env["JOURNAL_STREAM"] = "8:1234"
    proc = subprocess.run(
        [sys.executable, "-m", "mlbench_daemon", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"{'<3>' if journal else ''}mlbench-daemon: "
        "ssh.port: must be an integer from 1 to 65535, got 'abc'\n"
    )


# --- logging setup (used by serve) -----------------------------------------------------


def test_log_lines_plain_and_journald():
    for journald, prefix in ((False, None), (True, "<4>mlbench_daemon.test: ")):
        stream = io.StringIO()
        logs.setup("info", journald=journald, stream=stream)
        log = logging.getLogger("mlbench_daemon.test")
        log.debug("hidden")
        log.warning("node %s: two\nlines", "w-1")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        if prefix:
            assert lines[0] == prefix + "node w-1: two\\nlines"
        else:
            assert lines[0].endswith(" WARNING mlbench_daemon.test: node w-1: two\\nlines")
            assert lines[0][:4].isdigit()  # timestamp
        assert logging.getLogger("paramiko").level == logging.WARNING
    logging.getLogger().handlers.clear()


def test_journald_detection():
    assert logs.under_systemd({"INVOCATION_ID": "x"}) and logs.under_systemd(
        {"JOURNAL_STREAM": "8:1"}
    )
    assert not logs.under_systemd({})


def test_metrics_render_uses_own_registry():
    metrics.http_requests_total.labels("/api/nodes/", "GET", "200").inc()
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    assert (
        b'mlbench_daemon_http_requests_total{method="GET",route="/api/nodes/",status="200"}' in body
    )
    from prometheus_client import REGISTRY as GLOBAL

    assert (
        GLOBAL.get_sample_value(
            "mlbench_daemon_http_requests_total",
            {"method": "GET", "route": "/api/nodes/", "status": "200"},
        )
        is None
    )


# --- serve: the whole daemon process -----------------------------------------------------


def _serve_config(tmp_path, dns_port, **server):
    server = {"host": "127.0.0.1", "port": 0, **server}
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    lines += [
        "[discovery]",
        'service = "w.default.svc.cluster.local"',
        f'nameservers = ["127.0.0.1:{dns_port}"]',
        "timeout_s = 0.5",
        "refresh_s = 1",
        "[ssh]",
        f'known_hosts = "{tmp_path}/known_hosts"',
        "connect_timeout_s = 1",
        "[state]",
        f'dir = "{tmp_path}/state"',
    ]
    path = tmp_path / "daemon.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _serve(config_path, **env):
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("MLBENCH_DAEMON_", "NOTIFY_SOCKET", "WATCHDOG_", "INVOCATION_ID", "JOURNAL_STREAM")
        )
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mlbench_daemon", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(environ, **env),
    )


@pytest.mark.parametrize(
    "server, expected",
    [
        (
            {"host": "0.0.0.0"},
            "mlbench-daemon: server.host is '0.0.0.0', not loopback: set server.token_file",
        ),
        (
            {"token_file": "/nonexistent/token"},
            "mlbench-daemon: server.token_file: cannot read /nonexistent/token: ",
        ),
        ({"token_file": "EMPTY"}, "mlbench-daemon: server.token_file: "),
        (
            {"token_file": "OPEN"},
            "mlbench-daemon: server.token_file: TOKEN has mode 0640: others may read",
        ),
    ],
)
def test_serve_refuses_to_start(tmp_path, unused_port, server, expected):
    if server.get("token_file") in ("EMPTY", "OPEN"):
        token = tmp_path / "token"
        token.write_text("\n" if server["token_file"] == "EMPTY" else "s3cret\n")
        token.chmod(0o600 if server["token_file"] == "EMPTY" else 0o640)
        server = {"token_file": str(token)}
        expected = expected.replace("TOKEN", str(token))
    proc = _serve(_serve_config(tmp_path, unused_port, **server))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_serve_notifies_systemd_serves_and_stops_on_sigterm(tmp_path, unused_port):
    import socket
    import urllib.request

    sock_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(sock_path)
        notify.settimeout(30)
        proc = _serve(
            _serve_config(tmp_path, unused_port), NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000"
        )
        try:
            messages = [notify.recv(4096).decode()]
            assert messages[0].startswith("READY=1\nSTATUS="), messages
            url = re.search(r"API on (http://127\.0\.0\.1:\d+)", messages[0]).group(1)
            with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
                assert resp.status == 200
            while "WATCHDOG=1" not in messages[-1]:
                messages.append(notify.recv(4096).decode())
            assert re.search(r"STATUS=\d+/\d+ nodes Running, 0 jobs running", messages[-1])
            proc.send_signal(signal.SIGTERM)
            while messages[-1] != "STOPPING=1":
                messages.append(notify.recv(4096).decode())
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "serving on " + url in err
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=5)


def _read_only_bind(path):
    """A read-only bind mount of `path` over itself (root only); undo with _unmount."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)


def _unmount(path):
    subprocess.run(["umount", "-l", str(path)], check=False)


def _good_state(tmp_path, wal_left):
    """A valid store in tmp_path/state; `wal_left`: as a killed daemon leaves it (-wal, -shm)."""
    code = (
        "import os, sys; from mlbench_daemon.store import Store; s = Store(sys.argv[1]); "
        "s.create(); os._exit(0) if sys.argv[2] == '1' else s.close()"
    )
    state = tmp_path / "state"
    subprocess.run([sys.executable, "-c", code, str(state), str(int(wal_left))], check=True)
    return state


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
@pytest.mark.parametrize(
    "what, expected",
    [
        # a database a killed daemon left (-wal and -shm present): SQLite opens it and only
        # a write fails (the repro, which started as healthy)
        ("db-wal", "cannot write {state}/jobs.sqlite3: attempt to write a readonly database"),
        # a cleanly closed database: SQLite cannot even open it
        ("db-clean", "cannot write {state}: the file system is read-only"),
        # the database is fine, the logs dir is not
        ("logs", "cannot write {state}/logs: Read-only file system"),
    ],
)
def test_serve_refuses_a_read_only_store(tmp_path, unused_port, what, expected):
    state = _good_state(tmp_path, wal_left=what == "db-wal")
    ro = state / "logs" if what == "logs" else state
    _read_only_bind(ro)
    try:
        proc = _serve(_serve_config(tmp_path, unused_port))
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # it started serving: the bug this test catches
            proc.kill()
            _, err = proc.communicate()
    finally:
        _unmount(ro)
    assert proc.returncode == 2, err
    line = "mlbench-daemon: state.dir: " + expected.format(state=state) + " (state-read-only)\n"
    assert err == line, err
    assert sorted(os.listdir(state / "logs")) == []  # no probe file left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_serve_refuses_a_full_store(tmp_path, unused_port):
    state = _good_state(tmp_path, wal_left=False)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{state}/.", str(full)], check=True)
        with open(full / "filler", "wb", buffering=0) as f:  # fill it up
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
        config = _serve_config(tmp_path, unused_port)
        config.write_text(config.read_text().replace(str(state), str(full)))
        proc = _serve(config)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    assert proc.returncode == 2, err
    assert err.startswith(f"mlbench-daemon: state.dir: cannot write {full}"), err
    assert err.count("\n") == 1, err
    assert err.endswith("(state-disk-full)\n"), err


# --- MLBench runs ---------------------------------------------------------------------


def test_run_catalogue_posts_the_form_mlbench_core_posts(standin):
    core = mlbench_core.api_module()
    image = "PyTorch Cifar-10 ResNet-20"
    client = mlbench_core.api_client(standin.url.removeprefix("http://"))
    assert client.create_run("r1", 2, image=image).result(HANG_S).status_code == 201
    entry = core.MLBENCH_IMAGES[image][0]
    assert run_cli(["--url", standin.url, "run", "--catalogue", entry, "-n", "2"])[0] == 0
    code, text = run_cli(
        ["--url", standin.url, "run", "--catalogue", entry, "-n", "2", "--name", "r1"]
    )
    assert code == 0, text
    (core_type, core_form), _, (our_type, our_form) = standin.forms
    assert core_type == our_type == "application/x-www-form-urlencoded"
    assert our_form == core_form
    # without --name: the entry and the time; with --backend as mlbench-core sends it
    name = standin.forms[1][1]["name"]
    assert re.fullmatch(r"pytorch-cifar10-resnet20-all-reduce-\d{8}-\d{6}", name), name
    run_cli(["--url", standin.url, "run", "--catalogue", entry, "-n", "1", "--backend", "GLOO"])
    client.create_run("r1", 1, image=image, backend="GLOO").result(HANG_S)
    *_, (_, ours), (_, theirs) = standin.forms
    assert dict(ours, name="r1") == theirs


def test_runs_table_json_and_delete(standin):
    entry = "mlbench/pytorch-cifar10-resnet20-all-reduce:latest"
    for name in ("first", "second"):
        assert run_cli(["--url", standin.url, "run", "--catalogue", entry, "-n", "2",
                        "--name", name])[0] == 0  # fmt: skip
    code, text = run_cli(["--url", standin.url, "runs"])
    lines = text.splitlines()
    assert code == 0 and lines[0].split() == [
        "ID", "NAME", "STATE", "WORKERS", "CREATED", "FINISHED", "JOB"
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines[1:]] == [["2", "second"], ["1", "first"]]
    code, text = run_cli(["--url", standin.url, "runs", "--json"])
    assert [r["name"] for r in json.loads(text)] == ["first", "second"]
    assert run_cli(["--url", standin.url, "runs", "delete", "1"]) == (0, "run 1: deleted\n")
    assert [r["id"] for r in json.loads(run_cli(["--url", standin.url, "runs", "--json"])[1])] == [
        2
    ]
    code, text = run_cli(["--url", standin.url, "runs", "delete", "1"])
    assert code == ExitStatus.FAILED
    assert run_cli(["--url", standin.url, "runs", "delete"])[0] == ExitStatus.UNUSABLE


def test_run_catalogue_wait_follows_the_output_and_exits_with_the_job_code(standin, capfd):
    code, text = run_cli(["--url", standin.url, "run", "--catalogue", "failing", "-n", "1",
                          "--wait"])  # fmt: skip
    assert (code, text) == (4, "diverged\n")
    err = capfd.readouterr().err
    assert "run 1 (failing-2" in err and "run 1: failed" in err
    entry = "mlbench/pytorch-cifar10-resnet20-all-reduce:latest"
    code, text = run_cli(["--url", standin.url, "run", "--catalogue", entry, "-n", "1", "--wait",
                          "--json"])  # fmt: skip
    assert code == 0 and text.endswith("}\nepoch 1\n")  # run_cli: the text, then the bytes
    assert json.loads(text.removesuffix("epoch 1\n"))["state"] == "finished"
    # a run over before the POST answers: its output all the same
    code, text = run_cli(
        ["--url", standin.url, "run", "--catalogue", "over-at-once", "-n", "1", "--wait"]
    )
    assert (code, text) == (0, "already done\n")
    # what the daemon refuses: its message, exit 1; usage errors: exit 2, nothing posted
    assert run_cli(["--url", standin.url, "run", "--catalogue", "nope", "-n", "1"])[0] == 1
    posted = len(standin.forms)
    for argv in (["--catalogue", entry], ["-n", "2"], ["--wait", "--", "true"],
                 ["--catalogue", entry, "-n", "2", "--np", "2"],
                 ["--catalogue", entry, "-n", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) if "0" in argv else contextlib.nullcontext():
            assert run_cli(["--url", standin.url, "run", *argv])[0] == ExitStatus.UNUSABLE
    assert len(standin.forms) == posted


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_runs_cli_against_the_daemon(start_daemon, cluster, capfd):
    prog = str(cluster.mpi_program)
    daemon = start_daemon(
        mpi={
            "catalogue": {
                "allreduce": prog,
                "exit3": f"{prog} --exit 3",
                "long": f"{prog} --sleep 120",
            }
        }
    )
    url = ["--url", daemon.url]
    code, text = run_cli([*url, "run", "--catalogue", "allreduce", "-n", "2", "--wait"])
    assert code == 0 and "allreduce ok 2" in text, text
    err = capfd.readouterr().err
    assert re.search(r"run 1 \(allreduce-\d{8}-\d{6}\): (initialized|started)", err), err
    assert "run 1: finished" in err
    # a failing run: the job's exit code, and its root cause on stderr
    code, text = run_cli(
        [*url, "run", "--catalogue", "exit3", "-n", "1", "--name", "bad", "--wait"]
    )
    assert code == 3, text
    assert "run 2: failed" in capfd.readouterr().err
    # without --wait: made, and listed; the daemon's refusal is its message, exit 1
    code, text = run_cli([*url, "--json", "run", "--catalogue", "long", "-n", "3", "--name", "x"])
    assert code == 0 and json.loads(text)["state"] in ("initialized", "started")
    code, text = run_cli([*url, "run", "--catalogue", "nope", "-n", "1"])
    assert code == ExitStatus.FAILED and "nope" in capfd.readouterr().err
    code, text = run_cli([*url, "runs"])
    rows = [line.split() for line in text.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows][1:] == [
        ("2", "bad", "failed"),
        ("1", rows[2][1], "finished"),
    ]
    assert rows[0][:3] in (["3", "x", "started"], ["3", "x", "initialized"])
    listed = json.loads(run_cli([*url, "runs", "--json"])[1])
    keys = ("id", "name", "job_id", "num_workers")  # a live run's output may grow meanwhile
    assert [[r[k] for k in keys] for r in listed] == [
        [r[k] for k in keys] for r in daemon.json("GET", "/api/runs/")[1]
    ]
    # delete a live run: its job is cancelled first, then the run is gone
    job_id = daemon.json("GET", "/api/runs/3")[1]["job_id"]
    assert run_cli([*url, "runs", "delete", "3"]) == (0, "run 3: deleted\n")
    assert daemon.request("GET", "/api/runs/3")[0] == 404
    assert daemon.json("GET", f"/api/mpi_jobs/{job_id}")[1]["state"] == "cancelled"
    assert run_cli([*url, "runs", "delete", "3"])[0] == ExitStatus.FAILED
