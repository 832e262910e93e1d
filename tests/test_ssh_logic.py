"""The ssh package's pieces that need no sshd."""

import threading

import pytest

from mlbench_daemon.ssh.connection import Watchdog

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

    with Watchdog(0, close) as dog:
        assert done.wait(10)
        dog._timer.join(10)
    assert dog.fired and not escaped


def test_paramikos_transport_records_show_only_at_debug_level():
    import io
    import logging

    from mlbench_daemon import logs

    transport, root = logging.getLogger("paramiko.transport"), logging.getLogger()
    before = transport.level, root.level, list(root.handlers)
    try:
        logs.setup("debug", stream=io.StringIO(), journald=False)
        assert transport.isEnabledFor(logging.WARNING)
        logs.setup("info", stream=io.StringIO(), journald=False)
        assert not transport.isEnabledFor(logging.ERROR)
    finally:
        transport.setLevel(before[0])
        root.setLevel(before[1])
        root.handlers[:] = before[2]
