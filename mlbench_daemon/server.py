"""The daemon process: build the parts, serve HTTP with waitress, talk to systemd.

``Daemon(cfg).run()``:

1. starts the node registry and the jobs (which re-attaches jobs still running), and
   prunes finished jobs past state.keep_days / state.max_bytes (again every 10 min),
2. binds the HTTP socket (so a client connecting after READY never gets refused),
3. waits (bounded) for the first probe pass, sends ``READY=1`` and ``STATUS=``,
4. serves until SIGTERM/SIGINT, while a supervisor thread refreshes ``STATUS=`` and
   sends ``WATCHDOG=1`` only while the registry loops and the HTTP loop make progress,
5. on shutdown: ``STOPPING=1``, stop accepting, let in-flight requests finish
   (bounded), stop following jobs WITHOUT cancelling them on the cluster, stop the
   registry, close the SSH pool.

Start-up problems raise ``StartupError`` (or ``config.ConfigError`` from a part that
checks its own settings) with one line for the user.
"""

import logging
import os
import resource
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import waitress.server
from waitress import wasyncore

from mlbench_daemon import api, config, logs, metrics, sdnotify, webhooks
from mlbench_daemon.audit import AuditLog
from mlbench_daemon.browser import Policy, is_loopback
from mlbench_daemon.capability import Capabilities
from mlbench_daemon.discovery import Discovery, DiscoveryError
from mlbench_daemon.jobs import Jobs
from mlbench_daemon.jobs.preflight import Preflight
from mlbench_daemon.jobs.runs import Runs
from mlbench_daemon.jobs.sampler import NodeSampler
from mlbench_daemon.metricstore import MetricStore, RunLookup
from mlbench_daemon.nodes import Registry
from mlbench_daemon.runenv import make_run_env
from mlbench_daemon.ssh import Pool
from mlbench_daemon.store import Store, StoreError, fs_fault_message
from mlbench_daemon.tokens import Tokens, check_mode
from mlbench_daemon.vocabulary import JobState, Phase

log = logging.getLogger(__name__)

DRAIN_S = 10.0  # longest wait for in-flight requests at shutdown
LOOP_CHECK_S = 2.0  # the HTTP loop must answer a trigger within this
STATUS_EVERY_S = 5.0  # STATUS= refresh when there is no watchdog
PRUNE_EVERY_S = 600.0  # retention pass (state.keep_days, state.max_bytes)


class StartupError(Exception):
    """The daemon cannot start; str() is one line for the user."""


def read_tokens(server_cfg: config.Server) -> Tokens:
    """The API's tokens (server.token_file's and server.tokens_file's); refuses a
    non-loopback bind without any."""
    legacy = None
    if server_cfg.token_file:
        try:  # owner-only, as the tokens file must be (tokens.check_mode)
            with open(server_cfg.token_file, "rb") as f:
                check_mode(server_cfg.token_file, os.fstat(f.fileno()))
            legacy = config.read_token(server_cfg.token_file)
        except OSError as e:
            raise StartupError(
                f"server.token_file: cannot read {server_cfg.token_file}: {e.strerror or e}"
            ) from None
        except ValueError as e:
            raise StartupError(f"server.token_file: {e}") from None
    try:
        tokens = Tokens(server_cfg.tokens_file, legacy)
    except ValueError as e:
        raise StartupError(f"server.tokens_file: {e}") from None
    if not tokens.enabled and not is_loopback(server_cfg.host):
        raise StartupError(
            f"server.host is {server_cfg.host!r}, not loopback: set server.token_file or "
            "server.tokens_file so the API is not open to the network"
        )
    return tokens


FD_LIMIT = 65536


def raise_fd_limit(want: int = FD_LIMIT) -> int:
    """Raise the soft limit of open files towards the hard one; returns the soft limit.

    Each node's persistent connection holds a socket, so 1,000 nodes pass the soft limit
    of 1,024 that systemd gives a service by default (its hard limit is 524,288): new
    connections, API clients and log files would fail with "Too many open files"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def http_server(app: Any, host: str, port: int, threads: int) -> Any:
    """waitress's server for `app`: JSON 413s come from the app (it enforces
    max_body_bytes); a lookahead of 1 keeps reading the connection while a request
    runs, so a log follow sees (waitress.client_disconnected) that its client went
    away; poll(), not select(): past 1,024 open files (a socket per node) select()
    refuses every client ("filedescriptor out of range") and the HTTP loop dies."""
    return waitress.server.create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="mlbench-daemon",
        channel_request_lookahead=1,
        asyncore_use_poll=True,
    )


class Daemon:
    def __init__(self, cfg: config.Config, runs: RunLookup | None = None) -> None:
        """`runs`: the runs metrics belong to and whose nodes are sampled (none: no run,
        no samples)."""
        self.cfg = cfg
        tokens = read_tokens(cfg.server)
        if cfg.server.max_streams >= cfg.server.threads:
            raise StartupError(
                f"server.max_streams ({cfg.server.max_streams}) must be below server.threads "
                f"({cfg.server.threads}), so that short requests always find a free thread"
            )
        self.pool = Pool(cfg.ssh, on_reconnect=lambda ip, port: metrics.ssh_reconnects_total.inc())
        try:
            self.registry = Registry(
                cfg,
                Discovery(cfg.discovery, ssh_port=cfg.ssh.port),
                self.pool,
                on_probe=metrics.observe_probe,
            )
        except ValueError as e:  # the selector
            raise StartupError(f"discovery.selector: {e}") from None
        except DiscoveryError as e:  # no usable resolver
            raise StartupError(str(e)) from None
        try:
            self.store = Store(cfg.state.dir)
            self.store.probe_write()  # a read-only or unwritable store refuses to start
        except StoreError as e:
            raise StartupError(f"state.dir: {e}") from None
        except (OSError, sqlite3.Error) as e:
            fault = fs_fault_message(cfg.state.dir)
            if fault is not None:
                raise StartupError(f"state.dir: {fault}") from None
            raise StartupError(
                f"state.dir: cannot use {cfg.state.dir}: {getattr(e, 'strerror', None) or e}"
            ) from None
        audit_path = cfg.state.audit_file or os.path.join(cfg.state.dir, "audit.log")
        try:
            self.audit = AuditLog(audit_path)
        except OSError as e:
            raise StartupError(
                f"state.audit_file: cannot open {audit_path}: {e.strerror or e}"
            ) from None
        m = cfg.metrics
        try:
            self.metric_store = MetricStore(
                os.path.join(cfg.state.dir, "metrics.sqlite"),
                max_points_per_series=m.max_points_per_series,
                max_points_per_run=m.max_points_per_run,
                queue_size=m.queue_size,
            )
        except (OSError, sqlite3.Error) as e:
            fault = fs_fault_message(cfg.state.dir)
            raise StartupError(
                f"state.dir: {fault or f'cannot open metrics.sqlite: {e}'}"
            ) from None
        try:
            hooks = webhooks.load(cfg.webhooks)
        except ValueError as e:
            raise StartupError(str(e)) from None
        # rows left by hooks since removed from the config are given up, each with its line
        pending = hooks or self.store.outbox_depth()
        self.deliveries = webhooks.Deliveries(self.store, cfg.webhooks, hooks) if pending else None
        self.jobs = Jobs(cfg, self.registry, self.pool, self.store)
        # runs' capability URLs, and the hook that gives a run's ranks one (and at the
        # run's end revokes it and closes the forwards)
        self.caps = Capabilities()
        self.run_env = make_run_env(self.pool, cfg, self.caps, bound=self.bound)
        self.runs = Runs(cfg, self.jobs, self.registry, run_env=self.run_env)
        self.runs.on_ended(self.run_env.ended)
        runs = self.runs if runs is None else runs  # the daemon's own runs, unless given
        self.runs.on_deleted(self._prune_metrics)
        self.sampler = (
            NodeSampler(m.sample_interval_s, runs, self.registry, self.pool, self.metric_store)
            if m.sample_interval_s > 0
            else None
        )
        self.preflight = Preflight(cfg, self.pool, self.registry)
        self.app = api.make_app(
            self.registry,
            self.jobs,
            preflight=self.preflight,
            tokens=tokens,
            audit=self.audit,
            metric_store=self.metric_store,
            run_lookup=runs,
            max_body_bytes=cfg.server.max_body_bytes,
            max_streams=cfg.server.max_streams,
            policy=Policy.from_config(cfg.server),
            runs=self.runs,
            caps=self.caps,
        )
        self.http: Any = None  # waitress's server, once bound (private parts: test_internals)
        self.url: str | None = None
        self._stop = threading.Event()

    # --- life cycle -----------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or stop()); returns the exit code."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        code = 0
        raise_fd_limit()
        self.registry.start()
        try:
            self.runs.start()  # the holds first: a job re-attached may wait for them
            if self.deliveries is not None:  # pending deliveries resume (a restart's too)
                self.deliveries.start()
            self.jobs.start()
            if self.sampler is not None:
                self.sampler.start()
            self._prune()
            threading.Thread(target=self._retain, name="retention", daemon=True).start()
            self.http = self._bind()
            http_thread = threading.Thread(target=self.http.run, name="http", daemon=True)
            http_thread.start()
            first = self.cfg.discovery.timeout_s + self.cfg.ssh.connect_timeout_s + 1.0
            if not self.registry.wait_first_pass(first):
                log.warning("first probe pass not finished after %.0fs; serving anyway", first)
            log.info("serving on %s", self.url)
            self._notify(f"READY=1\nSTATUS={self.status()}")
            supervisor = threading.Thread(
                target=self._supervise, args=(http_thread,), name="supervisor", daemon=True
            )
            supervisor.start()
            while not self._stop.wait(1.0):
                if not http_thread.is_alive():
                    log.error("the HTTP server loop stopped unexpectedly; shutting down")
                    code = 1
                    break
            log.info("stopping")
            self._notify("STOPPING=1")
            self._drain(http_thread)
        finally:
            self._stop.set()
            self.runs.stop()
            if self.sampler is not None:
                self.sampler.stop()
            self.jobs.stop()
            if self.deliveries is not None:
                self.deliveries.stop()
            self.registry.stop()
            self.pool.close()
            self.audit.close()
            self.metric_store.close()
        log.info("stopped")
        return code

    def _prune_metrics(self, run_id: int) -> None:
        """A deleted run's metrics go with it."""
        self.metric_store.delete_run(run_id)

    def stop(self) -> None:
        """Ask run() to shut down (what SIGTERM does)."""
        self._stop.set()

    def _bind(self) -> Any:
        s = self.cfg.server
        try:
            http = http_server(logs.errors_to_log(self.app), s.host, s.port, s.threads)
        except OSError as e:
            raise StartupError(
                f"server: cannot listen on {s.host}:{s.port}: {e.strerror or e}"
            ) from None
        if not hasattr(http, "effective_port"):  # a name resolving to several addresses
            http.close()
            raise StartupError(
                f"server.host: {s.host!r} resolves to several addresses; give one IP"
            )
        host = http.effective_host
        self.url = (
            f"http://[{host}]:{http.effective_port}"
            if ":" in host
            else f"http://{host}:{http.effective_port}"
        )
        return http

    def bound(self) -> tuple[str, int] | None:
        """The (host, port) the API listens on, once bound."""
        http = self.http
        if http is None:
            return None
        return str(http.effective_host), int(http.effective_port)

    def _drain(self, http_thread: threading.Thread) -> None:
        """Stop accepting, give in-flight requests DRAIN_S, then close everything."""
        http = self.http
        self._in_loop(lambda: wasyncore.dispatcher.close(http))  # the listening socket
        tasks = http.task_dispatcher
        deadline = time.monotonic() + DRAIN_S
        while (tasks.active_count or tasks.queue) and time.monotonic() < deadline:
            time.sleep(0.05)
        if tasks.active_count:
            log.warning(
                "closing %d request(s) still running after %.0fs", tasks.active_count, DRAIN_S
            )
        self._in_loop(lambda: wasyncore.close_all(http._map))
        tasks.shutdown(timeout=2.0)
        http_thread.join(5.0)

    def _in_loop(self, thunk: Callable[[], object]) -> bool:
        """Run thunk in the HTTP loop's thread; False once the loop has shut its trigger."""
        try:
            self.http.trigger.pull_trigger(thunk)
            return True
        except OSError:  # the loop closed its trigger (and with it everything): it is ending
            return False

    # --- supervision ----------------------------------------------------------------

    def _prune(self) -> None:
        """Remove finished jobs past state.keep_days / state.max_bytes (never a running one),
        and runs that ended more than state.keep_days ago."""
        try:
            removed = self.store.prune(self.cfg.state.keep_days, self.cfg.state.max_bytes)
        except (OSError, sqlite3.Error) as e:
            log.warning("retention: %s", e)
            return
        if removed:
            log.info("retention: removed %d finished job(s)", len(removed))
        try:  # ended runs with their metrics, by the same rule
            runs = self.runs.prune(self.cfg.state.keep_days)
        except (OSError, sqlite3.Error, StoreError) as e:
            log.warning("retention: runs: %s", e)
        else:
            if runs:
                log.info("retention: removed %d ended run(s) and their metrics", len(runs))
        try:
            self.audit.rotate(self.cfg.state.keep_days)
        except OSError as e:
            log.warning("retention: audit log: %s", e.strerror or e)

    def _retain(self) -> None:
        while not self._stop.wait(PRUNE_EVERY_S):
            self._prune()

    def _http_alive(self, http_thread: threading.Thread) -> bool:
        if not http_thread.is_alive():
            return False
        answered = threading.Event()
        return self._in_loop(answered.set) and answered.wait(LOOP_CHECK_S)

    def _supervise(self, http_thread: threading.Thread) -> None:
        interval = sdnotify.watchdog_interval()
        every = interval / 2 if interval else STATUS_EVERY_S
        while not self._stop.wait(every):
            self._probe_store()
            healthy = self.registry.alive() and self._http_alive(http_thread)
            message = f"STATUS={self.status()}"
            if interval and healthy:
                message += "\nWATCHDOG=1"
            elif interval:
                log.error(
                    "not healthy (registry alive: %s); withholding the watchdog ping",
                    self.registry.alive(),
                )
            self._notify(message)

    def _probe_store(self) -> None:
        """Write to the store once: a store that became read-only (or full) makes the
        daemon degraded (/healthz, POSTs refused) until a write succeeds; one log line per
        change."""
        before = self.store.fault
        try:
            self.store.probe_write()
        except StoreError as e:
            if before is None or before.reason != e.reason:
                log.error("state.dir: %s; degraded until it can be written", e)
            return
        if before is not None:
            log.warning("state.dir: writable again (was %s)", before.reason)

    def status(self) -> str:
        """One line: '3/4 nodes Running, 1 job running'."""
        nodes = self.registry.nodes()
        up = sum(1 for n in nodes if n.phase == Phase.RUNNING)
        running = self.jobs.counts().get(JobState.RUNNING, 0)
        stale = ", DNS stale" if self.registry.stale else ""
        return (
            f"{up}/{len(nodes)} nodes Running, {running} job{'' if running == 1 else 's'} running"
            f"{stale}; API on {self.url}"
        )

    @staticmethod
    def _notify(state: str) -> None:
        try:
            sdnotify.notify(state)
        except OSError as e:
            log.warning("sd_notify failed: %s", e)
