"""Run capabilities (capability.py, the API plugin's capability path) and HTTP Basic with
the token as the password (tokens.py): no server, the WSGI app called directly.

The metrics route belongs to another part of the daemon; here a small real route stands in
for it (`POST /api/metrics/` that records the scope it was given), registered through the
same route table machinery, so the plugin treats it like any route."""

import base64
import io
import json
import re
import wsgiref.util

import pytest

from mlbench_daemon import api, capability, metrics, tokens
from mlbench_daemon.api.common import Deps, as_json, caller
from mlbench_daemon.api.plugin import register
from mlbench_daemon.audit import AuditLog
from mlbench_daemon.capability import Capabilities
from mlbench_daemon.openapi import Route, answer, ref
from mlbench_daemon.tokens import Tokens
from mlbench_daemon.vocabulary import Refusal, Role


def test_mint_check_revoke():
    caps = Capabilities()
    a, b = caps.mint(1), caps.mint(2)
    assert a != b and len(a) == 43 and re.fullmatch(r"[A-Za-z0-9_-]+", a)  # 256 bits, urlsafe
    assert (caps.check(a), caps.check(b)) == (1, 2)
    assert caps.check(a[:-1] + ("A" if a[-1] != "A" else "B")) is None
    assert caps.check("") is None and caps.check(a + "x") is None and caps.check("../" * 14) is None
    again = caps.mint(1)  # a run minted again: the old secret is dead
    assert caps.check(a) is None and caps.check(again) == 1
    assert caps.revoke(1) and not caps.revoke(1)
    assert caps.check(again) is None and caps.check(b) == 2 and caps.live() == 1


class App:
    """make_app with capabilities, tokens, an audit log and the stand-in metrics route."""

    def __init__(self, tmp_path, token="s3cret-admin-token"):
        self.token = token
        self.caps = Capabilities()
        self.audit_path = tmp_path / "audit.log"
        self.audit = AuditLog(str(self.audit_path))
        self.app = api.make_app(
            None, None, tokens=Tokens(legacy=token), audit=self.audit, caps=self.caps
        )
        self.posted = []

        def post_metric(deps: Deps) -> str:
            self.posted.append((bottle_scope(), caller()))
            return as_json({"ok": True})

        standin = Route(
            "POST",
            "/api/metrics/",
            post_metric,
            "postMetricStandIn",
            "stand-in",
            "meta",
            {201: answer("posted", ref("Error"))},
            role=Role.SUBMITTER,
        )
        register(self.app, [standin], Deps(None, None, None, 1 << 20, None, "", True))

    def call(self, method, path, body=None, headers=None):
        environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        raw = b"" if body is None else json.dumps(body).encode()
        environ.update(
            PATH_INFO=path,
            REQUEST_URI=path,
            REQUEST_METHOD=method,
            REMOTE_ADDR="127.0.0.1",
            CONTENT_LENGTH=str(len(raw)),
            CONTENT_TYPE="application/json" if raw else "",
            **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()},
        )
        environ["wsgi.input"] = io.BytesIO(raw)
        seen = {}
        out = b"".join(self.app(environ, lambda s, h, e=None: seen.update(status=s)))
        return int(seen["status"][:3]), json.loads(out)


def bottle_scope():
    import bottle

    return bottle.request.environ.get(capability.SCOPE)


@pytest.fixture
def app(tmp_path):
    a = App(tmp_path)
    yield a
    a.audit.close()


def refused(reason):
    return metrics.refused_requests_total.labels(reason)._value.get()


def test_capability_posts_its_run_without_a_token(app):
    secret = app.caps.mint(7)
    accepted = metrics.capability_requests_total._value.get()
    status, body = app.call("POST", f"/run-cap/{secret}/api/metrics/", {"run_id": 7})
    assert (status, body) == (200, {"ok": True})
    scope, who = app.posted[-1]
    assert scope == 7 and who.name is None and who.role is Role.VIEWER
    assert metrics.capability_requests_total._value.get() == accepted + 1
    # the ordinary path still needs the token: the capability opened only itself
    assert app.call("POST", "/api/metrics/", {"run_id": 7})[0] == 401
    auth = {"Authorization": f"Bearer {app.token}"}
    assert app.call("POST", "/api/metrics/", {"run_id": 7}, auth)[0] == 200
    assert app.posted[-1][0] is None  # no scope without a capability


@pytest.mark.parametrize(
    "method, rest",
    [
        ("GET", "/api/metrics/"),
        ("GET", "/api/nodes/"),
        ("GET", "/api/mpi_jobs/"),
        ("POST", "/api/mpi_jobs/"),
        ("GET", "/api/whoami"),
        ("GET", "/metrics"),
        ("GET", "/"),
        ("DELETE", "/api/metrics/"),
        ("POST", "/api/metrics/../mpi_jobs"),
        ("POST", ""),
    ],
)
def test_capability_reaches_nothing_else(app, method, rest):
    secret = app.caps.mint(3)
    before = refused(Refusal.CAPABILITY)
    status, body = app.call(
        method, f"/run-cap/{secret}{rest}", {"x": 1} if method == "POST" else None
    )
    assert status == 403 and body["error"] == "forbidden", body
    assert "POST /api/metrics/" in body["message"] and secret not in json.dumps(body)
    assert app.posted == []
    assert refused(Refusal.CAPABILITY) == before + 1


def test_unknown_or_revoked_capability_is_404_and_never_echoed(app):
    secret = app.caps.mint(4)
    app.caps.revoke(4)
    for s in (secret, "x" * 43, "short"):
        status, body = app.call("POST", f"/run-cap/{s}/api/metrics/", {"run_id": 4})
        assert status == 404 and body["error"] == "not-found", body
        assert "ended" in body["message"] and s not in body["message"]
    assert app.posted == []


def test_no_secret_in_the_audit_log(app):
    secret = app.caps.mint(5)
    app.call("POST", f"/run-cap/{secret}/api/metrics/", {"run_id": 5})
    app.call("GET", f"/run-cap/{secret}/api/nodes")
    dead = app.caps.mint(6)
    app.caps.revoke(6)
    app.call("POST", f"/run-cap/{dead}/api/metrics/", {"run_id": 6})
    app.audit.flush()
    text = app.audit_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert secret not in text and dead not in text and "run-cap" not in text
    assert [(x["path"], x["status"], x.get("run_capability")) for x in lines] == [
        ("/api/metrics", 200, 5),
        ("/api/nodes", 403, 5),
        ("/api/metrics", 404, None),  # the route it would reach; no run: none was valid
    ]


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_takes_the_token_as_password(app):
    ok = app.call("GET", "/api/whoami", headers={"Authorization": basic("anyone", app.token)})
    assert ok == (200, {**ok[1], "name": "admin", "role": "admin"})
    for header in (
        basic("admin", "wrong"),
        basic(app.token, ""),  # the token as the user name is not the password
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(app.token.encode()).decode(),  # no colon
    ):
        status, body = app.call("GET", "/api/whoami", headers={"Authorization": header})
        assert status == 401, (header, body)


def test_basic_password_parsing():
    assert tokens.basic_password(base64.b64encode(b"u:p:q").decode()) == "p:q"
    assert tokens.basic_password(base64.b64encode(b":tok").decode()) == "tok"
    assert tokens.basic_password(base64.b64encode(b"\xff:x").decode()) == ""
    assert tokens.basic_password("=") == ""
