"""Fixtures for the multi-node tests: a real Ray cluster of separate `ray start`
processes (cluster_kit.py), each worker with its own disk, plus moto's S3 server on
127.0.0.1 as the shared storage. Each fixture stops exactly what it started."""

from __future__ import annotations

import os

import pytest
from cluster_kit import namespaces_available, start_cluster

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NODE_LOCAL = "/tmp/tuneqdm-node-local"  # a private tmpfs on every worker node


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (0 CPUs) and two workers (1 CPU, 1 logical GPU each) on 127.0.0.2-4."""
    reason = namespaces_available()
    if reason is not None:
        pytest.skip(f"multi-node tests need mount namespaces: {reason}")
    root = tmp_path_factory.mktemp("cluster")
    cluster = start_cluster(root, workers=2, node_local=[NODE_LOCAL])
    try:
        yield cluster
    finally:
        cluster.stop()
