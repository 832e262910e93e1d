"""The OpenAPI document: a valid OpenAPI 3.1 document, exactly the routes of
api.make_app, and true of a live daemon on the test cluster (schemathesis).
"""

import collections
import json
import re
import sys
import time
import urllib.request
import wsgiref.util

import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from mlbench_daemon import api
from mlbench_daemon.discovery import Selector
from tests.helpers import append_log

DOC = api.DOCUMENT
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations(doc=DOC):
    """{(METHOD, path)} of the document."""
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def schema_objects(node, where="#"):
    """Every Schema Object of the document (component schemas, parameters, media types, headers)."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}/{key}"
            if key == "schema" and isinstance(value, dict):
                yield here, value
            elif where == "#/components/schemas":
                yield here, value
            else:
                yield from schema_objects(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schema_objects(value, f"{where}/{i}")


# --- the document itself ----------------------------------------------------------------


def test_document_is_valid_openapi_31():
    assert DOC["openapi"] == "3.1.0"
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in OPENAPI_31_VALIDATOR.iter_errors(DOC)
    ]
    assert not errors, errors
    # The OAS 3.1 meta-schema leaves Schema Objects to the JSON Schema 2020-12 dialect.
    found = 0
    for where, schema in schema_objects(DOC):
        found += 1
        dialect = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        assert jsonschema_rs.meta.is_valid(dialect), (where, schema)
    assert found > 20


def test_document_passes_openapi_spec_validator():
    """A second, independent validator (refs resolved, operation ids unique, path params
    declared)."""
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(DOC)


def test_refs_resolve_and_operation_ids_unique():
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(DOC)
    schemas = DOC["components"]["schemas"]
    assert refs and all(
        r.startswith("#/components/schemas/") and r.rsplit("/", 1)[1] in schemas for r in refs
    )
    ids = [
        op["operationId"]
        for item in DOC["paths"].values()
        for m, op in item.items()
        if m in METHODS
    ]
    assert len(ids) == len(set(ids))


def test_every_error_response_is_the_error_schema():
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def test_node_and_job_schemas_list_what_the_code_emits():
    from mlbench_daemon.discovery import Node
    from mlbench_daemon.jobs import to_json
    from mlbench_daemon.nodes import NodeStatus
    from mlbench_daemon.shapes import NodeRow
    from mlbench_daemon.store import COLUMNS, STATES, JobRecord

    labels = {"component": "worker", "app": "mlbench"}
    node = Node(
        name="w-0",
        host="w-0.svc.example",
        ip="10.0.0.1",
        port=22,
        namespace="default",
        labels=labels,
    )
    item = NodeStatus(
        node, phase="Running", reason="ok", message="fine", last_probe=time.time(), latency_ms=1.5
    )
    as_json = item.to_json()
    node_schema = DOC["components"]["schemas"]["Node"]
    assert list(as_json)[:4] == ["name", "labels", "phase", "ip"]
    assert set(as_json) == set(node_schema["properties"]) == set(node_schema["required"])
    assert jsonschema_rs.validator_for(_bundle("Node")).is_valid(as_json)
    assert as_json["labels"] == "{'app': 'mlbench', 'component': 'worker'}"

    values = dict.fromkeys(COLUMNS)
    values.update(
        id="0123456789abcdef0123",
        seq=1,
        state="failed",
        created=time.time(),
        finished=time.time(),
        nodes=[NodeRow("10.0.0.1", "default", "w-0", "{}")],
        command=["mpirun", "x"],
        env_names=["A"],
        exit_code=1,
        np=2,
        timeout_s=3.0,
        stalls=[],
        log_bytes=0,
        submitted_by="alice",
        cancelled_by="bob",
        cancelled_at=time.time(),
        name="nightly",
        tags=["team:ml"],
    )
    job = to_json(JobRecord(**values))
    job_schema = DOC["components"]["schemas"]["Job"]
    assert list(job)[:3] == ["nodes", "command", "master_name"]
    assert set(job) == set(job_schema["properties"]) == set(job_schema["required"])
    assert jsonschema_rs.validator_for(_bundle("Job")).is_valid(json.loads(json.dumps(job)))
    assert DOC["components"]["schemas"]["JobState"]["enum"] == list(STATES)


def test_request_schema_names_the_fields_jobs_accepts():
    from mlbench_daemon.jobs import request

    props = DOC["components"]["schemas"]["JobRequest"]["properties"]
    assert set(props) == set(request.FIELDS)


def _bundle(name):
    """Component `name` as a standalone 2020-12 schema (its refs resolved through $defs)."""
    text = json.dumps(DOC["components"]["schemas"]).replace("#/components/schemas/", "#/$defs/")
    defs = json.loads(text)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": defs, **defs[name]}


# The request schema must say exactly what jobs.validate() accepts, or schemathesis'
# positive/negative data checks fail: the selector pattern is checked against the parser.
_SELECTOR_ALPHABET = st.sampled_from([*"ab-_./=!, \t", "app", "x.io/", "==", "!=", "Z9"])


# 3,000 texts, drawn ten to an example: hypothesis' cost is per example, and the check of
# one text is a regex match and a parse (a third of the time of one text per example; a
# failing batch still shrinks to the one text that disagrees).
@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    st.lists(st.lists(_SELECTOR_ALPHABET, max_size=12).map("".join), min_size=10, max_size=10)
)
def test_selector_pattern_agrees_with_the_parser(texts):
    pattern = DOC["components"]["schemas"]["JobRequest"]["properties"]["selector"]["pattern"]
    for text in texts:
        try:
            Selector.parse(text)
            parses = True
        except ValueError:
            parses = False
        assert bool(re.search(pattern, text)) == parses, text


# The request check (jobs.validate) reads its limits from shapes.JobRequest, and the
# document's JobRequest is generated from it: the check accepts exactly the bodies the
# schema accepts.  Values sit on and around every declared limit (a limit changed in the
# declaration moves both; one changed in the check alone fails here).
_TEXTS = [
    "",
    "a",
    "w-1",
    "-x",
    ":",
    ":x",
    "a\0b",
    "\n",
    "A\n",
    "é",
    "k=v",
    "!k",
    "a,b",
    "x.io/k!=v",
]
_ENV_NAME_LIST = [
    "A", "A_1", "_", "MY_VAR", "1A", "", "A\n", "é", "A-B", "OMPI_MCA_mlbench",
    "OMPI_MCA_mlbenchX", "ompi_mca_mlbench", "OMPI_MCA_mlbenc", "PRTE_MCA_mlbench_job_id",
    "MLBENCH_JOB_ID", "x_Mlbench_Job_Id_2", "mlbench_job",
]  # fmt: skip
_WORDS = st.sampled_from(_TEXTS)
_ENV_NAMES = st.sampled_from(_ENV_NAME_LIST)
_NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.integers(999_998, 1_000_002),
    st.integers(999_999_998, 1_000_000_002),
    st.sampled_from([0.0, 0.5, 1.0, 4.0, 1e6, 1e6 + 1, 999_999_999.9, 1e9, -1.0, 1e300]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    _NUMBERS,
    _WORDS,
    st.lists(_WORDS, max_size=3),
    st.dictionaries(_WORDS, st.one_of(_WORDS, _NUMBERS), max_size=2),
)
_REQUEST_FIELDS = {
    "program": st.one_of(st.lists(_WORDS, max_size=3), _ANY),
    "env": st.one_of(st.dictionaries(_ENV_NAMES, _WORDS, max_size=2), _ANY),
    "np": _ANY,
    "selector": _ANY,
    "nodes": st.one_of(st.lists(_WORDS, max_size=3), _ANY),
    "master": _ANY,
    "timeout_s": _ANY,
    "wait": _ANY,
}
_REQUEST_BODIES = st.one_of(  # mostly one field at a time (each limit reached), or several
    st.sampled_from([*_REQUEST_FIELDS, "bogus"]).flatmap(
        lambda k: _REQUEST_FIELDS.get(k, _ANY).map(lambda v: {k: v})
    ),
    st.fixed_dictionaries({}, optional=_REQUEST_FIELDS),
)
_JOB_REQUEST = jsonschema_rs.validator_for(_bundle("JobRequest"))


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(_REQUEST_BODIES)
def test_request_check_accepts_exactly_what_the_declared_schema_accepts(body):
    from mlbench_daemon.errors import BadRequest
    from mlbench_daemon.jobs.request import validate

    try:
        validate(body, ["/bin/prog"])
        accepted = True
    except BadRequest:
        accepted = False
    assert accepted == _JOB_REQUEST.is_valid(body)


_LIMIT_VALUES = [
    None, True, False, -1, 0, 0.0, 0.5, 1, 1.0, 4.0, 999_999, 1_000_000, 1_000_001, 1e6 + 0.5,
    999_999_999, 999_999_999.9, 1_000_000_000, 1e9, 1e300, *_TEXTS, [], {},
]  # fmt: skip
_EACH_FIELD = {
    "program": [[t] for t in _TEXTS] + [["/bin/x", t] for t in _TEXTS] + _LIMIT_VALUES,
    "env": [{n: "v"} for n in _ENV_NAME_LIST]
    + [{"A": t} for t in _TEXTS]
    + [{"A": 1}]
    + _LIMIT_VALUES,
    "np": _LIMIT_VALUES,
    "selector": _LIMIT_VALUES,
    "nodes": [[t] for t in _TEXTS] + [["a", "a"], ["a", "b"]] + _LIMIT_VALUES,
    "master": _LIMIT_VALUES,
    "timeout_s": _LIMIT_VALUES,
    "wait": _LIMIT_VALUES,
    "bogus": [1],
}


def test_request_check_agrees_with_the_declared_schema_on_every_limit():
    """Each field alone, on and around its declared limits: the check and the schema agree."""
    from mlbench_daemon.errors import BadRequest
    from mlbench_daemon.jobs.request import validate

    for field, values in _EACH_FIELD.items():
        for value in values:
            body = {field: value}
            try:
                validate(body, ["/bin/prog"])
                accepted = True
            except BadRequest:
                accepted = False
            assert accepted == _JOB_REQUEST.is_valid(body), body


def test_preflight_request_is_the_job_request_fields_that_choose_where_and_what():
    from mlbench_daemon.jobs import preflight

    schemas = DOC["components"]["schemas"]
    job, pre = schemas["JobRequest"], schemas["PreflightRequest"]
    assert list(pre["properties"]) == list(preflight.FIELDS)
    assert pre["properties"] == {k: job["properties"][k] for k in preflight.FIELDS}
    assert pre["additionalProperties"] is job["additionalProperties"] is False
    body = DOC["paths"]["/api/preflight/"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/PreflightRequest"}


# --- the document against the code --------------------------------------------------------


def app_routes(app):
    """{(METHOD, path)} of a Bottle app, with <name> (or <name:filter>) as {name}."""
    out = set()
    for route in app.routes:
        path = re.sub(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>", r"{\1}", route.rule)
        out.add((route.method.upper(), path))
    return out


def test_every_route_is_documented_and_every_operation_routed():
    app = api.make_app(registry=None, jobs=None)
    routes = app_routes(app)
    documented = {(m, p.rstrip("/") or "/") for m, p in operations()}
    assert routes == documented
    # The seed's two endpoints under both spellings, so both are exercised.
    for method, path in [("GET", "/api/nodes"), ("POST", "/api/mpi_jobs")]:
        assert (method, path) in operations() and (method, path + "/") in operations()
    assert ("GET", "/api/pods/") in operations()


def test_routes_and_paths_come_from_one_table():
    """Every table entry is routed (each spelling, with its entry attached) and documented
    (each spelling, its operationId); the app has no route that is not from the table."""
    from mlbench_daemon.api.plugin import DECLARED

    app = api.make_app(registry=None, jobs=None)
    served = {}
    for route in app.routes:
        declared = route.config.get(DECLARED)
        assert declared in api.ROUTES, f"{route.method} {route.rule} is not from api.ROUTES"
        served[(route.method, route.rule)] = declared
    for entry in api.ROUTES:
        for rule in entry.rules():
            assert served.pop((entry.method, rule)) is entry
        for path, operation_id, _ in entry.documented():
            assert DOC["paths"][path][entry.method.lower()]["operationId"] == operation_id
    assert not served
    assert len(operations()) == sum(len(list(e.documented())) for e in api.ROUTES)


def test_a_route_outside_the_table_is_refused():
    """A handler added with a bare @app.get (so undocumented) fails when called: 500, never
    an answer the document does not describe."""
    app = api.make_app(registry=None, jobs=None)

    @app.get("/api/undocumented")
    def undocumented():
        return "served"

    status, _, body = _wsgi_get(app, "/api/undocumented")
    assert status.startswith("500") and json.loads(body)["error"] == "internal"


def test_the_token_is_asked_where_the_table_says():
    """With a token set, a call without it gets 401 exactly on the routes whose entry says
    Auth.TOKEN or Auth.METRICS, the ones the document gives a 401 answer."""
    from mlbench_daemon.openapi import Auth

    app = api.make_app(registry=None, jobs=None, token="secret")
    for entry in api.ROUTES:
        for rule in entry.rules():
            path = re.sub(r"<run_id:[^>]+>", "12345", rule)  # routed by its pattern
            path = re.sub(r"<[^>]+>", "0123456789abcdef0123", path)
            status = _wsgi_get(app, path, entry.method)[0]
            asks = status.startswith("401")
            assert asks == (entry.auth is not Auth.PUBLIC), (entry.method, rule, status)
            documented = DOC["paths"][entry.path][entry.method.lower()]["responses"]
            assert asks == ("401" in documented), (entry.method, rule)


def _wsgi_get(app, path, method="GET"):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD=method)
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen.update(status=status, headers=dict(headers))

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_served_document_is_this_document():
    app = api.make_app(registry=None, jobs=None)
    for path in ("/api/openapi.json", "/api/openapi.json/"):
        status, headers, body = _wsgi_get(app, path)
        assert status.startswith("200") and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == json.loads(json.dumps(DOC))


# --- regressions schemathesis once found -----------------------------------------------------


def test_np_as_integral_float_is_accepted():
    from mlbench_daemon import jobs

    assert jobs.validate({"np": 4.0}, ["prog"]).np == 4


def test_log_offset_far_past_the_end_reads_nothing(tmp_path):
    from mlbench_daemon.store import Store

    store = Store(str(tmp_path))
    append_log(store, "abc123", b"hello")
    offset = 2**62  # the largest offset api/jobs.py accepts
    assert store.read_log("abc123", offset, 10) == (b"", offset)


class _OneJob:
    """Just enough of jobs.Jobs for the logs route."""

    def get(self, job_id):
        return {"id": job_id}

    def follow_log(self, job_id, offset):
        return iter([b"out"])

    def read_log(self, job_id, offset, limit):
        return b"out", offset + 3


def test_logs_limit_is_checked_when_following():
    app = api.make_app(registry=None, jobs=_OneJob())
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO="/api/mpi_jobs/abc/logs", QUERY_STRING="follow=1&limit=junk")
    statuses = []
    b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses[0].startswith("400")


# --- a live daemon on the test cluster ------------------------------------------------------

SCHEMATHESIS_CONFIG = {
    # A 503 ("no Running node matches the selector") is a documented answer, not a crash.
    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
    "generation": {"max-examples": 12, "allow-x00": True},
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": 60,
    # `tail` and `offset` of the logs exclude each other (400), which OpenAPI cannot say
    # of two query parameters: for that operation a 400 is a valid answer to valid data.
    # So for a run: its image_name must be in the daemon's catalogue (data, not schema),
    # custom_image needs custom_image_command, num_workers cannot pass the nodes known.
    "operations": [
        *(
            {
                "include-operation-id": operation,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": [
                            "2xx",
                            "3xx",
                            "400",
                            "401",
                            "403",
                            "404",
                            "409",
                            "429",
                            "5xx",
                        ]
                    }
                },
            }
            for operation in ("getJobLogs", "createRun", "createRunNoSlash")
        ),
        # MLBench's metrics: exactly one of run_id and pod_name, and a date or `since` the
        # parser takes (ISO 8601 or str(datetime): no pattern says it), are checked in code
        *(
            {
                "include-operation-id": op,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": [
                            "2xx",
                            "400",
                            "401",
                            "403",
                            "404",
                            "413",
                            "429",
                            "5xx",
                        ]
                    }
                },
            }
            for op in ("postMetric", "getMetrics")
        ),
    ],
}

STATS = collections.defaultdict(collections.Counter)  # "METHOD path" -> Counter(status)


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
        return r.status, r.read()


@pytest.fixture
def live_daemon(start_daemon):
    # generated programs fail to exec on the cluster; a real one that lingers is cut short
    daemon = start_daemon(mpi={"default_timeout_s": 10.0, "cancel_grace_s": 1.0, "queue_size": 4})
    try:
        yield daemon
    finally:
        if STATS:
            print("\nschemathesis requests by operation and status:", file=sys.stderr)
            for op, counter in sorted(STATS.items()):
                print(f"  {op}: {dict(sorted(counter.items()))}", file=sys.stderr)


@pytest.fixture
def live_schema(live_daemon):
    # The document as the daemon serves it.  (from_url would leave out the operation that
    # serves the document itself; from_dict with the base URL keeps it.)
    status, body = _get(live_daemon.url + "/api/openapi.json")
    assert status == 200
    cfg = schemathesis.Config.from_dict({**SCHEMATHESIS_CONFIG, "base-url": live_daemon.url})
    schema = schemathesis.openapi.from_dict(json.loads(body), config=cfg)
    assert len(list(schema.get_all_operations())) == len(operations())
    return schema


live = schemathesis.pytest.from_fixture("live_schema")


@pytest.mark.cluster
@pytest.mark.timeout(600)
@live.parametrize()
def test_live_daemon_conforms_to_the_document(case):
    response = case.call_and_validate()
    STATS[f"{case.method} {case.path}"][response.status_code] += 1


def _post(url, body, timeout=60):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:  # loopback only
        return r.status, json.loads(r.read())


@pytest.fixture
def live_job_schema(live_daemon, cluster):
    """The job operations against one real job: a run that sleeps (so the first DELETE
    cancels it and later ones answer 409) and prints (so /logs has bytes to page)."""
    status, job = _post(
        live_daemon.url + "/api/mpi_jobs/",
        {"program": [str(cluster.mpi_program), "--bytes", "5000", "--sleep", "8"], "wait": False},
    )
    assert status == 202 and job["state"] in ("pending", "running"), job
    cfg = schemathesis.Config.from_dict(
        {
            **SCHEMATHESIS_CONFIG,
            "base-url": live_daemon.url,
            "parameters": {"path.job_id": job["id"]},
        }
    )
    status, body = _get(live_daemon.url + "/api/openapi.json")
    return schemathesis.openapi.from_dict(json.loads(body), config=cfg)


live_job = schemathesis.pytest.from_fixture("live_job_schema").include(path_regex=r"\{job_id\}")


@pytest.mark.cluster
@pytest.mark.timeout(300)
@live_job.parametrize()
def test_live_job_operations_conform_to_the_document(case):
    response = case.call_and_validate()
    STATS[f"{case.method} {case.path} (one real job)"][response.status_code] += 1


@pytest.mark.cluster
@pytest.mark.timeout(600)
@live.parametrize()
def test_generated_requests_cannot_get_around_the_browser_checks(case, live_daemon, cluster):
    """Whatever schemathesis generates: a foreign Origin or a rebinding Host gets 403, no job."""
    port = live_daemon.url.rsplit(":", 1)[1]
    for headers in ({"Origin": "http://evil.example"}, {"Host": f"evil.example:{port}"}):
        response = case.call(headers=headers)
        assert response.status_code == 403, (headers, response.text)
        assert response.json()["error"] == "forbidden"
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    assert _get(live_daemon.url + "/api/mpi_jobs/") == (200, b"[]")


# --- the served document, pinned --------------------------------------------------------


@pytest.mark.logic
def test_served_document_is_pinned():
    """The bytes GET /api/openapi.json serves equal the checked-in snapshot: any change to
    a declaration shows up in review as a diff of tests/data/openapi.json.  After a
    deliberate change, regenerate it with
    ``PYTHONPATH=. python3 -m mlbench_daemon.api > tests/data/openapi.json``."""
    from pathlib import Path

    snapshot = Path(__file__).with_name("data") / "openapi.json"
    assert api.render() + "\n" == snapshot.read_text(), (
        "the OpenAPI document changed; if deliberate, regenerate tests/data/openapi.json "
        "(see this test's docstring)"
    )
    assert api.render() == api.render()  # no set or dict order from the run


@pytest.mark.logic
def test_closed_vocabularies_are_the_code_enums():
    from mlbench_daemon import vocabulary
    from mlbench_daemon.jobs import flavour
    from mlbench_daemon.vocabulary import (
        PREFLIGHT_FLAVOURS,
        CheckStatus,
        FlavourName,
        NodeReason,
        SSHReason,
    )

    schemas = DOC["components"]["schemas"]
    job_flavour = schemas["Job"]["properties"]["flavour"]["anyOf"]
    assert job_flavour == [{"$ref": "#/components/schemas/FlavourName"}, {"type": "null"}]
    assert schemas["FlavourName"]["enum"] == list(flavour.NAMES) == list(FlavourName)
    preflight_flavour = schemas["PreflightResult"]["properties"]["flavour"]
    assert preflight_flavour == {"$ref": "#/components/schemas/PreflightFlavour"}
    assert schemas["PreflightFlavour"]["enum"] == list(PREFLIGHT_FLAVOURS)
    node_reason = schemas["Node"]["properties"]["reason"]
    assert node_reason == {"$ref": "#/components/schemas/NodeReasonCode"}
    assert schemas["NodeReasonCode"]["enum"] == [*NodeReason, *SSHReason]
    assert FlavourName.MPICH in PREFLIGHT_FLAVOURS
    assert schemas["Check"]["properties"]["status"] == {"$ref": "#/components/schemas/CheckStatus"}
    assert schemas["CheckStatus"]["enum"] == list(CheckStatus)
    for enum in ("JobState", "Phase", "JobReason", "FailureKind"):  # the web page reads these
        assert schemas[enum]["enum"] == [m.value for m in getattr(vocabulary, enum)]
    names = schemas["JobRequest"]["properties"]["env"]["propertyNames"]
    markers = {m for f in flavour.FLAVOURS.values() for m in f.markers}
    assert markers == {"OMPI_MCA_mlbench_job_id", "PRTE_MCA_mlbench_job_id", "MLBENCH_JOB_ID"}
    for reserved in markers:  # every flavour's marker variables, as the document says
        assert re.search(names["not"]["pattern"], reserved), reserved
    assert not re.search(names["not"]["pattern"], "MY_VAR")
