"""A head with 1,000 nodes holds a socket per node: past 1,024 open files the API must
still answer (waitress on poll(), not select()) and the daemon raises its soft limit."""

import http.client
import os
import resource
import threading

import pytest

from mlbench_daemon import server


@pytest.fixture
def fd_limit():
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_the_soft_limit_is_raised_towards_the_hard_one(fd_limit):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, want), hard))
    assert server.raise_fd_limit(want) == want
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (want, hard)
    assert server.raise_fd_limit(16) == want  # never lowered


def test_the_api_answers_past_1024_open_files(fd_limit):
    if server.raise_fd_limit(4096) < 1200:
        pytest.skip("the hard limit of open files is below 1,200 here")

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    held = []
    try:
        while not held or held[-1] < 1100:  # the nodes' sockets, below the client's
            held.append(os.open(os.devnull, os.O_RDONLY))
        srv = server.http_server(app, "127.0.0.1", 0, 2)
        loop = threading.Thread(target=srv.run, daemon=True)
        loop.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", srv.effective_port, timeout=10)
            conn.request("GET", "/")
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, b"ok")
            conn.close()
            assert loop.is_alive()
        finally:
            srv.close()
    finally:
        for fd in held:
            os.close(fd)
