import os
import socket

import pytest

from mlbench_daemon import sdnotify


def receive(sock):
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert sdnotify.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": path}) is True
        assert receive(sock) == "READY=1\nSTATUS=ok"


def test_abstract_socket():
    name = f"mlbench-daemon-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sdnotify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert receive(sock) == "WATCHDOG=1"


def test_unset_is_a_noop():
    assert sdnotify.notify("READY=1", {}) is False


def test_missing_socket_raises(tmp_path):
    with pytest.raises(OSError):
        sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})


def test_relative_address_is_refused():
    with pytest.raises(OSError):
        sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative"})


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert sdnotify.watchdog_interval(env) == expected
