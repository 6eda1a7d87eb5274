"""Fixtures for the multi-node tests: a real Ray cluster of separate `ray start`
processes (cluster_kit.py), each worker with its own disk, plus moto's S3 server on
127.0.0.1 as the shared storage. Each fixture stops exactly what it started."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cluster_kit import NODE_LOCAL, namespaces_available, start_cluster

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# moto accepts any credentials; given the way users give them (the environment)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 API on 127.0.0.1 (random port), the cluster's shared storage. Each
    test uses buckets of its own."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _session_cluster(s3_endpoint):
    """A head (0 CPUs) and two workers (1 CPU, 1 logical GPU each) on 127.0.0.2-4;
    every node reaches the moto S3 server through the standard AWS variables. One
    cluster for the whole group: starting one costs ~10 s of the two cores."""
    reason = namespaces_available()
    if reason is not None:
        pytest.skip(f"multi-node tests need mount namespaces: {reason}")
    # a short root: Ray's socket paths under it must stay within AF_UNIX's 107 bytes
    # (pytest's tmp paths plus Ray's session name and a 5-digit pid do not)
    root = Path(tempfile.mkdtemp(prefix="tqc-", dir="/tmp"))
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    cluster = start_cluster(root, workers=2, node_local=[NODE_LOCAL], env=env)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(_session_cluster):
    """The shared cluster with two live workers: a node that an earlier test killed
    is replaced by a new one on the next loopback address (and its own tmpfs)."""
    _session_cluster.ensure_workers(2)
    return _session_cluster
