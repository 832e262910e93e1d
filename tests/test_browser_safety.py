"""Browser safety: no page of another site can use the API (Host, Origin, body type).

The rules are in mlbench_daemon/browser.py. The pure checks are tested here
directly; then the real daemon on the test cluster is sent the requests an
attacker's page can make, and each refusal must leave no job and no process.
"""

import http.client
import json
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlbench_daemon.browser import (
    DEFAULT_PORTS,
    Policy,
    body_type_ok,
    is_json,
    normalise_origin,
    split_host,
)


class _Server:
    """The [server] settings Policy.from_config reads."""

    def __init__(self, host="127.0.0.1", allowed_hosts=(), allowed_origins=(), public=False):
        self.host = host
        self.allowed_hosts = list(allowed_hosts)
        self.allowed_origins = list(allowed_origins)
        self.public_metrics = public


# ---- the pure checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expect",
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("LocalHost", ("localhost", None)),
        ("[::1]:8080", ("::1", 8080)),
        ("[0:0::1]", ("::1", None)),
        ("head.example.:443", ("head.example", 443)),
        ("::1", None),  # IPv6 without brackets is no Host
        ("a:b", None),
        ("host:0", None),
        ("host:65536", None),
        ("user@host", None),
        ("", None),
        ("[zz::1]:80", None),
    ],
)
def test_split_host(text, expect):
    assert split_host(text) == expect


@pytest.mark.parametrize(
    "text, expect",
    [
        ("http://127.0.0.1:8080", ("http", "127.0.0.1", 8080)),
        ("https://Dash.Example", ("https", "dash.example", 443)),
        ("http://dash.example:80/", ("http", "dash.example", 80)),
        ("null", None),
        ("file://", None),
        ("http://dash.example/path", None),
        ("http://user@dash.example", None),
        ("http://dash.example:99999", None),
        ("ftp://dash.example", None),
    ],
)
def test_normalise_origin(text, expect):
    assert normalise_origin(text) == expect


def test_json_content_type():
    assert is_json("application/json")
    assert is_json("Application/JSON; charset=utf-8")
    for other in (
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "",
    ):
        assert not is_json(other)


def test_form_bodies_only_where_a_route_takes_them():
    forms = ("application/x-www-form-urlencoded", "Multipart/Form-Data; boundary=x")
    for ctype in forms:
        assert body_type_ok(ctype, form_allowed=True)
        assert not body_type_ok(ctype, form_allowed=False)
    for ctype in ("text/plain", "application/x-www-form-urlencodedx", ""):
        assert not body_type_ok(ctype, form_allowed=True)
    assert body_type_ok("application/json; charset=utf-8", form_allowed=False)


def test_a_form_route_documents_its_form_body():
    from mlbench_daemon.openapi import Route, ref

    def handler(deps):
        return ""

    args = ("POST", "/api/x/", handler, "x", "x", "jobs", {})
    plain = Route(*args, body=ref("JobRequest")).operation("x", "x")
    form = Route(*args, body=ref("JobRequest"), form=True).operation("x", "x")
    assert set(plain["requestBody"]["content"]) == {"application/json"}
    assert set(form["requestBody"]["content"]) == {
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    }


@pytest.mark.parametrize(
    "bind, host, port, ok",
    [
        ("127.0.0.1", "127.0.0.1:8080", 8080, True),
        ("127.0.0.1", "localhost:9000", 8080, True),  # an SSH tunnel's local port
        ("127.0.0.1", "[::1]:8080", 8080, True),
        ("127.0.0.1", "evil.example:8080", 8080, False),  # DNS rebinding
        ("127.0.0.1", "127.0.0.2:8080", 8080, False),
        ("127.0.0.1", None, 8080, False),
        ("10.1.2.3", "10.1.2.3:8080", 8080, True),
        ("10.1.2.3", "10.1.2.3:8081", 8080, False),
        ("10.1.2.3", "10.1.2.3", 80, True),
        ("10.1.2.3", "localhost:8080", 8080, False),  # not a loopback bind
        ("0.0.0.0", "10.9.9.9:8080", 8080, True),  # all interfaces: any address
        ("0.0.0.0", "evil.example:8080", 8080, False),
    ],
)
def test_host_is_one_of_our_names(bind, host, port, ok):
    assert Policy.from_config(_Server(bind)).host_allowed(host, port) is ok


def test_allowed_hosts_with_and_without_port():
    policy = Policy.from_config(_Server("10.1.2.3", allowed_hosts=["dash.example", "b.example:81"]))
    assert policy.host_allowed("dash.example", 8080)
    assert policy.host_allowed("DASH.example:443", 8080)
    assert policy.host_allowed("b.example:81", 8080)
    assert not policy.host_allowed("b.example:82", 8080)
    assert not policy.host_allowed("c.example", 8080)


@pytest.mark.parametrize(
    "origin, host, ok",
    [
        (None, "127.0.0.1:8080", True),  # not a cross-site browser request
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://dash.example", "dash.example", True),  # behind a TLS proxy
        ("http://localhost:9000", "localhost:9000", True),
        ("http://evil.example", "127.0.0.1:8080", False),
        ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
        ("null", "127.0.0.1:8080", False),
        ("https://allowed.example", "127.0.0.1:8080", True),
        ("https://allowed.example:8443", "127.0.0.1:8080", False),
    ],
)
def test_origin_is_ours_or_listed(origin, host, ok):
    policy = Policy.from_config(_Server(allowed_origins=["https://allowed.example"]))
    assert policy.origin_allowed(origin, host) is ok


@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=40)))
def test_checks_never_raise_and_a_foreign_origin_never_passes(host, origin):
    policy = Policy.from_config(_Server())
    assert policy.host_allowed(host, 8080) in (True, False)
    if policy.origin_allowed(origin, host) and origin is not None:
        scheme, name, port = normalise_origin(origin)
        host_name, host_port = split_host(host)
        assert name == host_name and port == (host_port or DEFAULT_PORTS[scheme])


# ---- the real daemon on the test cluster ---------------------------------------------------

JOB = {"wait": False}


def _no_trace_of_a_job(daemon, cluster):
    """No job record, and no mpirun or program of the cluster user on any host."""
    status, jobs = daemon.json("GET", "/api/mpi_jobs/")
    assert status == 200 and jobs == []
    program = str(cluster.mpi_program)
    left = [c for _, c in cluster.user_processes() if "mpirun" in c or program in c]
    assert left == []


def _refused(daemon, method, path, status, error, body=None, headers=None):
    got, h, raw = daemon.request(method, path, body=body, headers=headers)
    assert got == status, raw
    assert h["content-type"] == "application/json"
    assert json.loads(raw)["error"] == error
    assert not [k for k in h if k.startswith("access-control-")]
    return json.loads(raw)["message"]


@pytest.mark.cluster
def test_a_cross_site_simple_request_cannot_launch(daemon, cluster):
    body = json.dumps({"program": [str(cluster.mpi_program)], "wait": False}).encode()
    for ctype in (
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ):
        headers = {"Content-Type": ctype} if ctype else {"Content-Type": ""}
        msg = _refused(
            daemon, "POST", "/api/mpi_jobs/", 415, "unsupported-media-type", body, headers
        )
        assert "application/json" in msg
    # chunked, with no Content-Length: waitress de-chunks, the check still holds
    u = urllib.parse.urlsplit(daemon.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(
            "POST", "/api/mpi_jobs/", body=iter([body]), headers={"Content-Type": "text/plain"}
        )  # http.client sends it chunked
        r = conn.getresponse()
        assert (r.status, json.loads(r.read())["error"]) == (415, "unsupported-media-type")
    finally:
        conn.close()
    _no_trace_of_a_job(daemon, cluster)


@pytest.mark.cluster
def test_a_foreign_origin_is_refused_with_or_without_a_token(start_daemon, cluster, tmp_path):
    evil = {"Origin": "http://evil.example"}
    d = start_daemon()
    for method, path, body in [
        ("POST", "/api/mpi_jobs/", JOB),
        ("GET", "/api/nodes/", None),
        ("DELETE", "/api/mpi_jobs/x", None),
        ("GET", "/metrics", None),
    ]:
        msg = _refused(d, method, path, 403, "forbidden", body, dict(evil))
        assert "'http://evil.example'" in msg and "allowed_origins" in msg
    _refused(d, "POST", "/api/mpi_jobs/", 403, "forbidden", JOB, {"Origin": "null"})
    _no_trace_of_a_job(d, cluster)

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    t = start_daemon(server={"token_file": str(token)})
    _refused(t, "POST", "/api/mpi_jobs/", 403, "forbidden", JOB, dict(evil))  # token sent
    _refused(t, "POST", "/api/mpi_jobs/", 403, "forbidden", JOB, {**evil, "Authorization": ""})
    _no_trace_of_a_job(t, cluster)


@pytest.mark.cluster
def test_a_rebinding_host_is_refused(daemon, cluster):
    port = daemon.url.rsplit(":", 1)[1]
    for method, path, body in [
        ("POST", "/api/mpi_jobs/", JOB),
        ("GET", "/api/nodes/", None),
        ("GET", "/healthz", None),
        ("GET", "/nothing", None),
    ]:
        msg = _refused(
            daemon, method, path, 403, "forbidden", body, {"Host": f"evil.example:{port}"}
        )
        assert "allowed_hosts" in msg
    # the same name as a same-origin page after rebinding would send both
    _refused(
        daemon,
        "POST",
        "/api/mpi_jobs/",
        403,
        "forbidden",
        JOB,
        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
    )
    _no_trace_of_a_job(daemon, cluster)


@pytest.mark.cluster
def test_the_seed_empty_form_post_from_the_same_origin_still_runs(daemon, cluster):
    # jQuery's $.post(url) from the dashboard page served by this daemon
    status, h, raw = daemon.request(
        "POST",
        "/api/mpi_jobs/",
        headers={
            "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8",
            "Content-Length": "0",
            "Origin": daemon.url,
            "X-Requested-With": "XMLHttpRequest",
        },
    )
    job = json.loads(raw)
    assert status == 200 and job["state"] == "succeeded" and "allreduce ok 3" in job["response"]
    assert not [k for k in h if k.startswith("access-control-")]


@pytest.mark.cluster
def test_allowed_hosts_and_origins_let_named_ones_in(start_daemon, cluster):
    d = start_daemon(
        server={"allowed_hosts": ["dash.example"], "allowed_origins": ["https://dash.example"]}
    )
    named = {"Host": "dash.example", "Origin": "https://dash.example"}
    status, h, raw = d.request("GET", "/api/nodes/", headers=dict(named))
    assert status == 200 and len(json.loads(raw)) == len(cluster.workers)
    assert not [k for k in h if k.startswith("access-control-")]
    status, job = d.json("POST", "/api/mpi_jobs/", JOB, headers=dict(named))
    assert status == 202
    assert d.wait_job(job["id"])["state"] == "succeeded"
    # another origin is still refused on the allowed host
    _refused(
        d,
        "GET",
        "/api/nodes/",
        403,
        "forbidden",
        headers={"Host": "dash.example", "Origin": "https://other.example"},
    )


@pytest.mark.cluster
def test_metrics_needs_the_token_unless_public(start_daemon, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    d = start_daemon(server={"token_file": str(token)})
    assert d.request("GET", "/metrics", headers={"Authorization": ""})[0] == 401
    status, _, raw = d.request("GET", "/metrics")
    assert status == 200 and b"mlbench_daemon_nodes" in raw
    status, _, raw = d.request("GET", "/healthz", headers={"Authorization": ""})
    assert status == 200 and set(json.loads(raw)) == {  # counts and ages only
        "status",
        "nodes",
        "running",
        "discovery_stale",
        "discovery_age_s",
    }
    p = start_daemon(server={"token_file": str(token), "public_metrics": True})
    assert p.request("GET", "/metrics", headers={"Authorization": ""})[0] == 200
    assert p.request("GET", "/api/nodes/", headers={"Authorization": ""})[0] == 401
