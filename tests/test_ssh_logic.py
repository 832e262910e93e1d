"""The ssh package's pieces that need no sshd."""

import os
import socket
import subprocess
import sys
import threading

import pytest

from mlbench_daemon.ssh.connection import Watchdog
from mlbench_daemon.ssh.listener import CHECK_BYE
from mlbench_daemon.ssh.watch import loop_argv, parse
from mlbench_daemon.ssh_errors import ListenerDown, Unreachable

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


# --- the probe loop (ssh/watch.py) -----------------------------------------------------


def test_probe_loop_answers_parse_and_a_failed_listener_check_is_listener_down():

    a = parse(b"ok 1 0 ok 0.50 10 100 5 6 7 8", 0.25, "n:22")
    assert (a.seconds, a.listening, a.backlog, a.checked, a.load1) == (0.25, 1, 0, True, 0.5)
    assert (a.cpu_busy, a.cpu_total, a.mem_available_kb, a.net_tx_bytes) == (10, 100, 5, 8)
    assert not parse(b"ok 1 0 - 0.50 10 100 5 6 7 8", 0.25, "n:22").checked
    for word, reason in (("refused", "connection-refused"), ("nobanner", "no-banner")):
        with pytest.raises(ListenerDown) as e:
            parse(f"ok 0 0 {word} 0.5 1 2 3 4 5 6".encode(), 0.1, "n:22")
        assert e.value.reason == reason and "made from the node" in str(e.value)
    for bad in (b"ok 1 0 - x 1 2 3 4 5 6", b"Traceback (most recent call last):", b""):
        with pytest.raises(Unreachable) as e:
            parse(bad, 0.1, "n:22")
        assert type(e.value) is Unreachable and e.value.reason == "ssh-error"


def test_probe_loop_script_sees_its_listener_socket_and_checks_it_when_odd():
    """The remote loop, run here against a loopback listener standing in for sshd: a
    listener check when asked; none on a plain round while the socket is there; one at
    once when the socket is gone (refused) or holds a connection nobody accepted."""

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    env = {**os.environ, "SSH_CONNECTION": f"127.0.0.1 5000 127.0.0.1 {port}"}
    loop = subprocess.Popen(
        [sys.executable, *loop_argv(1)[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )

    def ask(line):
        loop.stdin.write(line)
        loop.stdin.flush()
        return loop.stdout.readline().split()

    def serve_one():
        c, _ = srv.accept()
        with c:
            c.sendall(b"SSH-2.0-standin\r\n")
            got = b""
            while len(got) < len(CHECK_BYE) and (data := c.recv(4096)):
                got += data
            return got

    try:
        got = []
        t = threading.Thread(target=lambda: got.append(serve_one()))
        t.start()
        w = ask(b"l 2\n")
        t.join(5)
        assert w[:4] == [b"ok", b"1", b"0", b"ok"] and got == [CHECK_BYE]
        assert ask(b"p 2\n")[:4] == [b"ok", b"1", b"0", b"-"]  # nothing odd: no connect
        hung = socket.create_connection(("127.0.0.1", port))  # queued, never accepted
        w = ask(b"p 0.5\n")
        assert w[0] == b"ok" and int(w[2]) >= 1 and w[3] == b"nobanner", w
        hung.close()
        srv.close()
        assert ask(b"p 2\n")[:4] == [b"ok", b"0", b"0", b"refused"]
    finally:
        srv.close()
        loop.stdin.close()
        loop.wait(5)
