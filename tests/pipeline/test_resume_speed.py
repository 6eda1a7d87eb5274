"""A re-run verifies its finished subjects in parallel: 1,000 finished subjects on
moto's S3 are all checked by the plan step (docs/pipeline.md, "Resume"), several at
once, and every one of them is reused. The time it takes is printed, not asserted
(speed is a benchmark's business); docs/pipeline.md records it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from pipeline.run import plan_submit
from pipeline.settings import SubmitConfig
from pipeline.store import Storage, SubjectMeta, base_rel, write_subject

SUBJECTS = 1000
FP = "e" * 64


def _scales(subject_id: str) -> bytes:
    import torch

    from tuneqdm.scaleset import ScaleSet

    return ScaleSet(tensors={"layer.scale_out": torch.ones(2, 3)}, method="tuneqdm",
                    num_experts=2, num_train_timesteps=1000, base_fingerprint=FP,
                    subjects=[{"subject_id": subject_id, "token": "sks",
                               "class_noun": "dog"}]).to_bytes()


def _manifest(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(photos / "00.png")
    rows = ["subject_id,images,class"] + [f"s{i:04d},{photos},dog" for i in range(SUBJECTS)]
    csv = tmp_path / "subjects.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture
def moto_process():
    """moto's S3 server in its own process (as S3 is a service of its own: the
    in-process server of conftest.py would share this process's GIL); yields its URL."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        for _ in range(120):
            try:
                client.create_bucket(Bucket="resume-speed")
                break
            except Exception:
                time.sleep(0.5)
        yield url
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_thousand_finished_subjects_verify_in_parallel(moto_process, tiny_base_model,
                                                         tmp_path, monkeypatch):
    options = {"endpoint_url": moto_process}
    config = SubmitConfig(manifest=str(_manifest(tmp_path)),
                          output="s3://resume-speed/run", base_model=tiny_base_model,
                          storage_options=options, steps=2, samples=0)
    first = plan_submit(config, lambda text: None)  # nothing finished, no base yet
    assert len(first.pending) == SUBJECTS and not first.reused
    storage = Storage(config.output, options)
    address = first.base["address"]
    storage.write_json(base_rel(address, "quant.json"), {"fingerprint": FP})
    storage.write_json(base_rel(address, "done.json"), {"address": address,
                                                        "fingerprint": FP})

    def finish(subject_id: str) -> None:
        meta = SubjectMeta(subject_id=subject_id, base_fingerprint=FP, base_address=address,
                           spec_hash=first.spec_hashes[subject_id], run_id="r0",
                           class_noun="dog", token="sks", losses=(0.5,), final_loss=0.5,
                           steps=2)
        write_subject(storage, subject_id, _scales(subject_id), meta, [])

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(finish, first.spec_hashes))

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

    monkeypatch.setattr(pipeline.run, "verify_subject", counted)
    start = time.perf_counter()
    plan = plan_submit(config, lambda text: None)
    seconds = time.perf_counter() - start
    print(f"plan step with {SUBJECTS} finished subjects on moto S3: {seconds:.1f} s, "
          f"{busy['max']} checks at once")
    assert len(plan.reused) == SUBJECTS and not plan.pending
    assert busy["max"] > 1  # checked in parallel, not one after another
