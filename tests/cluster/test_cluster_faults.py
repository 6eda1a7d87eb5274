"""Faults on the real multi-node cluster: a worker node killed mid-run (its subjects
are retried on the other node, none lost, no hang), and the pipeline's metrics on the
nodes' Prometheus endpoints afterwards. `submit` runs as a Ray Job on the head;
photos, manifest and output live on moto S3."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "pipeline"))
from pipeline_testkit import copy_photos  # noqa: E402

SUBJECTS = ("dog", "cat", "teapot", "backpack", "clock")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    from tuneqdm.testing import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd"))


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def _upload_run(endpoint: str, bucket: str, tmp_path: Path) -> str:
    """Photos on S3, and a subjects.csv naming them; returns the manifest's path."""
    client = _s3(endpoint)
    client.create_bucket(Bucket=bucket)
    lines = ["subject_id,images,class"]
    for subject in SUBJECTS:
        source = "dog" if subject in ("robot", "clock") else subject
        for photo in sorted(copy_photos(source, tmp_path / subject, 2).iterdir()):
            client.upload_file(str(photo), bucket, f"photos/{subject}/{photo.name}")
        lines.append(f"{subject},s3://{bucket}/photos/{subject}/,{subject}")
    manifest = tmp_path / "subjects.csv"  # read by the driver on the head
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest)


def _entrypoint(manifest: str, output: str, base: str, endpoint: str, *extra: str) -> str:
    return " ".join([sys.executable, "-m", "tuneqdm_cli", "submit", manifest,
                     "--output", output, "--base-model", base, "--steps", "24",
                     "--lr-scale-out", "1e-3", "--samples", "0", "--cpus-per-actor", "1",
                     "--storage-option", f"endpoint_url={endpoint}",
                     "--storage-option", "client_kwargs.region_name=us-east-1", *extra])


def _metric_sum(text: str, name: str, run: str) -> float:
    """The sum over every series of metric `name` (any prefix, `_total` or not) tagged
    with run id `run`."""
    pattern = rf"^\w*{name}(?:_total)?\{{([^}}]*)\}} ([0-9.eE+-]+)$"
    return sum(float(match.group(2)) for match in re.finditer(pattern, text, re.M)
               if f'run="{run}"' in match.group(1))


def _training_actor(logs: str) -> str | None:
    """The actor of the latest subject that started and has not finished, per the
    driver's log ("started  <id> on <actor>", "done     <id> ...")."""
    started: dict[str, str] = {}
    for line in logs.splitlines():
        words = line.split()
        if line.startswith("started  ") and len(words) >= 4:
            started[words[1]] = words[3]
        elif line.startswith("done     ") and len(words) >= 2:
            started.pop(words[1], None)
    return list(started.values())[-1] if started else None


def _node_of_actor(cluster, name: str):
    """The cluster kit's worker node that runs the live actor called `name`."""
    from ray.util.state import list_actors

    (actor,) = list_actors(address=cluster.dashboard_url,
                           filters=[("name", "=", name), ("state", "=", "ALIVE")])
    ip = {n["node_id"]: n["node_ip"] for n in cluster.nodes()}[actor.node_id]
    return next(node for node in cluster.live_workers() if node.ip == ip)


def _tracker_node(cluster, run: str) -> str:
    """Where the run's progress tracker ran, and its state (for failure messages)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url,
                         filters=[("name", "=", f"tuneqdm-progress-{run}")], detail=True)
    ips = {n["node_id"]: n["node_ip"] for n in cluster.nodes()}
    return ", ".join(f"{a.state} on {ips.get(a.node_id, a.node_id)}" for a in actors)


GAUGES = ("tuneqdm_subjects_running", "tuneqdm_train_steps_per_second")


def test_a_worker_node_killed_mid_run_loses_no_subject(cluster, s3_endpoint, tiny_base,
                                                       tmp_path):
    from ray.job_submission import JobSubmissionClient

    manifest = _upload_run(s3_endpoint, "node-kill", tmp_path)
    output = "s3://node-kill/out"
    job = cluster.submit_job(
        _entrypoint(manifest, output, tiny_base, s3_endpoint, "--schedule-timeout", "60",
                    "--address", "auto"),
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    # the gauges are live values (Ray drops a dead process's gauges within two export
    # intervals), so they are read from the nodes' /metrics while the run goes on
    gauges_seen: set[str] = set()
    texts: list[str] = []  # every scrape of the nodes' /metrics

    def watch(until):
        def check(logs: str) -> bool:
            texts.append(cluster.metrics_text())
            gauges_seen.update(name for name in GAUGES if name in texts[-1])
            return until(logs)
        return check

    # once the first subject is done, kill the node of an actor that is training one
    # (on a busy machine one actor may do every subject while the other still loads)
    status, logs = cluster.wait_job(
        job, timeout_s=600,
        until=watch(lambda text: "done     " in text and _training_actor(text)))
    assert status == "RUNNING", logs[-3000:]
    victim = _node_of_actor(cluster, _training_actor(logs))
    killed_at = time.monotonic()
    victim.kill()
    cluster.wait_job(job, timeout_s=600, until=watch(lambda text: "(attempt 2)" in text))
    recovered_at = time.monotonic()  # the lost subject started again on a live actor
    status, logs = cluster.wait_job(job, timeout_s=600,  # bounded: no hang
                                    until=watch(lambda text: False))
    ended_at = time.monotonic()
    assert status == "SUCCEEDED", logs[-4000:]
    summary = json.loads(_s3(s3_endpoint).get_object(
        Bucket="node-kill", Key="out/summary.json")["Body"].read())
    assert summary["counts"] == {"total": len(SUBJECTS), "done": len(SUBJECTS)}
    assert {r["status"] for r in summary["subjects"]} == {"done"}
    retried = [r["subject_id"] for r in summary["subjects"] if r["attempts"] >= 2]
    assert retried, logs[-4000:]  # the kill landed mid-training
    assert summary["actors_replaced"]
    retry_lines = [line for line in logs.splitlines() if line.startswith("retry    ")]
    assert retry_lines
    print(f"\nnode kill: lost subject restarted {recovered_at - killed_at:.1f} s and the "
          f"job ended {ended_at - killed_at:.1f} s after the kill; "
          f"retried {retried}; replaced {summary['actors_replaced']}; "
          f"dropped {summary['actors_dropped']}; run {summary['seconds']} s")

    # the pipeline's metrics on the nodes' Prometheus endpoints: the gauges seen during
    # the run, the run's final counts after it (the driver let them reach the export)
    assert gauges_seen == set(GAUGES), f"seen during the run: {sorted(gauges_seen)}"
    retries = sum(r["attempts"] - 1 for r in summary["subjects"])
    run = summary["run_id"]

    def final(name: str) -> float:  # counters only grow: the largest value scraped
        return max(_metric_sum(text, name, run) for text in texts)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a busy node's agent may miss a scrape
        texts.append(cluster.metrics_text())
        if final("tuneqdm_subjects_finished") >= len(SUBJECTS):
            break
        time.sleep(2)
    ours = "\n".join(line for line in texts[-1].splitlines() if "tuneqdm_subjects" in line)
    where = _tracker_node(cluster, run)
    assert final("tuneqdm_subjects_finished") == len(SUBJECTS), (where, ours)
    assert final("tuneqdm_subjects_retried") == retries, (where, ours)
    JobSubmissionClient(cluster.dashboard_url).delete_job(job)


def _alive_finetuners(cluster) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")],
                         limit=1000)
    return [a.name for a in actors if (a.name or "").startswith("tuneqdm-finetuner-")]


def _objects(endpoint: str, bucket: str, prefix: str) -> list[str]:
    pages = _s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                    Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_the_driver_killed_mid_run_then_the_same_submit_again(cluster, s3_endpoint,
                                                              tiny_base, tmp_path):
    """SIGKILL to the submit driver mid-run: Ray ends its actors with it; the same
    submit again retrains nothing finished, quantizes nothing, and leaves no checkpoint
    behind. Both jobs run with a job runtime environment that sets HF_HUB_OFFLINE, which
    the CLI forwards to its workers too (test_cluster_submit.py runs a job without)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    manifest = _upload_run(s3_endpoint, "driver-kill", tmp_path)
    entry = _entrypoint(manifest, "s3://driver-kill/out", tiny_base, s3_endpoint,
                        "--checkpoint-every", "4", "--address", "auto")
    # a job runtime environment that sets a variable the CLI forwards too (both are
    # merged, issue 10's "ray job submit --runtime-env-json" case)
    env = {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}}
    first = cluster.submit_job(entry, runtime_env=env)
    status, logs = cluster.wait_job(first, timeout_s=600,
                                    until=lambda text: "done     " in text)
    assert status == "RUNNING", logs[-3000:]
    os.kill(int(client.get_job_info(first).driver_info.pid), signal.SIGKILL)
    status, logs = cluster.wait_job(first, timeout_s=120)
    assert status in ("FAILED", "STOPPED"), logs[-3000:]
    deadline = time.monotonic() + 60  # Ray ends the dead driver's actors
    while _alive_finetuners(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    assert _alive_finetuners(cluster) == []
    finished = {key.split("/")[2] for key in _objects(s3_endpoint, "driver-kill",
                                                      "out/subjects/")
                if key.endswith("/done.json")}
    assert finished and finished < set(SUBJECTS), finished

    second = cluster.submit_job(entry, runtime_env=env)
    status, logs = cluster.wait_job(second, timeout_s=600)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "base: reusing" in logs and "quantizing" not in logs, logs[-4000:]
    assert f"resume: {len(finished)} subject(s) already finished" in logs, logs[-4000:]
    summary = json.loads(_s3(s3_endpoint).get_object(
        Bucket="driver-kill", Key="out/summary.json")["Body"].read())
    status_of = {r["subject_id"]: r["status"] for r in summary["subjects"]}
    assert status_of == {s: "reused" if s in finished else "done" for s in SUBJECTS}
    leftovers = [key for key in _objects(s3_endpoint, "driver-kill", "out/")
                 if "checkpoint" in key]
    assert leftovers == []
    resumed = [line for line in logs.splitlines() if line.startswith("resumed  ")]
    print(f"\ndriver kill: {len(finished)} finished before the kill and reused, "
          f"{len(SUBJECTS) - len(finished)} trained again; resumed from checkpoints: "
          f"{resumed}")
    for job in (first, second):
        client.delete_job(job)
