"""Shared fixtures for the pipeline tests: one local Ray (2 CPUs, small object store)
and one moto S3 server on 127.0.0.1 per session, each stopped by the fixture that
started it (never `ray stop`); a tiny quantizable pipeline built offline; helpers to
write subject CSVs are in pipeline_testkit.py."""

from __future__ import annotations

import os
import socket

import pytest

# Before Ray starts: its workers inherit this environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Metrics exported every second (Ray's default: 10 s): a run on a Ray that outlives
# it waits one export interval for its final counts (pipeline/run.py).
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Credentials for moto (it accepts any) the way users give them: in the environment,
# which s3fs reads (storage options refuse them), inherited by Ray's workers.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


METRICS_PORT: list[int] = []  # Ray's Prometheus endpoint, when ray_session started Ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance for the whole session (namespace "tuneqdm"); its metrics
    endpoint's port in METRICS_PORT."""
    import ray

    if ray.is_initialized():  # started by someone else in this process: leave it be
        yield ray
        return
    METRICS_PORT.append(_free_port())
    ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False,
             namespace="tuneqdm", log_to_driver=False, configure_logging=False,
             _temp_dir=None, _metrics_export_port=METRICS_PORT[0])
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def ray_metrics_url(ray_session) -> str:
    """ray_session's Prometheus endpoint (skips when Ray was started elsewhere)."""
    if not METRICS_PORT:
        pytest.skip("Ray was started elsewhere: its metrics port is not known")
    return f"http://127.0.0.1:{METRICS_PORT[0]}/metrics"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on 127.0.0.1 (random port); yields storage options for s3fs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {"endpoint_url": f"http://{host}:{port}",
               "client_kwargs": {"region_name": "us-east-1"}}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket (named after the test) on the moto server."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-")
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"],
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory):
    """A tiny float StableDiffusionPipeline folder (16 px images), built offline once."""
    from tuneqdm.testing import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd"))
