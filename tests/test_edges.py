"""Hostile input and one line per event (issue 19 items 4 and 7), without the cluster."""

import io
import logging
import sys
import threading
import wsgiref.util

import pytest

from mlbench_daemon import api, errors, logs

pytestmark = pytest.mark.logic


def _wsgi(app, method, path, body=b""):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(
        PATH_INFO=path,
        REQUEST_METHOD=method,
        CONTENT_TYPE="application/json",
        CONTENT_LENGTH=str(len(body)),
        **{"wsgi.input": io.BytesIO(body)},
    )
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen.update(status=status)

    raw = b"".join(app(environ, start_response))
    return int(seen["status"].split()[0]), raw


def test_json_depth():
    assert api.json_depth(b"[[1], {}]") <= api.MAX_JSON_DEPTH
    assert api.json_depth(b"[" * 100_000) == 100_000
    deep = b"[" * 40 + b"]" * 40
    assert api.json_depth(deep) == 40
    # brackets inside strings, escaped quotes included, are not nesting
    assert api.json_depth(b'{"a": "' + b'[\\"' * 50 + b'"}') <= api.MAX_JSON_DEPTH


@pytest.mark.parametrize("path", ["/api/mpi_jobs/", "/api/preflight/"])
@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b'{"a":' * 33 + b"1" + b"}" * 33], ids=["100k-brackets", "33-objects"]
)
def test_deep_json_is_400_naming_the_body(path, body):
    class Preflight:  # never reached: the body is refused first
        def run(self, body):
            raise AssertionError(body)

    app = api.make_app(registry=None, jobs=None, preflight=Preflight())
    status, raw = _wsgi(app, "POST", path, body)
    assert status == 400, raw
    assert b'"field": "body"' in raw and b"nested deeper than 32 levels" in raw


def test_echoed_input_is_cut():
    assert errors.echo("x" * 10) == "'xxxxxxxxxx'"
    long = errors.echo("x" * 10_000)
    assert long.startswith("'xxx") and len(long) < 150 and "9902 more characters" in long
    app = api.make_app(registry=None, jobs=None)
    status, raw = _wsgi(app, "GET", "/api/" + "y" * 10_000)
    assert status == 404 and len(raw) < 300, raw


@pytest.fixture
def logged():
    """logs.setup(level) into a string; hooks and handlers restored afterwards."""
    root = logging.getLogger()
    saved = root.level, list(root.handlers), threading.excepthook, sys.excepthook
    stream = io.StringIO()
    yield lambda level: logs.setup(level, journald=False, stream=stream) and stream
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    threading.excepthook, sys.excepthook = saved[2], saved[3]


def _die():
    raise ValueError("boom")


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_dying_thread_is_one_line(logged, level):
    stream = logged(level)
    t = threading.Thread(target=_die, name="doomed")
    t.start()
    t.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "thread doomed died: ValueError('boom')" in lines[0]
    assert ("Traceback" in lines[0]) == (level == "debug")


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_failing_route_is_one_line(logged, level):
    stream = logged(level)
    app = logs.errors_to_log(api.make_app(registry=None, jobs=None))  # no registry: 500
    status, raw = _wsgi(app, "GET", "/api/nodes/")
    assert status == 500 and b"Traceback" not in raw
    lines = stream.getvalue().splitlines()
    errors_ = [ln for ln in lines if " ERROR " in ln]
    assert len(errors_) == 1 and "internal error on GET /api/nodes" in errors_[0]
    assert ("Traceback" in stream.getvalue()) == (level == "debug")
    assert len(lines) == (2 if level == "debug" else 1)  # bottle's traceback: debug only
