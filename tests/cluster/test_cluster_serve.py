"""Serve on the multi-node cluster: two replicas on two nodes serve subjects from S3
(written by the artefact store as `submit` writes them); one replica's node is
killed and requests succeed again after Serve recovers. The gap (seconds from the
kill to the first success after which every request succeeds) is measured, printed
and bounded."""

from __future__ import annotations

import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_kit import free_port

from tuneqdm.testing import load_script

SERVE_COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_common.py"
BUCKET = "serve-cluster"
SUBJECTS = ("subject-000", "subject-001")  # serve_common.subject_ids(2)
REPLICA_CLASS = "ServeReplica:tuneqdm:SubjectModel"
MAX_GAP_S = 90.0  # node death is noticed by health checks: seconds, not minutes


def _cli(*args: str) -> str:
    return " ".join([shlex.quote(sys.executable), "-m", "tuneqdm_cli",
                     *(shlex.quote(a) for a in args)])


def _serve_common():
    """benchmarks/serve_common.py, imported by path (its synthetic subjects)."""
    return load_script(SERVE_COMMON)


@pytest.fixture(scope="module")
def served_s3(s3_endpoint, tmp_path_factory) -> str:
    """s3://serve-cluster/out: the tiny base and two subjects, written by the artefact
    store exactly as `submit` writes them (benchmarks/serve_common.py: synthetic scale
    sets; test_cluster_submit.py trains through a Ray Job), then copied to moto's S3."""
    import boto3

    from pipeline.store import Storage

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    local = _serve_common().prepare_output(tmp_path_factory.mktemp("serve-cluster"),
                                           len(SUBJECTS))
    output = f"s3://{BUCKET}/out"
    Storage(output, {"endpoint_url": s3_endpoint}).upload_dir(local, "")
    return output


def _replica_nodes(cluster) -> dict[str, str]:
    """ALIVE SubjectModel replica actors -> their node ids (Ray's state API)."""
    url = f"{cluster.dashboard_url}/api/v0/actors?limit=1000&detail=true"
    with urllib.request.urlopen(url, timeout=10) as response:
        actors = json.loads(response.read())["data"]["result"]["result"]
    return {a["actor_id"]: a["node_id"] for a in actors
            if a.get("class_name") == REPLICA_CLASS and a.get("state") == "ALIVE"}


def _wait_replicas(cluster, ips: list[str], timeout_s: float) -> list[str]:
    """Wait until the ALIVE replicas sit exactly on the nodes `ips` (one each)."""
    deadline = time.monotonic() + timeout_s
    placed: list[str] = []
    while time.monotonic() < deadline:
        cluster.check_processes()  # a node that died by itself: fail with its log
        node_ips = {n["node_id"]: n["node_ip"] for n in cluster.nodes()}
        placed = sorted(node_ips.get(node, "?") for node in _replica_nodes(cluster).values())
        if placed == sorted(ips):
            return placed
        time.sleep(1.0)
    raise AssertionError(f"replicas on {placed}, wanted one on each of {sorted(ips)}")


def _generate(url: str, subject_id: str, seed: int, timeout_s: float = 20.0) -> dict | None:
    """One POST /v1/subjects/{id}/images; its JSON, or None on any failure."""
    body = json.dumps({"prompt": "a photo of {token} {class_noun}",
                       "num_inference_steps": 2, "seed": seed}).encode()
    request = urllib.request.Request(f"{url}/v1/subjects/{subject_id}/images", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _wait_serving(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_generate(url, s, 0) for s in SUBJECTS):
            return
        time.sleep(1.0)
    raise AssertionError(f"{url} did not serve {list(SUBJECTS)} within {timeout_s} s")


def measure_gap(url: str, kill, budget_s: float, settle: int = 6,
                observe_s: float = 30.0) -> dict:
    """Send requests (alternating subjects) in a loop, call `kill()` after a few
    successes, and stop once the last `settle` requests succeeded and `observe_s` have
    passed since the kill (long enough for Ray to declare the node dead), or after
    `budget_s`. Returns the requests after the kill and the gap in seconds."""
    events: list[tuple[float, float, bool]] = []  # (start, end, ok) relative to kill
    killed_at, streak, seed = None, 0, 1
    start = time.monotonic()
    while time.monotonic() - start < budget_s:
        if killed_at is None and len(events) >= 4:
            kill()
            killed_at = time.monotonic()
        t0 = time.monotonic()
        ok = _generate(url, list(SUBJECTS)[seed % 2], seed) is not None
        events.append((t0, time.monotonic(), ok))
        seed += 1
        if killed_at is not None:
            streak = streak + 1 if ok else 0
            if streak >= settle and time.monotonic() - killed_at >= observe_s:
                break
        if not ok:
            time.sleep(0.2)
    assert killed_at is not None, "no requests succeeded before the kill"
    after = [(s - killed_at, e - killed_at, ok) for s, e, ok in events if e > killed_at]
    bad = [e for _, e, ok in after if not ok]
    slowest = max((e - s for s, e, _ in after), default=0.0)
    # the gap: from the kill to the end of the last failed request, or of the most
    # blocked one if that came later (a request that waited for recovery and succeeded)
    blocked = [e for s, e, ok in after if ok and e - s >= 0.5 * slowest and slowest > 5]
    return {"requests_after_kill": len(after), "failed": len(bad), "streak": streak,
            "gap_s": round(max([0.0, *bad, *blocked]), 2),
            "slowest_request_s": round(slowest, 2)}


def test_serve_survives_losing_a_replica_node(cluster, served_s3):
    port = free_port()
    job = cluster.submit_job(_cli(
        "serve", served_s3, "--address", "auto", "--detach", "--host", "127.0.0.1",
        "--port", str(port), "--proxy-location", "HeadOnly", "--replicas", "2",
        "--num-gpus-per-replica", "1", "--num-cpus-per-replica", "0.5", "--device", "cpu"))
    try:
        status, logs = cluster.wait_job(job, timeout_s=600)
        assert status == "SUCCEEDED", logs[-3000:]
        url = f"http://127.0.0.1:{port}"
        _wait_serving(url, timeout_s=180)
        victim, survivor = cluster.live_workers()
        _wait_replicas(cluster, [victim.ip, survivor.ip], timeout_s=90)  # not two on one

        result = measure_gap(url, victim.kill, budget_s=150)
        print(f"serve recovery after losing a replica node: {json.dumps(result)}")
        assert result["streak"] >= 6, result  # every request succeeds again ...
        assert result["gap_s"] <= MAX_GAP_S, result  # ... soon
        _wait_replicas(cluster, [survivor.ip], timeout_s=120)  # the lost replica is gone

        newcomer = cluster.add_worker()  # a new node joins: Serve places the replica there
        _wait_replicas(cluster, [survivor.ip, newcomer.ip], timeout_s=300)
        assert all(_generate(url, s, 7) for s in SUBJECTS)
    finally:  # the replicas hold both GPUs: give them back to the other tests
        _shutdown_serve(cluster)


def _shutdown_serve(cluster) -> None:
    """Shut Serve down on the cluster (a Ray Job on the head, as the app came)."""
    code = ("import ray; from ray import serve; ray.init(address='auto', "
            "log_to_driver=False); serve.shutdown()")
    job = cluster.submit_job(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")
    status, logs = cluster.wait_job(job, timeout_s=120)
    assert status == "SUCCEEDED", logs[-3000:]
