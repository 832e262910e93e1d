"""How a run's ranks reach the daemon: the ``run_env`` hook the runs registry calls just
before it launches a run's job.

``make_run_env(pool, cfg, caps)`` returns the hook.  For a run on some nodes it mints the
run's capability (capability.py), asks every node's SSH session for a reverse forward of
the node's ``127.0.0.1:<metrics.forward_port>`` to the daemon's own listening socket
(ssh/forward.py; all nodes at once), and returns the job's secret environment:

    MLBENCH_DASHBOARD_URL = "127.0.0.1:<port>/run-cap/<secret>"   (mlbench-core's ``url``)
    MLBENCH_RUN_ID        = "<run id>"

One value reaches every rank, so the port is the same on every node.  Where a node
refuses the forward (its sshd allows no remote forwarding, or the port is taken there),
the notes say so and every rank posts to the daemon's own bind address instead, if the
nodes can reach it (not loopback); otherwise the run is refused (``RunRefused``, 503)
with what to change.  ``ended(run)`` (the registry's ``on_ended``) closes the run's
forwards and revokes its capability.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from mlbench_daemon import config
from mlbench_daemon.browser import is_loopback
from mlbench_daemon.capability import PREFIX, Capabilities
from mlbench_daemon.errors import Unavailable
from mlbench_daemon.jobs.runs import RunEnv
from mlbench_daemon.ssh import SSHError
from mlbench_daemon.ssh.forward import ForwardRefused

if TYPE_CHECKING:  # the hook is given these; it imports none of them
    from mlbench_daemon.discovery import Node
    from mlbench_daemon.ssh import Pool

log = logging.getLogger(__name__)

URL_ENV = "MLBENCH_DASHBOARD_URL"
RUN_ENV = "MLBENCH_RUN_ID"
MAX_AT_ONCE = 16  # forward requests in flight at once (each waits for one reply)


class RunView(Protocol):
    """What the hook reads of a run (the runs registry's frozen ``RunView``)."""

    @property
    def id(self) -> int: ...

    @property
    def nodes(self) -> tuple[str, ...]: ...


class RunRefused(Unavailable):
    """The run's ranks could not reach the daemon by any route."""

    error = "unreachable-daemon"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def local_target(host: str, port: int) -> tuple[str, int]:
    """Where a forwarded connection connects here: the daemon's bound socket (a wildcard
    bind is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1", port
    if host == "::":
        return "::1", port
    return host, port


class RunEnvHook:
    """The ``run_env`` hook (call it) and its end (``ended``, for ``runs.on_ended``)."""

    def __init__(
        self,
        pool: Pool,
        cfg: config.Config,
        caps: Capabilities,
        bound: Callable[[], tuple[str, int] | None],
    ) -> None:
        self.pool, self.cfg, self.caps, self.bound = pool, cfg, caps, bound
        self._lock = threading.Lock()
        self._forwards: dict[int, list[tuple[str, int]]] = {}  # run id -> nodes forwarded

    def __call__(self, run: RunView, nodes: Sequence[Node]) -> RunEnv:
        bound = self.bound()
        if bound is None:
            raise RunRefused("the daemon is not listening yet; try again")
        port = self.cfg.metrics.forward_port
        refused = self._forward_all(nodes, port, local_target(*bound))
        notes: tuple[str, ...] = ()
        opened = [(n.ip, n.port) for n in nodes if n.name not in refused]
        secret = self.caps.mint(run.id)
        if not refused:
            url = f"127.0.0.1:{port}"
        else:
            self._close(opened)
            opened = []
            head = self._head_address(nodes, bound)
            why = [f"{name} {text}" for name, text in refused.items()]
            if head is None:
                self.caps.revoke(run.id)
                raise RunRefused(
                    f"run {run.id}: its ranks cannot reach the daemon: {'; '.join(why)}, and "
                    f"the daemon listens on {bound[0]} only, which the nodes cannot reach. Let "
                    f"those nodes' sshd forward ports (AllowTcpForwarding yes or remote), free "
                    f"port {port} there or set another metrics.forward_port, or bind "
                    f"server.host to an address the nodes reach (with a token)"
                )
            url = f"{_url_host(head)}:{bound[1]}"
            notes = tuple(f"{w}; ranks post to {url}" for w in why)
        with self._lock:
            self._forwards[run.id] = opened
        for note in notes:
            log.warning("run %d: %s", run.id, note)
        return RunEnv({URL_ENV: f"{url}{PREFIX}{secret}", RUN_ENV: str(run.id)}, notes)

    def ended(self, run: RunView) -> None:
        """The run ended: its capability is revoked, its forwards closed."""
        self.caps.revoke(run.id)
        with self._lock:
            opened = self._forwards.pop(run.id, [])
        self._close(opened)

    def _forward_all(
        self, nodes: Sequence[Node], port: int, target: tuple[str, int]
    ) -> dict[str, str]:
        """Ask every node at once -> {node name: why it has no forward} for those refused."""

        def one(node: Node) -> str | None:
            try:
                self.pool.forward(node.ip, node.port, port, target)
            except ForwardRefused as e:
                return f"refused the reverse forward of port {port}: {e}"
            except SSHError as e:
                return f"could not be asked for a reverse forward: {e}"
            return None

        if not nodes:
            return {}
        with concurrent.futures.ThreadPoolExecutor(min(MAX_AT_ONCE, len(nodes))) as ex:
            answers = list(ex.map(one, nodes))
        return {n.name: why for n, why in zip(nodes, answers, strict=True) if why is not None}

    def _close(self, opened: list[tuple[str, int]]) -> None:
        for ip, ssh_port in opened:
            try:
                self.pool.unforward(ip, ssh_port, self.cfg.metrics.forward_port)
            except SSHError as e:  # the session is gone, and its forward with it
                log.debug("closing the forward on %s: %s", ip, e)

    def _head_address(self, nodes: Sequence[Node], bound: tuple[str, int]) -> str | None:
        """The daemon's address the nodes reach, if it listens on one: its bind address, or
        for a wildcard bind our end of the nodes' SSH connections (one for all)."""
        host = bound[0]
        if is_loopback(host):
            return None
        if host not in ("0.0.0.0", "::", ""):
            return host
        seen = {self.pool.local_address(n.ip, n.port) for n in nodes}
        seen.discard(None)
        if len(seen) != 1:
            return None
        (address,) = seen
        if address is None or ipaddress.ip_address(address).is_loopback:
            return None
        return address


def make_run_env(
    pool: Pool,
    cfg: config.Config,
    caps: Capabilities,
    bound: Callable[[], tuple[str, int] | None] | None = None,
) -> RunEnvHook:
    """The hook ``Runs(run_env=...)`` calls (wire ``runs.on_ended(hook.ended)`` too).
    `bound`: the daemon's listening (host, port) once bound; default server.host/port."""
    return RunEnvHook(pool, cfg, caps, bound or (lambda: (cfg.server.host, cfg.server.port)))
