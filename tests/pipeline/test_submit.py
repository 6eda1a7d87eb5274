"""End-to-end submits on local Ray (2 CPUs) with a tiny pipeline and DreamBooth photos:
a broken subject among good ones, resume, an actor killed mid-run, s3:// output on
moto. Training is 3 steps at 16 px: these tests check the orchestration, not quality."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from pipeline_testkit import copy_photos, truncated_photo_folder, write_csv

from pipeline.run import SubmitConfig, submit
from pipeline.store import Storage
from tuneqdm_cli.main import main

FAST = ["--steps", "3", "--lr-scale-out", "1e-3", "--cpus-per-actor", "1", "--samples", "1",
        "--sample-steps", "2", "--guidance-scale", "1"]


def _load_checked(base_dir: Path, scale_bytes: dict[str, bytes]):
    """Load the quantized base and check every scale set fits it."""
    from tuneqdm.base import load_quantized_pipeline
    from tuneqdm.scaleset import ScaleSet

    pipe = load_quantized_pipeline(base_dir)
    for subject_id, data in scale_bytes.items():
        scale_set = ScaleSet.from_bytes(data, source=subject_id)
        scale_set.check_fits(pipe.unet)
        assert scale_set.subject_ids == [subject_id]
    return pipe


def test_three_subjects_one_broken_then_resume(ray_session, tiny_base_model, tmp_path):
    rows = [
        {"subject_id": "dog", "images": str(copy_photos("dog", tmp_path / "dog")),
         "class": "dog", "token": "sks"},
        {"subject_id": "cat", "images": str(truncated_photo_folder(tmp_path / "cat")),
         "class": "cat", "token": "zwx"},
        {"subject_id": "backpack", "images": str(copy_photos("backpack", tmp_path / "bp")),
         "class": "backpack", "token": "qvt"},
    ]
    csv = write_csv(tmp_path / "subjects.csv", rows)
    out = tmp_path / "out"
    args = ["submit", str(csv), "--output", str(out), "--base-model", tiny_base_model,
            "--actors", "2", *FAST]
    runner = CliRunner()

    first = runner.invoke(main, args)
    assert first.exit_code == 1, first.output
    assert "FAILED   cat: bad image: " in first.output
    assert "01.jpg: cannot decode image data" in first.output
    assert "quantizing " in first.output and "Ray dashboard:" in first.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"total": 3, "done": 2, "failed": 1}
    assert summary["base"]["quantized_this_run"] is True
    bases = [p for p in (out / "bases").iterdir() if not p.name.startswith(".")]
    assert [p.name for p in bases] == [summary["base"]["address"]]
    by_id = {r["subject_id"]: r for r in summary["subjects"]}
    assert "cannot decode image data" in by_id["cat"]["reason"]
    assert by_id["dog"]["output"] == str(out / "subjects" / "dog")
    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert [(r["subject_id"], r["status"]) for r in table] == [
        ("dog", "done"), ("cat", "failed"), ("backpack", "done")]

    # the two good scale sets load and fit the base; the broken subject left nothing done
    scales = {s: (out / "subjects" / s / "scales.safetensors").read_bytes()
              for s in ("dog", "backpack")}
    _load_checked(bases[0], scales)
    assert not (out / "subjects" / "cat" / "done.json").exists()
    meta = json.loads((out / "subjects" / "dog" / "meta.json").read_text())
    assert meta["steps"] == 3 and len(meta["losses"]) == 3
    assert meta["base"]["fingerprint"] == summary["base"]["fingerprint"]
    assert meta["train_config"]["lr_scale_out"] == 1e-3 and "torch" in meta["versions"]
    assert meta["actor"].startswith("tuneqdm-finetuner-")
    with Image.open(out / "subjects" / "dog" / "samples" / "00.png") as sample:
        assert sample.size == (16, 16)

    status = runner.invoke(main, ["status", str(out)])
    assert status.exit_code == 0, status.output
    assert "2 done" in status.output and "1 failed" in status.output

    # second submit: nothing retrained or re-quantized; the broken subject is tried again
    done_before = {s: (out / "subjects" / s / "done.json").read_bytes() for s in scales}
    base_done = (bases[0] / "done.json").read_bytes()
    second = runner.invoke(main, args)
    assert second.exit_code == 1, second.output
    assert "resume: 2 subject(s) already finished and verified" in second.output
    assert "quantizing " not in second.output
    again = json.loads((out / "summary.json").read_text())
    assert again["base"]["quantized_this_run"] is False
    assert {r["subject_id"]: r["status"] for r in again["subjects"]} == {
        "dog": "reused", "cat": "failed", "backpack": "reused"}
    assert {s: (out / "subjects" / s / "done.json").read_bytes() for s in scales} == done_before
    assert (bases[0] / "done.json").read_bytes() == base_done

    # fix the photos: only cat trains now
    for photo in (tmp_path / "cat").iterdir():
        photo.unlink()
    copy_photos("cat", tmp_path / "cat", 2)
    third = runner.invoke(main, [*args[:-len(FAST) - 2], "--actors", "1", *FAST])
    assert third.exit_code == 0, third.output
    final = json.loads((out / "summary.json").read_text())
    assert {r["subject_id"]: r["status"] for r in final["subjects"]} == {
        "dog": "reused", "cat": "done", "backpack": "reused"}
    assert final["base"]["quantized_this_run"] is False


def test_actor_killed_mid_run_every_subject_finishes(ray_session, tiny_base_model, tmp_path):
    ray = ray_session
    rows = [{"subject_id": s, "images": str(copy_photos(s, tmp_path / s, 2)), "class": s}
            for s in ("dog", "cat", "teapot")]
    csv = write_csv(tmp_path / "subjects.csv", rows)
    config = SubmitConfig(manifest=str(csv), output=str(tmp_path / "out"),
                          base_model=tiny_base_model, steps=24, lr_scale_out=1e-3, actors=2,
                          cpus_per_actor=1, samples=0)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = submit(config, out=io.StringIO(), err=io.StringIO(),
                                       live_progress=False)
        except BaseException as err:  # surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
        trackers = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("tuneqdm-progress-")]
        if not trackers:
            continue
        try:
            snapshot = ray.get(ray.get_actor(trackers[0], namespace="tuneqdm")
                               .snapshot.remote(), timeout=10)
        except Exception:
            continue
        for job_id, state in snapshot.items():
            if 1 <= state["step"] < state["total"]:
                os.kill(state["pid"], signal.SIGKILL)
                killed = job_id
                break
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "no subject was seen mid-training"
    report = outcome["report"]
    assert report.exit_code == 0
    rows_by_id = {r["subject_id"]: r for r in report.rows}
    assert {r["status"] for r in report.rows} == {"done"}
    assert rows_by_id[killed]["attempts"] == 2
    assert report.summary["actors_replaced"]
    for subject_id in rows_by_id:
        assert (tmp_path / "out" / "subjects" / subject_id / "done.json").exists()


def test_s3_output_and_s3_images_against_moto(ray_session, tiny_base_model, s3_server,
                                              s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"],
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    for photo in sorted(copy_photos("dog", tmp_path / "dog", 2).iterdir()):
        client.upload_file(str(photo), s3_bucket, f"photos/dog/{photo.name}")
    client.put_object(Bucket=s3_bucket, Key="photos/dog/00.txt",  # 00.jpg's caption
                      Body=b"a photo of {token} {class_noun} on a sofa")
    rows = [
        {"subject_id": "dog", "images": f"s3://{s3_bucket}/photos/dog/", "class": "dog"},
        {"subject_id": "cat", "images": str(copy_photos("cat", tmp_path / "cat", 2)),
         "class": "cat", "token": "zwx"},
    ]
    csv = write_csv(tmp_path / "subjects.csv", rows)
    output = f"s3://{s3_bucket}/runs/first"
    options = []
    for key, value in [("endpoint_url", s3_server["endpoint_url"]),
                       ("client_kwargs.region_name", "us-east-1")]:
        options += ["--storage-option", f"{key}={value}"]
    args = ["submit", str(csv), "--output", output, "--base-model", tiny_base_model,
            "--actors", "2", *options, *FAST]
    runner = CliRunner()
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{output}/subjects/dog" in result.output

    storage = Storage(output, s3_server)
    summary = storage.read_json("summary.json")
    assert summary["counts"] == {"total": 2, "done": 2}
    assert storage.list_dir("subjects") == ["cat", "dog"]
    assert storage.list_dir("subjects/dog") == ["done.json", "meta.json", "photos",
                                                "samples", "scales.safetensors"]
    base_dir = tmp_path / "base-copy"
    storage.download_dir(f"bases/{summary['base']['address']}", base_dir)
    _load_checked(base_dir, {s: storage.read_bytes(f"subjects/{s}/scales.safetensors")
                             for s in ("dog", "cat")})
    meta = storage.read_json("subjects/dog/meta.json")
    assert meta["images"] == [f"s3://{s3_bucket}/photos/dog/00.jpg",
                              f"s3://{s3_bucket}/photos/dog/01.jpg"]
    assert meta["captions"] == ["a photo of {token} {class_noun} on a sofa", None]

    status = runner.invoke(main, ["status", output, *options, "--verify"])
    assert status.exit_code == 0, status.output
    assert "2 subject(s): 2 done" in status.output

    again = runner.invoke(main, args)  # all verified in S3: no Ray work at all
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output and "quantizing" not in again.output


@pytest.fixture(autouse=True)
def _no_stray_named_actors(ray_session):
    """Every run kills its own actors (pool and progress tracker) when it ends."""
    yield
    import ray

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("tuneqdm-")]
        if not names:
            return
        time.sleep(0.5)
    raise AssertionError(f"actors left running: {names}")


def test_base_that_cannot_be_quantized_fails_cleanly(ray_session, tmp_path):
    csv = write_csv(tmp_path / "s.csv", [{"subject_id": "dog", "class": "dog",
                                          "images": str(copy_photos("dog", tmp_path / "d", 1))}])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["submit", str(csv), "--output", str(out),
                                       "--base-model", "nobody/no-such-model", *FAST])
    assert result.exit_code == 1, result.output
    assert "Error: quantizing nobody/no-such-model failed: " in result.output
    assert "Traceback" not in result.output
    assert not list(out.glob("bases/*/done.json"))
