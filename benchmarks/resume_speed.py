"""How long a re-run's plan step takes to verify finished subjects on S3.

Starts moto's S3 server in its own process (S3 is a service of its own; an in-process
server would share the driver's GIL), writes N finished subjects for a tiny base
through the artefact store, then times `plan_submit` (the step that checks every
finished subject with the one verifier, several at once, before anything trains) and
counts how many checks ran at once. Results: docs/pipeline.md, "Resume".

    HF_HUB_OFFLINE=1 python benchmarks/resume_speed.py [--subjects 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP = "e" * 64
BUCKET = "resume-speed"


@contextmanager
def moto_process() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) with BUCKET; yields its URL and
    stops exactly the process it started."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        for _ in range(120):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.5)
        yield url
    finally:
        server.kill()
        server.wait(timeout=30)


def manifest(folder: Path, count: int) -> Path:
    """A CSV of `count` subjects s0000... sharing one small photo."""
    from PIL import Image

    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (120, 80, 40)).save(photos / "00.png")
    rows = ["subject_id,images,class"] + [f"s{i:04d},{photos},dog" for i in range(count)]
    csv = folder / "subjects.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _scales(subject_id: str) -> bytes:
    import torch

    from tuneqdm.scaleset import ScaleSet

    return ScaleSet(tensors={"layer.scale_out": torch.ones(2, 3)}, method="tuneqdm",
                    num_experts=2, num_train_timesteps=1000, base_fingerprint=FP,
                    subjects=[{"subject_id": subject_id, "token": "sks",
                               "class_noun": "dog"}]).to_bytes()


def finish_all(config, plan) -> None:
    """Write the plan's base marker and every pending subject as finished (16 threads)."""
    from pipeline.store import Storage, SubjectMeta, base_rel, write_subject

    storage = Storage(config.output, config.storage_options)
    address = plan.base["address"]
    storage.write_json(base_rel(address, "quant.json"), {"fingerprint": FP})
    storage.write_json(base_rel(address, "done.json"), {"address": address,
                                                        "fingerprint": FP})

    def finish(subject_id: str) -> None:
        meta = SubjectMeta(subject_id=subject_id, base_fingerprint=FP, base_address=address,
                           spec_hash=plan.spec_hashes[subject_id], run_id="r0",
                           class_noun="dog", token="sks", losses=(0.5,), final_loss=0.5,
                           steps=2)
        write_subject(storage, subject_id, _scales(subject_id), meta, [])

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(finish, plan.spec_hashes))


def timed_plan(config) -> tuple[Any, float, int]:
    """(plan, seconds, most checks at once) of one `plan_submit`, counting the
    concurrent calls of the verifier it uses."""
    import pipeline.run

    verify, lock, busy = pipeline.run.verify_subject, threading.Lock(), {"now": 0, "max": 0}

    def counted(*args, **kwargs):
        with lock:
            busy["now"] += 1
            busy["max"] = max(busy["max"], busy["now"])
        try:
            return verify(*args, **kwargs)
        finally:
            with lock:
                busy["now"] -= 1

    pipeline.run.verify_subject = counted
    try:
        start = time.perf_counter()
        plan = pipeline.run.plan_submit(config, lambda text: None)
        return plan, time.perf_counter() - start, busy["max"]
    finally:
        pipeline.run.verify_subject = verify


def measure(endpoint: str, base_model: str, folder: Path, count: int) -> dict[str, Any]:
    """Write `count` finished subjects, then time the plan step that verifies them."""
    from pipeline.run import plan_submit
    from pipeline.settings import SubmitConfig

    config = SubmitConfig(manifest=str(manifest(folder, count)),
                          output=f"s3://{BUCKET}/run-{count}", base_model=base_model,
                          storage_options={"endpoint_url": endpoint}, steps=2, samples=0)
    first = plan_submit(config, lambda text: None)  # nothing finished, no base yet
    if len(first.pending) != count or first.reused:
        raise RuntimeError(f"expected {count} pending subjects, got {len(first.pending)}")
    finish_all(config, first)
    plan, seconds, most = timed_plan(config)
    return {"subjects": count, "reused": len(plan.reused), "pending": len(plan.pending),
            "plan_s": round(seconds, 2), "checks_at_once": most}


def main(argv: list[str] | None = None) -> None:
    from benchmarks._common import machine_info, markdown_table, write_json
    from tuneqdm.testing import save_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, moto_process() as endpoint:
        base = str(save_tiny_pipeline(Path(tmp) / "tiny-sd"))
        row = measure(endpoint, base, Path(tmp), args.subjects)
    print(markdown_table([row], [(k, k) for k in row]))
    write_json(args.json, {"rows": [row], "machine": machine_info()})


if __name__ == "__main__":
    main()
