"""Scale of `submit` on a local multi-node Ray cluster (docs/pipeline.md, "Scale").

Starts the test cluster of tests/cluster/cluster_kit.py (a head with 0 CPUs, two
workers with 1 CPU and 1 logical GPU each, private disks) and moto's S3 server as the
shared storage, then runs `python -m tuneqdm_cli submit` as a Ray Job twice:

1. many subjects (default 1,000) on the tiny test base, 2 steps each, no samples, the
   same two DreamBooth photos reused by every subject: wall time, driver-side overhead
   per subject, peak RSS of the driver process, and actor utilisation from the
   subjects' start/end timestamps in meta.json (busy fraction in steady state);
2. realistic step counts (default 20 subjects x 50 steps): the scheduling overhead, the
   actors' idle time between subjects as a share of their training time.

    python benchmarks/cluster_scale.py [--subjects 1000] [--quick] [--json PATH]

Needs root for the mount namespaces of the cluster kit (as the cluster tests do).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DREAMBOOTH = REPO.parent / "shared" / "dreambooth"
BUCKET = "scale-bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}
QUICK_PLANS = [(8, 2)]  # --quick (and the test that keeps this script working)
# The driver runs the CLI in-process and reports its own peak RSS when it exits.
DRIVER = ("import resource, runpy, sys\n"
          "sys.argv = ['tuneqdm_cli', *sys.argv[1:]]\n"
          "try:\n    runpy.run_module('tuneqdm_cli', run_name='__main__')\n"
          "finally:\n    print('DRIVER_PEAK_RSS_KB',"
          " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")


def cluster_kit():
    """tests/cluster/cluster_kit.py, imported by path (one kit for tests and this)."""
    spec = importlib.util.spec_from_file_location(
        "cluster_kit", REPO / "tests" / "cluster" / "cluster_kit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cluster_kit", module)
    spec.loader.exec_module(module)
    return module


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


OUTPUT = f"s3://{BUCKET}/runs"  # one output: later plans reuse the quantized base


def plan_id(count: int, steps: int) -> str:
    """The subject-id prefix of one plan's subjects."""
    return f"n{count}s{steps}"


def prepare(endpoint: str, workdir: Path, plans: list[tuple[int, int]]
            ) -> tuple[Path, list[Path]]:
    """The tiny base folder, the bucket with two photos, one CSV per plan."""
    from tuneqdm.testing import save_tiny_pipeline

    base = save_tiny_pipeline(workdir / "tiny-sd")
    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    for photo in sorted((DREAMBOOTH / "dog").glob("*.jpg"))[:2]:
        client.upload_file(str(photo), BUCKET, f"photos/dog/{photo.name}")
    csvs = []
    for count, steps in plans:
        rows = [f"{plan_id(count, steps)}-{i:05d},s3://{BUCKET}/photos/dog/,dog,sks"
                for i in range(count)]
        csv = workdir / f"subjects-{plan_id(count, steps)}.csv"
        csv.write_text("subject_id,images,class,token\n" + "\n".join(rows) + "\n")
        csvs.append(csv)
    return base, csvs


def run_submit(cluster, csv: Path, base: Path, output: str, steps: int,
               timeout_s: float) -> dict[str, Any]:
    """`submit` as a Ray Job; its wall time, driver RSS and summary.json."""
    args = ["submit", str(csv), "--output", output, "--base-model", str(base), "--steps",
            str(steps), "--samples", "0", "--address", "auto"]
    entry = " ".join([shlex.quote(sys.executable), "-c", shlex.quote(DRIVER),
                      *map(shlex.quote, args)])
    start = time.time()
    job = cluster.submit_job(entry)
    status, logs = cluster.wait_job(job, timeout_s=timeout_s)
    wall = time.time() - start
    if status != "SUCCEEDED":
        raise RuntimeError(f"submit job {status}:\n{logs[-3000:]}")
    rss = [line.split()[1] for line in logs.splitlines() if line.startswith("DRIVER_PEAK")]
    return {"job_wall_s": wall, "job_start": start, "driver_peak_rss_mb": int(rss[-1]) / 1024}


def read_metas(endpoint: str, prefix: str) -> list[dict[str, Any]]:
    """Every meta.json of the subjects whose ids start with `prefix`."""
    client = s3_client(endpoint)
    metas, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/subjects/{prefix}-",
                                      **({"ContinuationToken": token} if token else {}))
        for item in page.get("Contents", []):
            if item["Key"].endswith("/meta.json"):
                body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                metas.append(json.loads(body))
        if not page.get("IsTruncated"):
            return metas
        token = page["NextContinuationToken"]


def utilisation(metas: list[dict[str, Any]]) -> dict[str, float]:
    """Busy fraction of the actors in steady state (from the last actor's first start to
    the first actor's last end), and the mean idle gap between an actor's subjects."""
    by_actor: dict[str, list[tuple[float, float]]] = {}
    for meta in metas:
        by_actor.setdefault(meta["actor"], []).append(
            (meta["started_unix"], meta["finished_unix"]))
    spans = {a: sorted(v) for a, v in by_actor.items()}
    lo = max(v[0][0] for v in spans.values())
    hi = min(v[-1][1] for v in spans.values())
    if hi <= lo:  # no moment when every actor had work (few subjects): the whole run
        lo = min(v[0][0] for v in spans.values())
        hi = max(v[-1][1] for v in spans.values())
    busy = sum(max(0.0, min(e, hi) - max(s, lo)) for v in spans.values() for s, e in v)
    gaps = [b[0] - a[1] for v in spans.values() for a, b in itertools.pairwise(v)]
    trained = sum(e - s for v in spans.values() for s, e in v)
    return {"actors": len(spans),
            "busy_fraction": busy / (len(spans) * (hi - lo)),
            "mean_gap_s": sum(gaps) / len(gaps) if gaps else 0.0,
            "mean_subject_s": trained / len(metas), "idle_share": sum(gaps) / trained,
            "first_start": min(v[0][0] for v in spans.values()),
            "last_end": max(v[-1][1] for v in spans.values())}


def measure(cluster, endpoint: str, csv: Path, base: Path, count: int, steps: int,
            timeout_s: float) -> dict[str, Any]:
    """One submit of `count` subjects x `steps` steps; the row of the table."""
    job = run_submit(cluster, csv, base, OUTPUT, steps, timeout_s)
    metas = read_metas(endpoint, plan_id(count, steps))
    if len(metas) != count:
        raise RuntimeError(f"{len(metas)} of {count} subjects finished")
    util = utilisation(metas)
    steady = util["last_end"] - util["first_start"]
    return {"subjects": count, "steps": steps, "job_wall_s": round(job["job_wall_s"], 1),
            "startup_s": round(util["first_start"] - job["job_start"], 1),
            "training_wall_s": round(steady, 1),
            "overhead_per_subject_ms": round(1000 * util["mean_gap_s"], 1),
            "subject_s": round(util["mean_subject_s"], 3),
            "busy_fraction": round(util["busy_fraction"], 4),
            "idle_share": round(util["idle_share"], 4),
            "driver_peak_rss_mb": round(job["driver_peak_rss_mb"], 1),
            "actors": util["actors"]}


def run_benchmark(cluster, endpoint: str, workdir: Path, plans: list[tuple[int, int]],
                  timeout_s: float = 3600) -> list[dict[str, Any]]:
    """Every (subjects, steps) plan on a running cluster whose nodes reach `endpoint`."""
    base, csvs = prepare(endpoint, workdir, plans)
    return [measure(cluster, endpoint, csv, base, count, steps, timeout_s)
            for csv, (count, steps) in zip(csvs, plans, strict=True)]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("subjects", "steps", "job_wall_s", "startup_s", "training_wall_s",
            "overhead_per_subject_ms", "subject_s", "busy_fraction", "idle_share",
            "driver_peak_rss_mb")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines += [" | ".join(str(row[k]) for k in head) for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--realistic", default="20x50", help="SUBJECTSxSTEPS")
    parser.add_argument("--quick", action="store_true", help="one run of 8 subjects x 2 steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    many, (count, steps) = args.subjects, map(int, args.realistic.split("x"))
    plans = QUICK_PLANS if args.quick else [(many, 2), (count, steps)]
    kit = cluster_kit()
    reason = kit.namespaces_available()
    if reason is not None:
        sys.exit(f"cluster_scale needs mount namespaces: {reason}")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with tempfile.TemporaryDirectory(prefix="cluster-scale-") as tmp:
        cluster = kit.start_cluster(Path(tmp) / "cluster", workers=2,
                                    node_local=[kit.NODE_LOCAL],
                                    env={**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        try:
            rows = run_benchmark(cluster, endpoint, Path(tmp), plans)
        finally:
            cluster.stop()
            server.stop()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
