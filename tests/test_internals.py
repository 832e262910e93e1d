"""The private internals of paramiko and waitress the daemon relies on, one test each.

The paramiko ones are every use in mlbench_daemon/ssh/internals.py, one-to-one (checked
by test_every_paramiko_internal_has_its_test).

pyproject.toml bounds both packages; when an upgrade inside the bounds removes or
changes one of these, its test fails naming the internal and the code that uses it.
No network: paramiko's objects are built on a socket pair, waitress binds loopback.
"""

import inspect
import re
import socket

import paramiko
import pytest
import waitress
from paramiko.buffered_pipe import BufferedPipe
from waitress import wasyncore

from mlbench_daemon.ssh import internals

pytestmark = pytest.mark.logic


def need(obj, attr, used_by):
    assert hasattr(obj, attr), (
        f"{type(obj).__name__}.{attr} is gone from this version; {used_by} relies on it"
    )
    return getattr(obj, attr)


@pytest.fixture
def transport():
    a, b = socket.socketpair()
    t = paramiko.Transport(a)
    yield t
    t.close()
    a.close()
    b.close()


# --- paramiko ---------------------------------------------------------------------------


def test_paramiko_packetizer_rekey_limits(transport):
    """internals.tune sets Packetizer.REKEY_BYTES/REKEY_PACKETS to never start a rekey itself."""
    packetizer = need(transport, "packetizer", "internals.tune (Transport.packetizer)")
    for name in ("REKEY_BYTES", "REKEY_PACKETS"):
        assert isinstance(need(packetizer, name, f"internals.tune (Packetizer.{name})"), int)
    internals.tune(transport)
    assert packetizer.REKEY_BYTES == packetizer.REKEY_PACKETS == 2**62


def test_paramiko_channel_in_buffer_is_replaceable_by_chunkpipe():
    """internals.open_session replaces Channel.in_buffer (a BufferedPipe) with internals.ChunkPipe,
    which must offer every method the channel calls on it."""
    chan = paramiko.Channel(0)
    assert isinstance(
        need(chan, "in_buffer", "internals.open_session (Channel.in_buffer)"), BufferedPipe
    )
    wanted = {
        n for n, _ in inspect.getmembers(BufferedPipe, inspect.isfunction) if not n.startswith("_")
    }
    missing = {n for n in wanted | {"__len__"} if not hasattr(internals.ChunkPipe, n)}
    assert not missing, f"BufferedPipe has methods internals.ChunkPipe lacks: {sorted(missing)}"


def test_paramiko_pipe_timeout():
    """internals.ChunkPipe.read raises paramiko.buffered_pipe.PipeTimeout, as the channel
    expects."""
    pipe = internals.ChunkPipe()
    with pytest.raises(paramiko.buffered_pipe.PipeTimeout):
        pipe.read(10, timeout=0.01)
    stock = BufferedPipe()
    with pytest.raises(paramiko.buffered_pipe.PipeTimeout):
        stock.read(10, timeout=0.01)


def test_paramiko_channel_status_event():
    """internals.exit_status waits on Channel.status_event (an Event set with the exit status)."""
    chan = paramiko.Channel(0)
    event = need(chan, "status_event", "internals.exit_status (Channel.status_event)")
    assert hasattr(event, "wait") and hasattr(event, "is_set")


def test_paramiko_transport_polls_on_its_socket_timeout(transport):
    """internals.slow_transport_poll raises the socket's timeout to TRANSPORT_POLL_S after the
    login: paramiko's transport thread sets it to Transport._active_check_timeout (0.1 s) and
    only checks for close and keepalives on each timeout, so a longer one only slows those."""
    need(paramiko.Transport, "_active_check_timeout", "internals.slow_transport_poll")
    assert transport.sock.gettimeout() == paramiko.Transport._active_check_timeout
    source = inspect.getsource(paramiko.packet.Packetizer.read_all)
    assert "socket.timeout" in source and "_check_keepalive" in source, (
        "Packetizer.read_all no longer treats a socket timeout as an idle tick; "
        "internals.TRANSPORT_POLL_S relies on it"
    )
    internals.slow_transport_poll(transport.sock)
    assert transport.sock.gettimeout() == internals.TRANSPORT_POLL_S


def test_paramiko_open_failure_codes():
    """internals.open_failure tells refused forwarding from a failed connect by the
    open-failure codes."""
    for name in ("OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED", "OPEN_FAILED_CONNECT_FAILED"):
        need(paramiko.common, name, "internals.open_failure")
    for code, why in (
        (paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, "prohibited"),
        (paramiko.common.OPEN_FAILED_CONNECT_FAILED, "connect-failed"),
        (paramiko.common.OPEN_FAILED_RESOURCE_SHORTAGE, "other"),
    ):
        assert internals.open_failure(paramiko.ChannelException(code, "x")) == why


def test_paramiko_global_request_reply(transport, monkeypatch):
    """internals.global_request sends a GLOBAL_REQUEST wanting a reply through
    Transport._send_user_message and waits on its own Transport.completion_event, which
    paramiko's reply handlers set (after Transport.global_response: the reply, or None)."""
    need(transport, "_send_user_message", "internals.global_request")
    sent = []

    def send(m):
        sent.append(paramiko.Message(m.asbytes()))
        reply[0](transport, paramiko.Message())  # the transport thread's handler

    monkeypatch.setattr(transport, "_send_user_message", send)
    reply = [need(paramiko.Transport, "_parse_request_success", "internals.global_request")]
    got = internals.global_request(transport, "tcpip-forward", 5.0, ("127.0.0.1", 18080))
    assert isinstance(got, paramiko.Message)  # the reply itself: a forward of port 0 reads it
    m = sent[-1]
    assert (m.get_byte(), m.get_text(), m.get_boolean(), m.get_text(), m.get_int()) == (
        paramiko.common.cMSG_GLOBAL_REQUEST,
        "tcpip-forward",
        True,
        "127.0.0.1",
        18080,
    )
    reply = [need(paramiko.Transport, "_parse_request_failure", "internals.global_request")]
    assert internals.global_request(transport, "keepalive@openssh.com", 5.0) is False
    m = sent[-1]
    assert (m.get_byte(), m.get_text(), m.get_boolean()) == (
        paramiko.common.cMSG_GLOBAL_REQUEST,
        "keepalive@openssh.com",
        True,
    )
    reply = [lambda t, m: None]  # no reply: None after the timeout, not a wait forever
    assert internals.global_request(transport, "keepalive@openssh.com", 0.05) is None


def test_paramiko_forward_handler(transport, monkeypatch):
    """internals.forward_handler sets Transport._tcp_handler, which paramiko's channel-open
    parser calls with (channel, origin, server) for a forwarded-tcpip open, after it has
    accepted the channel; without one it refuses the open."""
    need(transport, "_tcp_handler", "internals.forward_handler")
    monkeypatch.setattr(transport, "_send_message", lambda m: None)
    got = []
    internals.forward_handler(transport, lambda *a: got.append(a))
    m = paramiko.Message()
    for field in ("forwarded-tcpip", 7, 2**20, 2**15, "127.0.0.1", 18080, "127.0.0.1", 40000):
        (m.add_int if isinstance(field, int) else m.add_string)(field)
    m.rewind()
    need(paramiko.Transport, "_parse_channel_open", "internals.forward_handler")(transport, m)
    assert len(got) == 1
    chan, origin, server = got[0]
    assert isinstance(chan, paramiko.Channel)
    assert (origin, server) == (("127.0.0.1", 40000), ("127.0.0.1", 18080))
    internals.forward_handler(transport, None)
    assert transport._tcp_handler is None


def test_every_paramiko_internal_has_its_test():
    """Each function and class of ssh/internals.py is named by a test here, and each name
    a test gives is one of them: the module and this file match one-to-one."""
    defined = {
        name
        for name, obj in vars(internals).items()
        if not name.startswith("_")
        and callable(obj)
        and getattr(obj, "__module__", None) == internals.__name__
    }
    named: set[str] = set()
    for name, fn in globals().items():
        if name.startswith("test_paramiko_"):
            named |= set(re.findall(r"internals\.([a-z_]+|[A-Z][A-Za-z]+)\b", fn.__doc__ or ""))
    assert defined == named


# --- waitress ---------------------------------------------------------------------------


@pytest.fixture
def server():
    http = waitress.create_server(lambda env, start: [], host="127.0.0.1", port=0, threads=1)
    yield http
    wasyncore.close_all(http._map)
    http.task_dispatcher.shutdown(timeout=1.0)


def test_waitress_server_map(server):
    """server.Daemon._drain closes every socket of the loop with wasyncore.close_all(_map)."""
    assert isinstance(need(server, "_map", "server.Daemon._drain (server._map)"), dict)
    assert callable(need(wasyncore, "close_all", "server.Daemon._drain (wasyncore.close_all)"))


def test_waitress_task_dispatcher(server):
    """server.Daemon._drain waits on task_dispatcher.active_count/queue, then shuts it down."""
    tasks = need(server, "task_dispatcher", "server.Daemon._drain (server.task_dispatcher)")
    for name in ("active_count", "queue", "shutdown"):
        need(tasks, name, f"server.Daemon._drain (task_dispatcher.{name})")


def test_waitress_trigger(server):
    """server.Daemon._in_loop runs code in the loop's thread with trigger.pull_trigger."""
    trigger = need(server, "trigger", "server.Daemon._in_loop (server.trigger)")
    assert callable(need(trigger, "pull_trigger", "server.Daemon._in_loop (pull_trigger)"))


def test_waitress_effective_address(server):
    """server.Daemon._bind reads effective_host/effective_port (absent for multi-address)."""
    assert need(server, "effective_host", "server.Daemon._bind") == "127.0.0.1"
    assert int(need(server, "effective_port", "server.Daemon._bind")) > 0
