"""The metrics (metricstore.py, api/metrics.py, jobs/sampler.py) without a cluster: a real
MetricStore in a temporary dir, the real app called through WSGI, and a small RunLookup
backed by a dict (the runs branch's Runs satisfies the same protocol)."""

import dataclasses
import io
import json
import sqlite3
import urllib.parse
import zipfile

import pytest

from mlbench_daemon import api
from mlbench_daemon.jobs.sampler import NodeSampler, Seen, sample_points
from mlbench_daemon.metricstore import (
    CapReached,
    MetricStore,
    Point,
    Query,
    format_date,
    parse_date,
)
from mlbench_daemon.shapes import MetricRequest
from tests.helpers import check_answer, wsgi

DOC = json.loads(api.render())


@dataclasses.dataclass(frozen=True)
class Run:
    id: int
    name: str
    nodes: tuple[str, ...]
    created_at: float = 1_700_000_000.0
    finished_at: float | None = None
    state: str = "started"


class DictRuns:
    """A RunLookup over a dict of runs (live: those without finished_at)."""

    def __init__(self, *runs):
        self.runs = {r.id: r for r in runs}

    def get_run(self, run_id):
        return self.runs.get(run_id)

    def by_pod(self, pod_name):
        held = [r for r in self.runs.values() if pod_name in r.nodes]
        live = [r for r in held if r.finished_at is None]
        return (live or held or [None])[-1]

    def live(self):
        return [r for r in self.runs.values() if r.finished_at is None]


@pytest.fixture
def store(tmp_path):
    s = MetricStore(str(tmp_path / "metrics.sqlite"), max_points_per_series=50)
    yield s
    s.close()


def call(app, method, path, body=None, form=False, environ=None):
    """-> (status, headers, raw); every answer checked against the document."""
    if form:
        raw = urllib.parse.urlencode(body).encode()
        ctype = "application/x-www-form-urlencoded"
    else:
        raw = b"" if body is None else json.dumps(body).encode()
        ctype = "application/json"
    status, headers, out = wsgi(app, method, path, raw, ctype, **(environ or {}))
    check_answer(DOC, method, path.partition("?")[0], status, headers.get("content-type"), out)
    return status, headers, out


def app_with(store, runs):
    return api.make_app(registry=None, jobs=None, metric_store=store, run_lookup=runs)


def test_dates_as_mlbench_core_sends_them():
    # str(datetime) (a space, no zone), with and without microseconds; ISO with Z; an offset
    assert parse_date("2026-12-05 09:00:01.250000") == "2026-12-05T09:00:01.250000Z"
    assert parse_date("2026-12-05 09:00:01") == "2026-12-05T09:00:01.000000Z"
    assert parse_date("2026-12-05T09:00:01.5Z") == "2026-12-05T09:00:01.500000Z"
    assert parse_date("2026-12-05T10:00:01+01:00") == "2026-12-05T09:00:01.000000Z"
    assert format_date(0.25) == "1970-01-01T00:00:00.250000Z"
    for bad in ("", "yesterday", "2026-13-01 00:00:00", "x" * 100):
        with pytest.raises(ValueError):
            parse_date(bad)


def test_post_form_and_json_then_read(store):
    app = app_with(store, DictRuns(Run(3, "bench", ("n1", "n2"))))
    form = {
        "run_id": "3",
        "name": "val_global_loss @ 0",
        "cumulative": "False",
        "date": "2026-12-05 09:00:01.250000",
        "value": "0.5",
        "metadata": "",
    }
    status, _, raw = call(app, "POST", "/api/metrics/", form, form=True)
    assert status == 201, raw
    assert json.loads(raw) == {
        "name": "val_global_loss @ 0",
        "value": "0.5",
        "date": "2026-12-05T09:00:01.250000Z",
        "metadata": "",
        "cumulative": False,
    }
    body = {"pod_name": "n2", "name": "x", "value": 2, "cumulative": True, "metadata": {"a": 1}}
    status, _, raw = call(app, "POST", "/api/metrics", body)
    assert status == 201 and json.loads(raw)["value"] == "2" and json.loads(raw)["cumulative"]
    status, _, raw = call(app, "GET", "/api/metrics/3?metric_type=run")
    assert json.loads(raw) == {
        "val_global_loss @ 0": [
            {"date": "2026-12-05T09:00:01.250000Z", "value": "0.5", "cumulative": False}
        ]
    }
    status, _, raw = call(app, "GET", "/api/metrics/n2")  # metric_type pod: MLBench's default
    assert list(json.loads(raw)) == ["x"]
    status, _, raw = call(app, "GET", "/api/metrics/")
    everything = json.loads(raw)
    assert list(everything["run_metrics"]) == ["bench"] and list(everything["pod_metrics"]) == [
        "n2"
    ]


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"run_id": "9", "name": "a", "value": "1"}, 404, None),
        ({"pod_name": "nowhere", "name": "a", "value": "1"}, 404, None),
        ({"name": "a", "value": "1"}, 400, None),
        ({"run_id": 3, "pod_name": "n1", "name": "a", "value": "1"}, 400, None),
        ({"run_id": 3, "name": "", "value": "1"}, 400, "name"),
        ({"run_id": 3, "name": "a"}, 400, "value"),
        ({"run_id": 3, "name": "a", "value": "1", "date": "soon"}, 400, "date"),
        ({"run_id": 3, "name": "a", "value": "1", "cumulative": "maybe"}, 400, "cumulative"),
        ({"run_id": "three", "name": "a", "value": "1"}, 400, "run_id"),
        ({"run_id": 3, "name": "a", "value": "1", "colour": "red"}, 400, "colour"),
    ],
)
def test_post_refusals_store_nothing(store, body, status, field):
    app = app_with(store, DictRuns(Run(3, "bench", ("n1",))))
    got, _, raw = call(app, "POST", "/api/metrics/", body)
    assert got == status, raw
    assert json.loads(raw).get("field") == field
    assert store.run_ids() == []


def test_request_declaration_names_the_posted_fields():
    from mlbench_daemon.api.metrics import FIELDS

    assert set(FIELDS) == set(MetricRequest.__struct_fields__)


def test_capability_posts_only_its_run(store):
    app = app_with(store, DictRuns(Run(3, "a", ("n1",)), Run(4, "b", ("n2",))))
    scope = {"mlbench.run_scope": 3}
    ok = call(app, "POST", "/api/metrics/", {"run_id": 3, "name": "a", "value": 1}, environ=scope)
    assert ok[0] == 201
    for body in (
        {"run_id": 4, "name": "a", "value": 1},
        {"pod_name": "n2", "name": "a", "value": 1},
    ):
        status, _, raw = call(app, "POST", "/api/metrics/", body, environ=scope)
        assert status == 403 and b"run 3 only" in raw
    assert store.run_ids() == [3]


def test_caps_name_the_setting(tmp_path):
    s = MetricStore(str(tmp_path / "m.sqlite"), max_points_per_series=2, max_points_per_run=3)
    try:
        app = app_with(s, DictRuns(Run(1, "r", ("n1",))))
        for i in range(2):
            assert (
                call(app, "POST", "/api/metrics/", {"run_id": 1, "name": "a", "value": i})[0] == 201
            )
        status, _, raw = call(app, "POST", "/api/metrics/", {"run_id": 1, "name": "a", "value": 9})
        assert status == 413 and b"metrics.max_points_per_series" in raw
        assert call(app, "POST", "/api/metrics/", {"run_id": 1, "name": "b", "value": 1})[0] == 201
        status, _, raw = call(app, "POST", "/api/metrics/", {"run_id": 1, "name": "c", "value": 1})
        assert status == 413 and b"metrics.max_points_per_run" in raw
        # the daemon's own samples count in their series only
        s.add(Point(1, "cpu", "1", format_date(1), pod="n1", posted=False))
        assert [len(v) for v in s.run_series(1).values()] == [2, 1]
    finally:
        s.close()
    again = MetricStore(str(tmp_path / "m.sqlite"), max_points_per_series=2)  # counts reloaded
    try:
        with pytest.raises(CapReached):
            again.add(Point(1, "a", "3", format_date(3)))
    finally:
        again.close()


def fill(store, run_id, n, name="loss"):
    for i in range(n):
        store.add(Point(run_id, name, str(i), format_date(1000 + i)))


def test_summarize_averages_groups_as_mlbench_and_keeps_the_tail(store):
    fill(store, 1, 10)
    got = store.run_series(1, Query(summarize=4))["loss"]
    # factor ceil(10/4) = 3: (0,1,2) (3,4,5) (6,7,8) and the tail (9) MLBench dropped
    assert [p["value"] for p in got] == ["1.0", "4.0", "7.0", "9.0"]
    assert got[0]["date"] == format_date(1000) and got[1]["date"] == format_date(1003)
    assert store.run_series(1, Query(summarize=10))["loss"][3]["value"] == "3"  # not over
    assert [p["value"] for p in store.run_series(1, Query(last_n=2))["loss"]] == ["8", "9"]
    since = store.run_series(1, Query(since=format_date(1007)))["loss"]
    assert [p["value"] for p in since] == ["7", "8", "9"]


def test_text_values_pass_through_summarize(store):
    for i in range(4):
        store.add(Point(1, "TaskResult @ 0", f"done {i}", format_date(i)))
    got = store.run_series(1, Query(summarize=2))["TaskResult @ 0"]
    assert [p["value"] for p in got] == ["done 0", "done 2"]


def test_get_filters_through_the_api(store):
    app = app_with(store, DictRuns(Run(1, "r", ("n1",))))
    fill(store, 1, 10)
    fill(store, 1, 3, name="acc")
    q = "?metric_type=run&metric_filter=loss&last_n=1&summarize=5&since=1970-01-01 00:16:42"
    status, _, raw = call(app, "GET", "/api/metrics/1" + q)
    assert status == 200 and json.loads(raw) == {
        "loss": [{"date": format_date(1008), "value": "8.5", "cumulative": False}]
    }
    for bad in ("metric_type=job", "summarize=x", "since=later", "format=csv"):
        status, _, raw = call(app, "GET", "/api/metrics/1?metric_type=run&" + bad)
        assert status == 400, (bad, raw)
    assert call(app, "GET", "/api/metrics/2?metric_type=run")[0] == 404
    assert call(app, "GET", "/api/metrics/nobody")[0] == 404


def test_zip_has_mlbench_layout(store):
    run = Run(1, "my run", ("n1", "n2"), created_at=1000.0, finished_at=1100.0)
    app = app_with(store, DictRuns(run))
    fill(store, 1, 3)
    store.add(Point(1, "TaskResult @ 0", "the official result", format_date(1050)))
    store.add(Point(1, "cpu", "0.5", format_date(1010), pod="n1", posted=False))
    store.add(Point(1, "cpu", "0.7", format_date(2000), pod="n1", posted=False))  # after the end
    store.add(Point(1, "net/../x", "1", format_date(1010), pod="n2"))
    status, headers, raw = call(app, "GET", "/api/metrics/1?metric_type=run&format=zip")
    assert status == 200 and headers["content-type"] == "application/zip"
    assert "metrics_my_run.zip" in headers["content-disposition"]
    zf = zipfile.ZipFile(io.BytesIO(raw))
    assert sorted(zf.namelist()) == [
        "n1_cpu.json",
        "n2_net_.._x.json",
        "official_result.txt",
        "result_loss.json",
    ]
    assert zf.read("official_result.txt") == b"the official result"
    assert [p["value"] for p in json.loads(zf.read("n1_cpu.json"))] == ["0.5"]
    assert len(json.loads(zf.read("result_loss.json"))) == 3


def test_delete_run_prunes_its_points_and_caps(tmp_path):
    s = MetricStore(str(tmp_path / "m.sqlite"), max_points_per_series=3)
    try:
        fill(s, 1, 3)
        fill(s, 2, 1)
        s.add(Point(1, "cpu", "1", format_date(1), pod="n1", posted=False))
        assert s.delete_run(1) == 4
        assert s.run_ids() == [2] and not s.has_pod("n1")
        fill(s, 1, 3)  # the run's caps are free again
    finally:
        s.close()


def test_a_store_fault_refuses_at_once_and_heals(tmp_path, monkeypatch):
    s = MetricStore(str(tmp_path / "m.sqlite"))
    app = app_with(s, DictRuns(Run(1, "r", ("n1",))))
    try:
        real = s._insert

        def full(rows):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(s, "_insert", full)
        s.add(Point(1, "a", "1", format_date(1)))
        assert not s.flush(timeout=0.5)  # kept, not lost
        status, _, raw = call(app, "POST", "/api/metrics/", {"run_id": 1, "name": "a", "value": 2})
        assert status == 507 and json.loads(raw)["error"] == "state-disk-full"
        monkeypatch.setattr(s, "_insert", real)
        assert s.flush(timeout=5)
        assert s.fault is None and len(s.run_series(1)["a"]) == 1
    finally:
        s.close()


@dataclasses.dataclass
class Answer:
    cpu_busy: int
    mem_available_kb: int
    mem_total_kb: int
    net_rx_bytes: int
    net_tx_bytes: int


def test_sample_points_from_counters():
    first = sample_points(1, "n1", None, 100.0, Answer(1000, 3 << 20, 4 << 20, 5 << 20, 1 << 20))
    assert {p.name: p.value for p in first} == {
        "memory": "1024.0",
        "network_in": "0.0",
        "network_out": "0.0",
    }
    seen = Seen(5 << 20, 1 << 20, 1000, 100.0)
    later = sample_points(1, "n1", seen, 105.0, Answer(1750, 3 << 20, 4 << 20, 7 << 20, 1 << 20))
    values = {p.name: p.value for p in later}
    assert values["cpu"] == "1.5"  # 750 jiffies in 5 s: 1.5 cores
    assert values["network_in"] == "2.0" and values["network_out"] == "0.0"
    assert all(p.pod == "n1" and not p.posted for p in later)
    assert [p.cumulative for p in later] == [False, False, True, True]


class Table:
    def __init__(self, names):
        self.rows = [
            type("S", (), {"node": type("N", (), {"name": n, "ip": f"10.0.0.{i}", "port": 22})})
            for i, n in enumerate(names)
        ]

    def nodes(self):
        return self.rows


class Counters:
    """What the pool holds of each node's probe loop: the newest answer and its time."""

    def __init__(self):
        self.now = {}

    def counters(self, ip, port):
        return self.now.get(ip)


def test_sampler_stores_live_runs_nodes_only_on_new_answers(store):
    runs = DictRuns(Run(1, "r", ("a", "b")), Run(2, "old", ("c",), finished_at=5.0))
    pool = Counters()
    sampler = NodeSampler(5.0, runs, Table(["a", "b", "c"]), pool, store)
    pool.now["10.0.0.0"] = (100.0, Answer(0, 1024, 2048, 0, 0))
    pool.now["10.0.0.2"] = (100.0, Answer(0, 1024, 2048, 0, 0))  # c: its run has ended
    assert sampler.sample(now=101.0) == 3  # b has no answer yet; a: no cpu on the first
    assert sampler.sample(now=102.0) == 0  # the same answer: nothing new
    pool.now["10.0.0.0"] = (105.0, Answer(500, 1024, 2048, 1 << 20, 0))
    assert sampler.sample(now=200.0) == 0  # stale: older than 3 intervals
    assert sampler.sample(now=106.0) == 4
    got = store.pod_series("a")
    assert [p["value"] for p in got["cpu"]] == ["1.0"]
    assert [p["value"] for p in got["network_in"]] == ["0.0", "1.0"]
    assert not store.has_pod("c")


OLD_LAYOUT = """
CREATE TABLE run_points (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, name TEXT NOT NULL,
    date TEXT NOT NULL, value TEXT NOT NULL, num REAL, cumulative INTEGER NOT NULL,
    metadata TEXT NOT NULL);
CREATE TABLE pod_points (id INTEGER PRIMARY KEY, pod TEXT NOT NULL, run_id INTEGER NOT NULL,
    name TEXT NOT NULL, date TEXT NOT NULL, value TEXT NOT NULL, num REAL,
    cumulative INTEGER NOT NULL, metadata TEXT NOT NULL, posted INTEGER NOT NULL);
INSERT INTO run_points VALUES (1, 1, 'loss', '1970-01-01T00:00:05.000000Z', '2', 2, 0, '');
INSERT INTO run_points VALUES (2, 1, 'loss', '1970-01-01T00:00:05.000000Z', '1', 1, 0, '');
INSERT INTO pod_points VALUES (1, 'n1', 1, 'cpu', '1970-01-01T00:00:01.000000Z', '0.5', 0.5, 0,
    '', 0);
INSERT INTO pod_points VALUES (2, 'n1', 1, 'x', '1970-01-01T00:00:01.000000Z', '7', 7, 0, '', 1);
"""


def test_a_file_in_the_two_table_layout_opens_with_its_points_and_caps(tmp_path):
    path = str(tmp_path / "m.sqlite")
    db = sqlite3.connect(path)
    db.executescript(OLD_LAYOUT)
    db.close()
    s = MetricStore(path, max_points_per_series=3, max_points_per_run=4)
    try:  # ties keep their arrival order; the posted pod point counts in the run's cap
        assert [p["value"] for p in s.run_series(1)["loss"]] == ["2", "1"]
        assert s.pod_series("n1") == {
            "cpu": [{"date": format_date(1), "value": "0.5", "cumulative": False}],
            "x": [{"date": format_date(1), "value": "7", "cumulative": False}],
        }
        s.add(Point(1, "loss", "3", format_date(6)))
        with pytest.raises(CapReached, match="max_points_per_run"):
            s.add(Point(1, "acc", "3", format_date(6)))
    finally:
        s.close()
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")
    assert [t[0] for t in tables] == ["points"]


def test_summarize_groups_ties_and_text_in_arrival_order(store):
    for v in ["a", "b", "4", "6", "x"]:  # one date for all: arrival decides
        store.add(Point(1, "m", v, format_date(7)))
    got = store.run_series(1, Query(summarize=3))["m"]  # factor 2: (a b) (4 6) (x)
    assert [p["value"] for p in got] == ["a", "5.0", "x"]
    got = store.run_series(1, Query(summarize=2, since=format_date(7)))["m"]  # 3: (a b 4) (6 x)
    assert [p["value"] for p in got] == ["4.0", "6.0"]
