"""Prometheus collectors, all on one registry (``REGISTRY``, not the global default).

Other modules import this one and update the collectors; the names are stable:

=====================================  =========  ==============  ================================
metric                                 type       labels          updated by
=====================================  =========  ==============  ================================
mlbench_daemon_nodes                   gauge      phase           nodes (count per phase)
mlbench_daemon_probe_latency_seconds   histogram  -               nodes (successful SSH probes)
mlbench_daemon_probe_failures_total    counter    reason          nodes (SSHError.reason)
mlbench_daemon_jobs                    gauge      state           jobs (count per state)
mlbench_daemon_jobs_stalled            gauge      -               jobs (running jobs whose output
                                                                  has not grown for stall_after_s)
mlbench_daemon_job_duration_seconds    histogram  -               jobs (finished jobs)
mlbench_daemon_job_failures_total      counter    kind            jobs (each job that ends other
                                                                  than succeeded, by failure kind)
mlbench_daemon_ssh_reconnects_total    counter    -               ssh (each new connection after
                                                                  the first to a host)
mlbench_daemon_http_requests_total     counter    route, method,  api (route = the route pattern,
                                                  status          not the raw path)
mlbench_daemon_dns_member_misses_total counter    reason          discovery (each SRV target's
                                                                  address lookup that found none:
                                                                  nxdomain, nodata, dns-error)
mlbench_daemon_refused_requests_total  counter    reason          api (each refused request, by
                                                                  vocabulary.Refusal: no-token,
                                                                  bad-token, revoked, role,
                                                                  not-owner, host, origin,
                                                                  media-type)
mlbench_daemon_webhook_deliveries_     counter    hook, outcome   webhooks (each delivery attempt:
total                                                             delivered, retry, gave-up)
mlbench_daemon_webhook_outbox          gauge      -               webhooks (events not yet
                                                                  delivered nor given up)
=====================================  =========  ==============  ================================

``render()`` gives the exposition text and its content type for ``GET /metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from mlbench_daemon.vocabulary import JobState, Phase, Refusal, StoreReason

if TYPE_CHECKING:  # nodes imports nothing of this module; only the type is needed
    from mlbench_daemon.nodes import NodeStatus

REGISTRY = CollectorRegistry(auto_describe=True)
_NS = "mlbench_daemon"

nodes_by_phase = Gauge(
    "nodes", "Discovered nodes by phase", ["phase"], namespace=_NS, registry=REGISTRY
)
probe_latency_seconds = Histogram(
    "probe_latency_seconds",
    "SSH probe round-trip time",
    namespace=_NS,
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
probe_failures_total = Counter(
    "probe_failures", "Failed SSH probes by reason", ["reason"], namespace=_NS, registry=REGISTRY
)
jobs = Gauge("jobs", "Jobs by state", ["state"], namespace=_NS, registry=REGISTRY)
jobs_stalled = Gauge(
    "jobs_stalled",
    "Running jobs whose output has not grown for their stall_after_s (a stall under way)",
    namespace=_NS,
    registry=REGISTRY,
)
job_duration_seconds = Histogram(
    "job_duration_seconds",
    "Wall time of finished jobs",
    namespace=_NS,
    registry=REGISTRY,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
job_failures_total = Counter(
    "job_failures",
    "Jobs that did not succeed, by failure kind (README: troubleshooting)",
    ["kind"],
    namespace=_NS,
    registry=REGISTRY,
)
ssh_reconnects_total = Counter(
    "ssh_reconnects", "SSH connections re-established", namespace=_NS, registry=REGISTRY
)
http_requests_total = Counter(
    "http_requests",
    "HTTP requests served",
    ["route", "method", "status"],
    namespace=_NS,
    registry=REGISTRY,
)
dns_member_misses_total = Counter(
    "dns_member_misses",
    "SRV targets' address lookups that found no address, by reason (cached misses not counted)",
    ["reason"],
    namespace=_NS,
    registry=REGISTRY,
)

refused_requests_total = Counter(
    "refused_requests",
    "Requests refused, by reason (vocabulary.Refusal); each is also an audit log line",
    ["reason"],
    namespace=_NS,
    registry=REGISTRY,
)
for _why in Refusal:  # every reason shows from the start, at 0
    refused_requests_total.labels(_why)


webhook_deliveries_total = Counter(
    "webhook_deliveries",
    "Webhook delivery attempts, by hook and outcome (vocabulary.Delivery)",
    ["hook", "outcome"],
    namespace=_NS,
    registry=REGISTRY,
)
webhook_outbox = Gauge(
    "webhook_outbox",
    "Webhook events waiting in the outbox (not yet delivered nor given up)",
    namespace=_NS,
    registry=REGISTRY,
)


def observe_probe(status: NodeStatus) -> None:
    """One node's new probe result (the registry's on_probe hook)."""
    if status.phase == Phase.RUNNING and status.latency_ms is not None:
        probe_latency_seconds.observe(status.latency_ms / 1000)
    elif status.phase in (Phase.UNKNOWN, Phase.FAILED):
        probe_failures_total.labels(status.reason).inc()


state_fault = Gauge(
    "state_fault",
    "1 while the state dir cannot be written, by reason",
    ["reason"],
    namespace=_NS,
    registry=REGISTRY,
)


def set_state_fault(reason: str | None) -> None:
    """The store's current fault (None: writable), at scrape time."""
    for r in StoreReason:
        state_fault.labels(r).set(1 if r == reason else 0)


def set_gauges(nodes: Iterable[NodeStatus], job_counts: Mapping[str, int]) -> None:
    """Nodes by phase and jobs by state, as they are now (called at scrape time)."""
    for phase in Phase:
        nodes_by_phase.labels(phase).set(sum(1 for n in nodes if n.phase == phase))
    for state in JobState:
        jobs.labels(state).set(job_counts.get(state, 0))


capability_requests_total = Counter(
    "capability_requests",
    "Requests that came in through a run's capability URL and reached their route (refused "
    "ones count in refused_requests, reason capability)",
    namespace=_NS,
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    """-> (body bytes, content type) of the whole registry."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
