"""ssh.Pool against the test cluster's real sshd hosts."""

import itertools
import shutil
import threading
import time

import paramiko
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlbench_daemon import config, ssh
from mlbench_daemon.jobs import remote
from mlbench_daemon.ssh import CommandTimeout, Pool, Unreachable, Untrusted, internals, listener

CONNECT_TIMEOUT = 2.0


def ssh_cfg(cluster, tmp_path, **overrides):
    """The cluster's [ssh] section (system known_hosts off: only the cluster's file counts)."""
    values = {
        "connect_timeout_s": CONNECT_TIMEOUT,
        "use_system_known_hosts": False,
        "keepalive_s": 5.0,
        **overrides,
    }
    path = cluster.write_config(tmp_path / "daemon.toml", tmp_path / "state", ssh=values)
    return config.load(path, environ={}).ssh


@pytest.fixture
def pool(cluster, tmp_path):
    p = Pool(ssh_cfg(cluster, tmp_path))
    yield p
    p.close()


def bounded(fn, limit):
    """Call fn, which must raise SSHError within `limit` seconds (a hang check, not a
    timing test)."""
    start = time.monotonic()
    with pytest.raises(ssh.SSHError) as info:
        fn()
    assert time.monotonic() - start < limit
    return info.value


# --- probe and reachability ------------------------------------------------------------


def test_probe_running_and_connection_reused(cluster, pool):
    h = cluster.workers[0]
    latency = pool.probe(h.ip, 22, h.fqdn)
    assert 0 < latency < CONNECT_TIMEOUT
    transport = pool.connection(h.ip, 22).transport
    for _ in range(3):
        pool.probe(h.ip, 22, h.fqdn)
    assert pool.connection(h.ip, 22).transport is transport
    assert pool.reconnects == 0


def test_reconnect_after_sshd_restart_is_counted(cluster, tmp_path):
    seen = []
    pool = Pool(ssh_cfg(cluster, tmp_path), on_reconnect=lambda ip, port: seen.append((ip, port)))
    try:
        h = cluster.workers[1]
        pool.probe(h.ip, 22)
        first = pool.connection(h.ip, 22).transport
        cluster.stop_sshd(h)
        cluster.start_sshd(h)
        # the old connection died with its sshd: the first probe may notice that,
        # the next one reconnects
        for _ in range(2):
            try:
                pool.probe(h.ip, 22)
                break
            except Unreachable as e:
                assert e.reason in ("connection-lost", "ssh-error", "connect-timeout"), e
        assert pool.connection(h.ip, 22).transport is not first
        assert pool.reconnects == 1
        assert seen == [(h.ip, 22)]
    finally:
        pool.close()


def test_sshd_stopped_is_connection_refused(cluster, pool):
    h = cluster.workers[0]
    cluster.stop_sshd(h)
    e = bounded(lambda: pool.probe(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert (type(e), e.reason, e.phase) == (Unreachable, "connection-refused", "Unknown")


def test_frozen_before_connect_is_no_banner_and_bounded(cluster, pool):
    h = cluster.workers[0]
    cluster.freeze(h)
    e = bounded(lambda: pool.probe(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert (e.reason, e.phase) == ("no-banner", "Unknown")


def test_frozen_mid_session_is_bounded_then_recovers(cluster, pool):
    h = cluster.workers[0]
    pool.probe(h.ip, 22)
    cluster.freeze(h)  # the established connection's sshd stops answering
    e = bounded(lambda: pool.probe(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert e.phase == "Unknown" and e.reason in ("connect-timeout", "no-banner"), e
    cluster.thaw(h)
    assert pool.probe(h.ip, 22) > 0


def test_cut_link_is_bounded_unknown(cluster, pool):
    h = cluster.workers[2]
    pool.probe(h.ip, 22)
    cluster.cut_link(h)
    for _ in range(2):  # on the live connection, then on a fresh connect
        e = bounded(lambda: pool.probe(h.ip, 22), 3 * CONNECT_TIMEOUT)
        assert e.phase == "Unknown", e
        assert e.reason in ("connect-timeout", "network-unreachable", "connection-lost"), e
    cluster.restore_link(h)
    assert pool.probe(h.ip, 22) > 0


def test_run_on_frozen_host_is_bounded(cluster, pool):
    h = cluster.workers[0]
    pool.probe(h.ip, 22)
    cluster.freeze(h)
    e = bounded(lambda: pool.run(h.ip, 22, ["echo", "hi"], timeout=60), 3 * CONNECT_TIMEOUT)
    assert e.phase == "Unknown"


# --- host keys and auth ----------------------------------------------------------------


def test_changed_host_key_fails_then_recovers(cluster, pool):
    h = cluster.workers[0]
    pool.probe(h.ip, 22, h.fqdn)
    cluster.replace_host_key(h)  # restarts sshd: the old connection is gone too
    with pytest.raises(Untrusted) as info:
        for _ in range(2):
            try:
                pool.probe(h.ip, 22, h.fqdn)
            except Unreachable:
                continue  # the dead old connection, noticed first
    e = info.value
    assert (e.reason, e.phase) == ("host-key-changed", "Failed")
    new = paramiko.PKey.from_path(h.host_key)
    old = paramiko.PKey.from_path(h.dir / "orig_host_key")
    assert ssh.fingerprint(new) in str(e) and ssh.fingerprint(old) in str(e)
    cluster.restore_host_key(h)
    assert pool.probe(h.ip, 22, h.fqdn) > 0


# --- new connections beside the persistent one ----------------------------------------


def test_listener_check_is_made_from_the_node_and_sees_what_the_session_hides(cluster, pool):
    h = cluster.hosts[1]
    pool.probe(h.ip, 22, h.fqdn)
    assert pool.check_listener(h.ip, 22) > 0
    route = pool.listener.route(h.ip, 22)
    assert route.forwarding and route.head_check is None  # no connect from here
    cluster.stop_listener(h)
    assert pool.probe(h.ip, 22) > 0  # the old session still works ...
    e = bounded(lambda: pool.check_listener(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert (e.phase, e.reason) == ("Unknown", "connection-refused")  # ... new ones do not
    cluster.start_listener(h)
    cluster.freeze_listener(h)
    e = bounded(lambda: pool.check_listener(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert (e.phase, e.reason) == ("Unknown", "no-banner")
    cluster.thaw(h)
    assert pool.check_listener(h.ip, 22) > 0
    assert pool.connection(h.ip, 22).connects == 1  # one persistent connection throughout


def test_listener_check_from_here_when_the_node_forbids_forwarding(cluster, pool, monkeypatch):
    h = cluster.hosts[2]
    cluster.set_sshd_option(h, "AllowTcpForwarding", "no")
    pool.probe(h.ip, 22, h.fqdn)
    assert pool.check_listener(h.ip, 22) > 0
    route = pool.listener.route(h.ip, 22)
    assert not route.forwarding and route.head_check is not None
    cluster.stop_listener(h)
    # checked from here at most every HEAD_CHECK_EVERY_S (fail2ban): the last answer stands
    assert pool.check_listener(h.ip, 22) > 0
    monkeypatch.setattr(listener, "HEAD_CHECK_EVERY_S", 0.0)
    e = bounded(lambda: pool.check_listener(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert (e.phase, e.reason) == ("Unknown", "connection-refused")


def test_verify_login_is_a_fresh_login_beside_the_session(cluster, pool):
    h = cluster.hosts[0]
    pool.probe(h.ip, 22, h.fqdn)
    assert pool.verify_login(h.ip, 22, h.fqdn) > 0
    assert pool.connection(h.ip, 22).connects == 1  # the persistent one is untouched
    cluster.rotate_host_key(h)
    e = bounded(lambda: pool.verify_login(h.ip, 22, h.fqdn), 3 * CONNECT_TIMEOUT)
    assert (e.phase, e.reason) == ("Failed", "host-key-changed") and "SHA256:" in str(e)
    assert pool.probe(h.ip, 22) > 0  # the old session does not notice
    cluster.restore_host_key(h)
    cluster.revoke_key(h)
    e = bounded(lambda: pool.verify_login(h.ip, 22, h.fqdn), 3 * CONNECT_TIMEOUT)
    assert (e.phase, e.reason) == ("Failed", "auth-failed")
    cluster.restore_key(h)
    assert pool.verify_login(h.ip, 22, h.fqdn) > 0


def test_a_listener_without_a_banner_is_one_reason_and_no_paramiko_traceback(cluster, pool, caplog):
    """paramiko logs the exception that ends a transport's thread (here: our close of a
    socket still waiting for a banner) as one ERROR record per traceback line; the
    caller's exception says it already."""
    h = cluster.hosts[0]
    cluster.freeze_listener(h)
    try:
        e = bounded(lambda: pool.verify_login(h.ip, 22, h.fqdn), 3 * CONNECT_TIMEOUT)
        assert (e.phase, e.reason) == ("Unknown", "no-banner")
        time.sleep(0.5)  # the transport's thread logs as it ends
    finally:
        cluster.thaw(h)
    loud = [r.getMessage() for r in caplog.records if r.name.startswith("paramiko")]
    assert not loud, loud


def test_fingerprint_matches_openssh(cluster):
    import subprocess

    h = cluster.workers[0]
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{h.host_key}.pub"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[1] == ssh.fingerprint(paramiko.PKey.from_path(h.host_key))


def test_unknown_host_key_rejected(cluster, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    pool = Pool(ssh_cfg(cluster, tmp_path, known_hosts=str(empty)))
    try:
        h = cluster.workers[0]
        with pytest.raises(Untrusted) as info:
            pool.probe(h.ip, 22, h.fqdn)
        assert info.value.reason == "host-key-unknown"
        assert empty.read_text() == ""
    finally:
        pool.close()


def test_accept_new_pins_then_refuses_change(cluster, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(
        "@cert-authority *.example ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIK0ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZ\n"
    )
    pool = Pool(ssh_cfg(cluster, tmp_path, known_hosts=str(kh), host_key_policy="accept-new"))
    try:
        h = cluster.workers[1]
        assert pool.probe(h.ip, 22, h.fqdn) > 0
        pinned = kh.read_text().splitlines()[-1]
        assert pinned.split()[0] == f"{h.fqdn},{h.ip}"
        assert pinned.split()[2] == paramiko.PKey.from_path(h.host_key).get_base64()
        cluster.replace_host_key(h)
        with pytest.raises(Untrusted) as info:
            for _ in range(2):
                try:
                    pool.probe(h.ip, 22, h.fqdn)
                except Unreachable:
                    continue
        assert info.value.reason == "host-key-changed"
        assert kh.read_text().splitlines()[-1] == pinned  # never re-pinned
    finally:
        pool.close()


def test_hashed_known_hosts_and_nonstandard_port_names(cluster, tmp_path):
    h = cluster.workers[2]
    kh = tmp_path / "known_hosts"
    shutil.copy(cluster.known_hosts, kh)
    import subprocess

    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], capture_output=True, check=True)
    assert h.ip not in kh.read_text()
    pool = Pool(ssh_cfg(cluster, tmp_path, known_hosts=str(kh)))
    try:
        assert pool.probe(h.ip, 22) > 0
    finally:
        pool.close()
    assert ssh.known_names("10.0.0.1", 2222, "a.example") == ["[a.example]:2222", "[10.0.0.1]:2222"]


def test_revoked_key_is_refused(cluster, tmp_path):
    h = cluster.workers[0]
    kh = tmp_path / "known_hosts"
    pub = " ".join((h.dir / "host_key.pub").read_text().split()[:2])
    kh.write_text(cluster.known_hosts.read_text() + f"@revoked * {pub}\n")
    pool = Pool(ssh_cfg(cluster, tmp_path, known_hosts=str(kh)))
    try:
        with pytest.raises(Untrusted) as info:
            pool.probe(h.ip, 22)
        assert "revoked" in str(info.value)
    finally:
        pool.close()


def test_wrong_client_key_is_auth_failed(cluster, tmp_path):
    pool = Pool(ssh_cfg(cluster, tmp_path, key_file=str(cluster.wrong_key)))
    try:
        h = cluster.workers[0]
        with pytest.raises(Untrusted) as info:
            pool.probe(h.ip, 22)
        assert (info.value.reason, info.value.phase) == ("auth-failed", "Failed")
    finally:
        pool.close()


def test_unreadable_key_file_is_a_config_error(cluster, tmp_path):
    with pytest.raises(config.ConfigError, match=r"ssh\.key_file"):
        Pool(ssh_cfg(cluster, tmp_path, key_file=str(tmp_path / "missing")))


# --- run and stream --------------------------------------------------------------------


HOSTILE = [
    "it's",
    'say "hi"',
    "$(touch /tmp/pwned)",
    "`id`",
    "a; rm -rf /",
    "two\nlines",
    "tab\there",
    "ünï©ødé ✓",
    "*",
    "~",
    "",
    " ",
    "\\",
    "-n",
    "%s%d",
    "&&",
    "|",
    "#x",
]


def test_run_argv_round_trip_is_byte_identical(cluster, pool):
    h = cluster.workers[0]
    r = pool.run(h.ip, 22, ["printf", "%s\\0", *HOSTILE], timeout=10)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split(b"\0")[:-1] == [a.encode() for a in HOSTILE]


def test_run_exit_code_stderr_and_stdin(cluster, pool):
    h = cluster.workers[0]
    r = pool.run(
        h.ip, 22, ["sh", "-c", "cat; echo oops >&2; exit 7"], stdin=b"in\x00put\n", timeout=10
    )
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"in\x00put\n", b"oops\n")


def test_run_without_stdin_reads_nothing(cluster, pool):
    h = cluster.workers[0]
    r = pool.run(h.ip, 22, ["cat"], timeout=10)  # must not wait for input
    assert (r.exit_code, r.stdout) == (0, b"")


def test_run_large_output_on_both_streams_no_deadlock(cluster, pool):
    h = cluster.workers[0]
    script = "head -c 20000000 /dev/zero; head -c 5000000 /dev/zero >&2"
    r = pool.run(h.ip, 22, ["sh", "-c", script], timeout=60)
    assert (r.exit_code, len(r.stdout), len(r.stderr)) == (0, 20_000_000, 5_000_000)


def test_run_large_stdin_and_output_together(cluster, pool):
    h = cluster.workers[0]
    data = bytes(range(256)) * 40_000  # 10 MB echoed back while we still write
    r = pool.run(h.ip, 22, ["cat"], stdin=data, timeout=60)
    assert r.exit_code == 0 and r.stdout == data


def test_run_timeout(cluster, pool):
    h = cluster.workers[0]
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        pool.run(h.ip, 22, ["sleep", "30"], timeout=0.5)
    assert time.monotonic() - start < 5
    assert (info.value.reason, info.value.phase) == ("command-timeout", "Unknown")
    assert pool.run(h.ip, 22, ["true"], timeout=10).exit_code == 0  # the connection survived


def test_stream_large_output_and_exit_code(cluster, pool):
    h = cluster.workers[1]
    s = pool.stream(
        h.ip, 22, ["sh", "-c", "head -c 20000000 /dev/zero; echo end >&2; exit 3"], idle_timeout=10
    )
    with s:
        data = b"".join(s)
    # sshd reads the two pipes separately: stderr may overtake buffered stdout
    assert len(data) == 20_000_004 and data.replace(b"\0", b"") == b"end\n"
    assert s.exit_code == 3


def test_stream_chunks_arrive_as_produced(cluster, pool):
    h = cluster.workers[1]
    with pool.stream(h.ip, 22, ["sh", "-c", "echo one; sleep 30; echo two"], idle_timeout=10) as s:
        assert next(s) == b"one\n"  # before the command ends


def test_stream_stdin_and_idle_timeout(cluster, pool):
    h = cluster.workers[1]
    with pool.stream(h.ip, 22, ["cat"], stdin=b"hello", idle_timeout=10) as s:
        assert b"".join(s) == b"hello"
    assert s.exit_code == 0
    # silent for longer than the idle timeout, on a host that answers: waited for
    with pool.stream(h.ip, 22, ["sh", "-c", "sleep 2; echo late"], idle_timeout=0.3) as s:
        assert b"".join(s) == b"late\n"
    # silent on a frozen host: the probe fails, bounded
    with pool.stream(h.ip, 22, ["sleep", "30"], idle_timeout=0.5) as s:
        cluster.freeze(h)
        e = bounded(lambda: next(s), 0.5 + 3 * CONNECT_TIMEOUT)
    assert e.reason == "connection-lost" and "no output for 0.5 s" in str(e)


def test_stream_link_cut_raises_connection_lost(cluster, pool):
    h = cluster.workers[2]
    with pool.stream(h.ip, 22, ["sh", "-c", "echo a; sleep 60"], idle_timeout=1.5) as s:
        assert next(s) == b"a\n"
        cluster.cut_link(h)
        e = bounded(lambda: next(s), 10)
    assert e.reason == "connection-lost"


def test_channels_are_bounded_per_connection(cluster, tmp_path):
    pool = Pool(ssh_cfg(cluster, tmp_path, max_channels=2))
    h = cluster.workers[0]
    try:
        streams = [pool.stream(h.ip, 22, ["sleep", "30"], idle_timeout=30) for _ in range(2)]
        e = bounded(lambda: pool.run(h.ip, 22, ["true"], timeout=10), 3 * CONNECT_TIMEOUT)
        assert e.reason == "ssh-error" and "busy" in str(e)
        assert pool.probe(h.ip, 22) > 0  # probes have their own channel
        streams[0].close()
        assert pool.run(h.ip, 22, ["true"], timeout=10).exit_code == 0
        streams[1].close()
    finally:
        pool.close()


def test_parallel_users_share_one_connection(cluster, pool):
    h = cluster.workers[0]
    results, errors = [], []

    def work(i):
        try:
            if i % 2:
                results.append(
                    pool.run(h.ip, 22, ["cat"], stdin=f"{i}\n".encode(), timeout=20).stdout
                )
            else:
                results.append(pool.run(h.ip, 22, ["echo", str(i)], timeout=20).stdout)
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(results) == sorted(f"{i}\n".encode() for i in range(20))
    assert pool.connection(h.ip, 22).connects == 1


def test_quote_refuses_a_string():
    with pytest.raises(TypeError):
        ssh.quote("rm -rf /")


def test_rare_paramiko_errors_are_classified(cluster, pool, mocker):
    h = cluster.workers[0]
    mocker.patch.object(
        paramiko.Transport,
        "start_client",
        side_effect=paramiko.ssh_exception.IncompatiblePeer("no matching kex"),
    )
    e = bounded(lambda: pool.probe(h.ip, 22), 3 * CONNECT_TIMEOUT)
    assert (type(e), e.reason) == (Unreachable, "ssh-error")
    assert "no matching kex" in str(e)


def test_classify_maps_each_failure_once():
    import errno

    cases = [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection-refused"),
        (TimeoutError("timed out"), "connect-timeout"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "network-unreachable"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network-unreachable"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "connection-lost"),
        (EOFError(), "connection-lost"),
        (paramiko.SSHException("Error reading SSH protocol banner"), "no-banner"),
        (paramiko.AuthenticationException("Authentication failed."), "auth-failed"),
        (paramiko.AuthenticationException("Authentication timeout."), "connect-timeout"),
        (paramiko.ChannelException(1, "Administratively prohibited"), "ssh-error"),
    ]
    for exc, reason in cases:
        assert ssh.classify(exc).reason == reason, exc


# --- the channel receive buffer --------------------------------------------------------
# A pure data structure: checked against paramiko's own BufferedPipe, which it replaces.


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 400), min_size=1))
def test_chunk_pipe_reads_what_paramikos_pipe_reads(feeds, sizes):
    ours, theirs = internals.ChunkPipe(), paramiko.buffered_pipe.BufferedPipe()
    for data in feeds:
        ours.feed(data)
        theirs.feed(data)
    assert len(ours) == len(theirs)
    for n in itertools.islice(itertools.cycle(sizes), 1000):
        if not len(theirs):
            break
        assert ours.read(n, 0) == theirs.read(n, 0)
        assert len(ours) == len(theirs)
    assert ours.empty() == theirs.empty() and len(ours) == 0


def test_chunk_pipe_blocking_timeout_close_and_event():
    pipe, event = internals.ChunkPipe(), threading.Event()
    pipe.set_event(event)
    assert not event.is_set() and not pipe.read_ready()
    with pytest.raises(paramiko.buffered_pipe.PipeTimeout):
        pipe.read(10, 0)
    start = time.monotonic()
    with pytest.raises(paramiko.buffered_pipe.PipeTimeout):
        pipe.read(10, 0.05)
    assert 0.04 < time.monotonic() - start < 5
    threading.Timer(0.05, pipe.feed, (b"late",)).start()
    assert pipe.read(10, 5) == b"late"  # a blocked read wakes up on data
    pipe.feed(b"abc")
    assert event.is_set() and pipe.read_ready()
    assert pipe.read(3) == b"abc" and not event.is_set()
    threading.Timer(0.05, pipe.close).start()
    assert pipe.read(10) == b""  # ... and on close: b"" means closed
    assert event.is_set()
    pipe.feed(b"")
    assert pipe.read(10, 0) == b""


# --- the packed catch-up over real sshd (jobs/remote.py CATCH_UP) --------------------------


def test_catch_up_over_sshd_unpacks_the_waiting_bytes_exactly(cluster, pool):
    h = cluster.workers[0]
    job = ".mlbench-test-catch-up"
    write = f"mkdir -p {job} && seq 1 500000 > {job}/out"
    made = pool.run(h.ip, 22, ["sh", "-c", write], timeout=30)
    assert made.exit_code == 0
    want = b"".join(b"%d\n" % i for i in range(1, 500001))
    r = remote.Remote(pool, 30.0)
    try:
        got = list(r.catch_up(remote.Host(h.ip, 22), job, 7, 30.0))
        assert b"".join(got) == want[7:]
        enough = len(want) - remote.CATCH_UP_MIN
        assert list(r.catch_up(remote.Host(h.ip, 22), job, enough + 1, 30.0)) == []
    finally:
        pool.run(h.ip, 22, ["rm", "-rf", "--", job], timeout=30)
