"""Shared fixtures: the real namespace cluster (see tests/cluster/)."""

import os
import shutil

import pytest

from tests.cluster import Cluster

NEEDS = ["ip", "sshd", "dnsmasq", "mpirun", "mpicc", "nft", "ssh-keygen"]


def cluster_unavailable():
    if os.geteuid() != 0:
        return "the test cluster needs root (network namespaces)"
    missing = [c for c in NEEDS if not shutil.which(c) and not os.path.exists(f"/usr/sbin/{c}")]
    return f"missing programs: {', '.join(missing)}" if missing else None


def pytest_collection_modifyitems(config, items):
    why = cluster_unavailable()
    if why and os.environ.get("MLBENCH_REQUIRE_CLUSTER"):
        raise pytest.UsageError(f"cluster tests required but cannot run: {why}")
    if why:
        for item in items:
            if "cluster" in item.fixturenames or "make_cluster" in item.fixturenames:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def cluster_session():
    c = Cluster(workers=3, extra=1).build()
    try:
        yield c
    finally:
        c.teardown()


@pytest.fixture
def cluster(cluster_session):
    """The shared 3-worker (+1 dashboard host) cluster, healthy at the start of each test."""
    try:
        yield cluster_session
    finally:
        cluster_session.reset()


@pytest.fixture
def make_cluster():
    """Factory for a cluster of its own: make_cluster(workers=N, extra=0)."""
    made = []

    def make(workers=3, extra=0, **kw):
        c = Cluster(workers=workers, extra=extra, **kw).build()
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.teardown()
