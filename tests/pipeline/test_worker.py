"""The per-job work without Ray: quantize a base into storage under its content
address, train a subject into verified artefacts, and report a subject's own failure
(NaN loss, bad photo) as a failed result that writes nothing finished."""

from __future__ import annotations

import pytest
from pipeline_testkit import copy_photos, truncated_photo_folder, write_csv

from pipeline import store as pbase
from pipeline.manifest import group_jobs, load_manifest
from pipeline.store import Storage, verify_subject
from pipeline.worker import WorkSettings, train_job

QUANT = {"bits": 4, "method": "tuneqdm", "num_experts": 2, "num_train_timesteps": 1000,
         "symmetric": False, "rounding": "nearest", "mse_grid": 80, "mse_min_ratio": 0.2}


@pytest.fixture(scope="module")
def quantized(tiny_base_model, tmp_path_factory):
    """(storage, address, done.json, loaded pipeline) of a base quantized once."""
    from tuneqdm.base import load_quantized_pipeline

    storage = Storage(str(tmp_path_factory.mktemp("store")))
    address = pbase.content_address(tiny_base_model, None, QUANT)
    assert pbase.read_done(storage, address) is None
    done = pbase.quantize_into_storage(storage, address, tiny_base_model, None, QUANT)
    path = pbase.local_base_path(storage, address, done["fingerprint"])
    pipe = load_quantized_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return storage, address, done, pipe


def test_content_address_and_base_marker(quantized, tiny_base_model):
    storage, address, done, _ = quantized
    assert pbase.content_address(tiny_base_model, None, QUANT) == address
    assert pbase.content_address(tiny_base_model, "v2", QUANT) != address
    assert pbase.content_address(tiny_base_model, None, {**QUANT, "bits": 8}) != address
    assert pbase.read_done(storage, address) == done
    info = storage.read_json(f"bases/{address}/quant.json")
    assert info["fingerprint"] == done["fingerprint"]
    assert info["quant_config"]["num_experts"] == 2
    # a marker that disagrees with quant.json means "not there"
    storage.write_json(f"bases/{address}/done.json", {**done, "fingerprint": "0" * 64})
    try:
        assert pbase.read_done(storage, address) is None
    finally:
        storage.write_json(f"bases/{address}/done.json", done)


def test_remote_base_is_downloaded_once_per_node(quantized, s3_server, s3_bucket, tmp_path):
    storage, address, done, _ = quantized
    remote = Storage(f"s3://{s3_bucket}/out", s3_server)
    remote.upload_dir(storage.local_path(f"bases/{address}"), f"bases/{address}")
    first = pbase.local_base_path(remote, address, done["fingerprint"], cache_dir=tmp_path)
    assert (first / "unet" / "quantized.safetensors").is_file()
    stamp = (first / "quant.json").stat().st_mtime_ns
    again = pbase.local_base_path(remote, address, done["fingerprint"], cache_dir=tmp_path)
    assert again == first and (again / "quant.json").stat().st_mtime_ns == stamp


def _job(tmp_path, folder, **extra):
    csv = write_csv(tmp_path / "s.csv", [{"subject_id": "dog", "images": str(folder),
                                          "class": "dog", **extra}])
    (job,) = group_jobs(load_manifest(csv))
    return job


def _settings(done, address, **train):
    return WorkSettings(run_id="test", base={"address": address,
                                             "fingerprint": done["fingerprint"]},
                        quant_config=QUANT, train={"steps": 3, "lr_scale_out": 1e-3, **train},
                        samples=2, sample_steps=2, guidance_scale=1.0)


def test_train_job_writes_verified_artefacts(quantized, tmp_path):
    storage, address, done, pipe = quantized
    job = _job(tmp_path, copy_photos("dog", tmp_path / "dog", 2))
    steps: list[int] = []
    result = train_job(pipe, job, "spec-1", _settings(done, address), storage,
                       on_step=lambda step, loss: steps.append(step), actor="a0")
    assert result["status"] == "done", result
    assert steps == [0, 1, 2] and result["steps"] == 3
    verdict = verify_subject(storage, "dog", done["fingerprint"], "spec-1")
    assert verdict.done, verdict.reason
    assert verdict.meta["samples"]["count"] == 2 and verdict.meta["actor"] == "a0"
    assert storage.list_dir("subjects/dog/samples") == ["00.png", "01.png"]
    # thumbnails of the training photos, listed in done.json, at most 128 px a side
    assert storage.list_dir("subjects/dog/photos") == ["00.png", "01.png"]
    assert {"photos/00.png", "photos/01.png"} <= set(verdict.files)
    from PIL import Image

    thumb = Image.open(storage.local_path("subjects/dog/photos/00.png"))
    assert max(thumb.size) == 128 and thumb.mode == "RGB"


def test_captions_reach_training_and_the_subjects_meta(quantized, tmp_path):
    """A photo's <name>.txt caption is its prompt in training (so the loss changes,
    same seed) and is recorded in meta.json; photos without one keep the row's."""
    storage, address, done, pipe = quantized
    folder = copy_photos("dog", tmp_path / "dog", 2)
    plain = train_job(pipe, _job(tmp_path, folder), "spec-plain", _settings(done, address),
                      storage)
    first = sorted(folder.iterdir())[0]
    first.with_suffix(".txt").write_text("a photo of {token} {class_noun} on a sofa")
    result = train_job(pipe, _job(tmp_path, folder), "spec-captioned",
                       _settings(done, address), storage)
    assert result["status"] == "done", result
    meta = verify_subject(storage, "dog", done["fingerprint"], "spec-captioned").meta
    assert meta["captions"] == ["a photo of {token} {class_noun} on a sofa", None]
    assert meta["prompt"] == "a photo of {token} {class_noun}"
    assert result["final_loss"] != plain["final_loss"]


def test_nan_loss_is_the_subjects_own_failure(quantized, tmp_path):
    storage, address, done, pipe = quantized
    job = _job(tmp_path, copy_photos("dog", tmp_path / "dog", 2), subject_id="dog",
               lr_scale_out="1e10", lr_scale_in="1e10")
    result = train_job(pipe, job, "spec-nan", _settings(done, address), storage)
    assert result["status"] == "failed"
    assert result["reason"].startswith("training failed: loss became nan")
    assert not verify_subject(storage, "dog", done["fingerprint"], "spec-nan").done


def test_undecodable_photo_fails_its_subject_naming_the_file(quantized, tmp_path):
    storage, address, done, pipe = quantized
    job = _job(tmp_path, truncated_photo_folder(tmp_path / "cat"))
    result = train_job(pipe, job, "spec-cat", _settings(done, address), storage)
    assert result["status"] == "failed"
    assert result["reason"].startswith("bad image: ")
    assert "/cat/01.jpg: cannot decode image data" in result["reason"]


def test_cuda_out_of_memory_is_retried_once_then_reported(quantized, tmp_path, monkeypatch):
    """A GPU too small (the CUDA_OOM test hook: no GPU here): the try without gradient
    checkpointing runs out of memory, the retry with it trains and says so; a GPU too
    small for every config is reported as out of memory, not as the subject's fault."""
    from pipeline.worker import CUDA_OOM_ENV

    storage, address, done, pipe = quantized
    job = _job(tmp_path, copy_photos("dog", tmp_path / "dog", 2))
    monkeypatch.setenv(CUDA_OOM_ENV, "without-checkpointing")
    result = train_job(pipe, job, "spec-oom", _settings(done, address, steps=2), storage)
    assert (result["status"], result["oom_retry"]) == ("done", "gradient checkpointing")
    assert verify_subject(storage, "dog", done["fingerprint"], "spec-oom").done
    meta = storage.read_json("subjects/dog/meta.json")
    assert meta["train_config"]["gradient_checkpointing"] is True

    monkeypatch.setenv(CUDA_OOM_ENV, "always")
    result = train_job(pipe, job, "spec-oom2", _settings(done, address, steps=2), storage)
    assert result["status"] == "failed"
    assert result["reason"].startswith("out of memory: CUDA out of memory, also when "
                                       "retried with gradient checkpointing")

    monkeypatch.setenv(CUDA_OOM_ENV, "sometimes")
    with pytest.raises(ValueError, match="TUNEQDM_TEST_CUDA_OOM='sometimes' is invalid"):
        train_job(pipe, job, "spec-oom3", _settings(done, address, steps=2), storage)
