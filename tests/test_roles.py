"""Roles against every endpoint, who did what, and the audit log of it (issue 24 items 1-3),
through the real app (plugin, routes, Jobs) over the local job stand-in: every route of the
table with every role, a role that must not write actually trying, the owner check of a
cancel, the filters, and the audit line of each write and refusal."""

import json
import re
import wsgiref.util

import pytest

from mlbench_daemon import api, metrics, tokens
from mlbench_daemon.audit import AuditLog
from mlbench_daemon.openapi import Auth
from mlbench_daemon.tokens import Tokens
from mlbench_daemon.vocabulary import Role
from tests.helpers import wsgi
from tests.localjobs import LocalJobs, sh

pytestmark = [pytest.mark.logic, pytest.mark.timeout(120)]

SLEEP = sh("sleep 60")


class Api:
    """The app with named tokens and an audit log, over LocalJobs."""

    def __init__(self, tmp_path):
        (tmp_path / "jobs").mkdir()
        # the roll-call route is checked for its role only: kernel wchan, no stack tool to wait on
        self.lj = LocalJobs(tmp_path / "jobs", max_concurrent_jobs=8, roll_call_tools=[]).start()
        self.tokens_path = str(tmp_path / "tokens.json")
        self.token = {
            "viewer": tokens.add(self.tokens_path, "vera", Role.VIEWER),
            "submitter": tokens.add(self.tokens_path, "alice", Role.SUBMITTER),
            "other": tokens.add(self.tokens_path, "bob", Role.SUBMITTER),
            "admin": tokens.add(self.tokens_path, "root", Role.ADMIN),
        }
        self.audit_path = str(tmp_path / "audit.log")
        self.audit = AuditLog(self.audit_path)
        self.app = api.make_app(
            self.lj.registry, self.lj.jobs, tokens=Tokens(self.tokens_path), audit=self.audit
        )

    def call(self, method, path, who=None, body=None, remote="10.9.8.7"):
        raw = b"" if body is None else json.dumps(body).encode()
        environ = {"REMOTE_ADDR": remote}
        if who:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {self.token.get(who, who)}"
        status, _, out = wsgi(
            self.app, method, path, raw, "application/json" if raw else "", **environ
        )
        return status, out

    def json(self, *args, **kw):
        status, out = self.call(*args, **kw)
        return status, json.loads(out)

    def submit(self, who, **fields):
        status, job = self.json(
            "POST", "/api/mpi_jobs/", who, {"program": SLEEP, "wait": False, **fields}
        )
        assert status == 202, job
        return job

    def audit_lines(self):
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    def close(self):
        self.audit.close()
        self.lj.close()


@pytest.fixture
def app(tmp_path):
    a = Api(tmp_path)
    # the jobs' time runs on: a cancelled job's follower waits its backoff on that clock
    # before it reads the end (else every cancel here answers 202 after cancel_answer_s)
    with a.lj.clock.ticking(0.5):
        yield a
    a.close()


def path_of(route, job_id):
    path = re.sub(r"\{job_id\}", job_id, route.path).replace("{name}", "style.css")
    return path.replace("{run_id}", "1")  # routed only when it is a run id (digits)


def test_every_role_against_every_endpoint(app):
    """Each route of the table, called with each role (and none): a role below the route's
    is refused 403 and nothing changes; the others get past the check; no token is 401.
    The viewer really tries each write: a valid job body, a DELETE of a running job."""
    own = app.submit("submitter")["id"]
    anothers = app.submit("other")["id"]
    app.lj.wait_state(own, "running")
    for route in api.ROUTES:
        for who in ("viewer", "submitter", "admin", None):
            if route.method == "DELETE" and who in ("submitter", "admin"):
                continue  # they cancel below (a cancelled job cannot be tried again)
            body = {"program": SLEEP, "wait": False} if route.method == "POST" else None
            status, out = app.call(route.method, path_of(route, own), who, body)
            needed = route.role if route.auth is Auth.TOKEN else Role.VIEWER
            if route.auth is Auth.PUBLIC:
                assert status not in (401, 403), (route.path, who, status, out)
            elif who is None:
                assert status == 401, (route.method, route.path, status)
            elif not Role(who).allows(needed):
                assert status == 403 and json.loads(out)["error"] == "role", (route.path, who)
            else:
                assert status not in (401, 403), (route.method, route.path, who, status, out)
            if route.method == "POST" and route.path == "/api/mpi_jobs/" and status == 202:
                app.lj.jobs.cancel(json.loads(out)["id"])
    assert app.lj.state(own) == "running"  # the viewer's DELETE changed nothing
    submitted = [j for j in app.lj.jobs.list() if j["id"] not in (own, anothers)]
    assert sorted(j["submitted_by"] for j in submitted) == ["alice", "root"]  # not the viewer
    status, job = app.json("DELETE", f"/api/mpi_jobs/{own}", "submitter")
    assert status in (200, 202) and job["cancelled_by"] == "alice" and job["cancelled_at"]
    status, job = app.json("DELETE", f"/api/mpi_jobs/{anothers}", "admin")  # anyone's
    assert status in (200, 202) and job["cancelled_by"] == "root"
    refused = [x for x in app.audit_lines() if x["outcome"] == "role"]
    assert {(x["token"], x["method"]) for x in refused} == {("vera", "POST"), ("vera", "DELETE")}


def test_a_submitter_cannot_cancel_anothers_job_and_the_audit_says_both_names(app):
    before = metrics.refused_requests_total.labels("not-owner")._value.get()
    job = app.submit("submitter", name="train", tags=["team:ml"])
    app.lj.wait_state(job["id"], "running")
    status, answer = app.json("DELETE", f"/api/mpi_jobs/{job['id']}", "other", remote="10.1.1.1")
    assert status == 403 and answer["error"] == "not-owner"
    assert "'alice'" in answer["message"] and "'bob'" in answer["message"]
    assert app.lj.state(job["id"]) == "running"
    assert app.lj.jobs.get(job["id"])["cancelled_by"] is None
    assert metrics.refused_requests_total.labels("not-owner")._value.get() == before + 1
    line = app.audit_lines()[-1]
    assert line == {
        "time": line["time"],
        "token": "bob",
        "role": "submitter",
        "source": "10.1.1.1",
        "method": "DELETE",
        "path": "/api/mpi_jobs/<job_id>",
        "job": job["id"],
        "outcome": "not-owner",
        "status": 403,
        "owner": "alice",
    }
    status, done = app.json("DELETE", f"/api/mpi_jobs/{job['id']}", "submitter")
    assert status in (200, 202) and done["cancelled_by"] == "alice"
    assert app.audit_lines()[-1]["outcome"] == "ok"


def test_audit_lines_never_hold_a_token_or_a_path_as_sent(app):
    job = app.submit("admin")
    app.call("GET", f"/api/mpi_jobs/{job['id']}?secret=1", "nonsense.token")
    app.call("DELETE", f"/api/mpi_jobs/{job['id']}", None)
    app.call("POST", "/api/mpi_jobs/", "viewer", {"wait": False})
    app.call("DELETE", f"/api/mpi_jobs/{job['id']}", "admin")
    text = open(app.audit_path).read()
    for token in app.token.values():
        assert token not in text and token.partition(".")[2] not in text
    assert "nonsense" not in text and "secret=1" not in text
    outcomes = [(x["method"], x["outcome"], x["status"]) for x in app.audit_lines()]
    assert outcomes == [
        ("POST", "ok", 202),
        ("GET", "bad-token", 401),
        ("DELETE", "no-token", 401),
        ("POST", "role", 403),
        ("DELETE", "ok", outcomes[-1][2]),
    ]
    assert all(x["path"] in ("/api/mpi_jobs", "/api/mpi_jobs/<job_id>") for x in app.audit_lines())


def test_reads_are_not_audited_but_bad_requests_are(app):
    app.call("GET", "/api/nodes/", "viewer")
    app.call("GET", "/api/mpi_jobs/", "viewer")
    status, _ = app.call("POST", "/api/mpi_jobs/", "submitter", {"tags": ["nocolon"]})
    assert status == 400
    (line,) = app.audit_lines()
    assert (line["token"], line["outcome"], line["status"]) == ("alice", "bad-request", 400)


def test_whoami_says_who_and_what_it_may_do(app):
    expect = {
        "viewer": ("vera", "viewer", False, "none"),
        "submitter": ("alice", "submitter", True, "own"),
        "admin": ("root", "admin", True, "all"),
    }
    for who, (name, role, submit, cancel) in expect.items():
        status, me = app.json("GET", "/api/whoami", who)
        assert status == 200
        assert (me["name"], me["role"], me["can_submit"], me["can_cancel"]) == (
            name,
            role,
            submit,
            cancel,
        )
        assert me["auth"] is True


def test_without_tokens_nothing_changes_and_nobody_is_named(tmp_path):
    (tmp_path / "jobs").mkdir()
    lj = LocalJobs(tmp_path / "jobs").start()
    try:
        app = api.make_app(lj.registry, lj.jobs)
        environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ.update(PATH_INFO="/api/whoami")
        seen = {}
        me = json.loads(b"".join(app(environ, lambda s, h, e=None: seen.update(status=s))))
        assert seen["status"].startswith("200")
        assert me == {"name": None, "role": "admin", "auth": False, "can_submit": True,
                      "can_cancel": "all"}  # fmt: skip
        job = lj.jobs.submit({"program": sh("true"), "wait": False})
        assert job["submitted_by"] is None and job["tags"] == [] and job["name"] is None
    finally:
        lj.close()


def test_list_filters_by_state_tag_submitter_and_name(app):
    a = app.submit("submitter", name="train", tags=["team:ml", "size:xl"])
    b = app.submit("other", name="eval", tags=["team:ml"])
    c = app.submit("admin", tags=["team:infra"])
    app.lj.wait_state(a["id"], "running")
    app.lj.wait_state(b["id"], "running")
    app.lj.jobs.cancel(c["id"])
    app.lj.run_clock_until_final(c["id"], 0.5)

    def ids(query):
        status, jobs = app.json("GET", f"/api/mpi_jobs/?{query}", "viewer")
        assert status == 200, jobs
        return [j["id"] for j in jobs]

    assert ids("tag=team:ml") == [b["id"], a["id"]]
    assert ids("tag=team:ml&tag=size:xl") == [a["id"]]
    assert ids("submitted_by=bob") == [b["id"]]
    assert ids("name=train") == [a["id"]]
    assert ids("state=cancelled") == [c["id"]]
    assert ids("state=running&state=pending") == [b["id"], a["id"]]
    assert ids("state=&tag=&name=") == [c["id"], b["id"], a["id"]]
    for query, field in (("state=dancing", "state"), ("tag=nocolon", "tag")):
        status, err = app.json("GET", f"/api/mpi_jobs/?{query}", "viewer")
        assert (status, err["field"]) == (400, field)
    for job in (a, b):
        app.lj.jobs.cancel(job["id"])
