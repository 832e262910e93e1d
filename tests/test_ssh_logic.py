"""ssh.py's pieces that need no sshd."""

import threading

import pytest

from mlbench_daemon import ssh

pytestmark = pytest.mark.logic


def test_a_watchdog_whose_action_fails_leaves_no_thread_exception(monkeypatch):
    """The action closes a channel; over a transport that died meanwhile paramiko
    raises EOFError there, in the timer's thread, where nobody would catch it."""
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    done = threading.Event()

    def close():
        done.set()
        raise EOFError

    with ssh._Watchdog(0, close) as dog:
        assert done.wait(10)
        dog._timer.join(10)
    assert dog.fired and not escaped
