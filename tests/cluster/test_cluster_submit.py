"""`tuneqdm-pipeline submit` as a Ray Job on a three-node cluster (cluster_kit.py).

The driver runs on the head, in the head's view of the disk; photos live on the
driver's node-local disk, which the workers cannot see, so the driver must ship them.
The base folder and moto's S3 are shared.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from cluster_kit import NODE_LOCAL

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "dreambooth"
SUBJECTS = {"dog": "dog", "cat": "cat", "backpack": "backpack"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from tuneqdm.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("cluster-base") / "sd")


@pytest.fixture
def driver_photos():
    """A subjects CSV and photos on the DRIVER's node-local disk (absent on workers)."""
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"{DREAMBOOTH} is not available")
    root = Path(NODE_LOCAL) / f"driver-{uuid.uuid4().hex[:8]}"
    lines = ["subject_id,images,class"]
    for subject_id, folder in SUBJECTS.items():
        target = root / "photos" / subject_id
        target.mkdir(parents=True)
        for photo in sorted((DREAMBOOTH / folder).glob("*.jpg"))[:2]:
            shutil.copy(photo, target / photo.name)
        lines.append(f"{subject_id},{target},{subject_id}")
    (root / "subjects.csv").write_text("\n".join(lines) + "\n")
    try:
        yield root / "subjects.csv"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"run-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(
        Bucket=name)
    return name


def s3_json(s3_endpoint: str, uri: str) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing",
                           client_kwargs={"endpoint_url": s3_endpoint})
    return json.loads(fs.cat_file(uri))


def submit_entrypoint(csv: Path, output: str, base: Path, *extra: str) -> str:
    args = [sys.executable, "-m", "tuneqdm_cli", "submit", str(csv), "--output", output,
            "--base-model", str(base), "--steps", "3", "--batch-size", "1",
            "--lr-scale-out", "5e-3", "--samples", "0", "--device", "cpu", *extra]
    return shlex.join(args)


def test_submit_as_job_trains_every_subject_on_s3(cluster, s3_endpoint, tiny_base,
                                                   driver_photos):
    """A job without a runtime environment (test_cluster_faults.py's driver-kill jobs
    run with one that sets a variable the CLI forwards too)."""
    output = f"s3://{bucket(s3_endpoint)}/run"
    job = cluster.submit_job(submit_entrypoint(driver_photos, output, tiny_base))
    status, logs = cluster.wait_job(job, timeout_s=400)
    assert status == "SUCCEEDED", logs[-4000:]
    summary = s3_json(s3_endpoint, f"{output}/summary.json")
    assert summary["counts"]["done"] == len(SUBJECTS), summary["counts"]
    assert {row["status"] for row in summary["subjects"]} == {"done"}


def test_local_output_is_refused_on_a_multi_node_cluster(cluster, tiny_base, driver_photos):
    output = str(Path(NODE_LOCAL) / "out")
    job = cluster.submit_job(submit_entrypoint(driver_photos, output, tiny_base))
    status, logs = cluster.wait_job(job, timeout_s=400)
    assert status == "FAILED", logs[-4000:]
    assert "s3://" in logs and "--shared-output" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
