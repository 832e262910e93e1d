"""The SSH pool: one persistent paramiko connection per host, host keys verified.

Every blocking step has a bound:

- connect: TCP connect, banner, key exchange and auth share one deadline of
  ``ssh.connect_timeout_s`` (paramiko's own banner/handshake/auth timeouts are
  set from what is left of it);
- channel open and ``exec``: bounded by the same connect timeout; paramiko's
  ``exec_command`` waits without a bound for the server's reply, so a watchdog
  timer closes the channel (and the connection: the host is silent) when it
  does not come;
- data: ``run`` is bounded by its ``timeout`` (``CommandTimeout``), ``stream``
  by its ``idle_timeout`` per chunk, ``probe`` by the connect timeout overall.

Failures are mapped to ``Unreachable`` / ``Untrusted`` in one place,
``classify()``.  A connection that failed is closed; the next use reconnects
(and counts a reconnect).

Channels: at most ``ssh.max_channels`` run/stream channels per connection at
once, plus one reserved for probes, so a host whose channels are all busy
following job output is still probed (keep the sum under sshd's MaxSessions,
default 10).

Remote commands are built only by ``quote(argv)`` (``shlex.join``): the login
shell sees one word per argv item, whatever the bytes.

An established connection proves nothing about the next login (sshd's listener
can be stopped, hung, re-keyed, or the key revoked while old sessions live), so
besides ``probe`` (a command on the persistent connection) there are:

- ``check_listener``: a fresh TCP connect to the node's sshd and its banner
  (no crypto), made by the node itself through the persistent connection (a
  ``direct-tcpip`` channel to the node's own address and port); after the banner
  it sends an identification string and a disconnect (reason 11, "by
  application"), so sshd logs a clean "Received disconnect ... listener check".
  Made from the node, the check's pre-auth disconnect is logged against the
  node's own address, which fail2ban never bans (``ignoreself``); made from here,
  fail2ban's sshd filter in ddos/aggressive mode counts every such disconnect as
  a failure and would ban the head within minutes.  When the node forbids
  forwarding (``AllowTcpForwarding no``) the check connects from here instead.
- ``verify_login``: a full fresh login on a new connection (key exchange with the
  host-key check, auth, then ``true``), closed at once.

The package, by concern: ``connection`` (one connection, its login and ``classify``),
``channels`` (exec, run, stream, stdin), ``listener`` (the listener check and its
per-node state), ``internals`` (every use of paramiko's private parts), ``pool`` (the
facade).  Everything the rest of the daemon used from the one ``ssh`` module is
re-exported here.
"""

import logging

from mlbench_daemon.known_hosts import (
    SYSTEM_KNOWN_HOSTS,
    KnownHosts,
    KnownKey,
    fingerprint,
    known_names,
    parse_known_hosts,
)
from mlbench_daemon.ssh.channels import Result, Stream, quote
from mlbench_daemon.ssh.connection import Connection, classify, load_client_key
from mlbench_daemon.ssh.listener import HEAD_CHECK_EVERY_S
from mlbench_daemon.ssh.pool import Pool
from mlbench_daemon.ssh_errors import CommandTimeout, SSHError, Unreachable, Untrusted

# paramiko.transport logs each refused channel open as an ERROR (a listener check whose
# node cannot connect to its own sshd: one every probe round), and each exception in a
# transport's thread as one ERROR record per line of its traceback (a listener that
# sends no banner: one every fresh login).  Every such failure reaches our caller as an
# exception, and the daemon reports it once, as a node's reason or a job's error.
# `--log-level debug` shows paramiko's records too (logs.py).
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

__all__ = [
    "HEAD_CHECK_EVERY_S",
    "SYSTEM_KNOWN_HOSTS",
    "CommandTimeout",
    "Connection",
    "KnownHosts",
    "KnownKey",
    "Pool",
    "Result",
    "SSHError",
    "Stream",
    "Unreachable",
    "Untrusted",
    "classify",
    "fingerprint",
    "known_names",
    "load_client_key",
    "parse_known_hosts",
    "quote",
]
