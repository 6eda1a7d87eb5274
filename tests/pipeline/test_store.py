"""The artefact store (pipeline/store): typed records stored once, the one verifier at
each depth and the `status` that uses it, bases written and read, the per-node base
cache under concurrency (threads and processes download once), and storage options
that refuse credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import store
from pipeline.store import Defect, Storage, SubjectMeta, verify_subject, write_subject
from pipeline.store.cache import exclusive_lock
from pipeline.summary import collect_status

FP = "f" * 64


def _scales(subject_id: str, fingerprint: str = FP) -> bytes:
    import torch

    from tuneqdm.scaleset import ScaleSet

    return ScaleSet(tensors={"layer.scale_out": torch.ones(2, 3)}, method="tuneqdm",
                    num_experts=2, num_train_timesteps=1000, base_fingerprint=fingerprint,
                    subjects=[{"subject_id": subject_id, "token": "sks",
                               "class_noun": "dog"}]).to_bytes()


def _meta(subject_id: str = "dog", **changes) -> SubjectMeta:
    fields = dict(subject_id=subject_id, base_fingerprint=FP, base_address="a" * 24,
                  spec_hash="s1", run_id="r1", class_noun="dog", token="zwx",
                  prompt="a photo of {token} {class_noun}", images=("/p/00.jpg",),
                  train_config={"steps": 3, "lr_scale_out": 1e-3},
                  quant_config={"bits": 4, "method": "tuneqdm", "num_experts": 2},
                  losses=(0.5, 0.25), final_loss=0.25, steps=2, seconds=1.5,
                  sample_count=1, sample_steps=2, sample_guidance_scale=1.0, attempt=1,
                  actor="a0")
    return SubjectMeta(**{**fields, **changes})


def test_meta_round_trips_and_each_fact_is_stored_once(tmp_path):
    storage = Storage(str(tmp_path))
    meta = _meta()
    assert SubjectMeta.from_dict(meta.to_dict()) == meta
    assert meta.instance_prompt == "a photo of zwx dog" and meta.job_id == "dog"
    write_subject(storage, "dog", _scales("dog"), meta, [b"png"])
    done = storage.read_json("subjects/dog/done.json")
    assert set(done) == {"status", "files"}  # no fingerprint, spec hash or run id here
    assert sorted(done["files"]) == ["meta.json", "samples/00.png", "scales.safetensors"]
    stored = storage.read_json("subjects/dog/meta.json")
    assert stored["base"] == {"address": "a" * 24, "fingerprint": FP}
    assert "status" not in stored and "instance_prompt" not in stored
    assert "started_unix" not in stored  # only attempts that were timed record them
    assert "prompt" not in stored["samples"]
    # meta.json as earlier versions wrote it still reads (extra keys ignored)
    old = {**stored, "status": "done", "instance_prompt": "x", "job_id": "dog",
           "base": {**stored["base"], "source": "/m", "uri": "/o/bases/a"}}
    assert SubjectMeta.from_dict(old) == meta
    with pytest.raises(ValueError, match="names subject 'cat'"):
        write_subject(storage, "dog", b"", _meta("cat"), [])


def test_verifier_depths_and_status_agree(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    write_subject(storage, "dog", _scales("dog"), _meta(), [b"png"])
    write_subject(storage, "cat", _scales("cat"), _meta("cat"), [b"png"])
    verdict = verify_subject(storage, "dog", FP, "s1")
    assert verdict.done and verdict.record == _meta() and verdict.scale_set.subject_ids == ["dog"]
    assert verify_subject(storage, "dog", "0" * 64).defect is Defect.OTHER_BASE
    assert verify_subject(storage, "dog", FP, "s2").defect is Defect.SPEC_CHANGED

    storage.write_bytes("subjects/dog/samples/00.png", b"changed")
    storage.write_bytes("subjects/cat/scales.safetensors", b"changed")
    # the marker-and-meta depth (Serve's listing, plain status) does not read them ...
    assert verify_subject(storage, "dog", load_scales=False, check_files=False).done
    # ... Serve's load reads the scale set but not the samples ...
    assert verify_subject(storage, "dog", check_files=False).done
    cat = verify_subject(storage, "cat", check_files=False)
    assert (cat.defect, cat.file) == (Defect.CHECKSUM, "scales.safetensors")
    # ... resume and status --verify read everything
    dog = verify_subject(storage, "dog")
    assert (dog.defect, dog.reason) == (Defect.CHECKSUM, "samples/00.png does not match "
                                                         "its checksum")
    rows, _ = collect_status(storage, verify=True)
    assert [(r["subject_id"], r["status"], r["reason"]) for r in rows] == [
        ("cat", "incomplete", "scales.safetensors does not match its checksum"),
        ("dog", "incomplete", "samples/00.png does not match its checksum")]
    plain, _ = collect_status(storage)
    assert [(r["subject_id"], r["status"], r["final_loss"]) for r in plain] == [
        ("cat", "done", 0.25), ("dog", "done", 0.25)]

    storage.write_bytes("subjects/dog/meta.json", b"{}")
    assert verify_subject(storage, "dog", load_scales=False).defect is Defect.CHECKSUM
    storage.write_json("subjects/dog/done.json", {"status": "running"})
    assert verify_subject(storage, "dog").defect is Defect.NOT_DONE
    storage.remove("subjects/dog/done.json")
    assert verify_subject(storage, "dog").defect is Defect.UNFINISHED
    assert verify_subject(storage, "bird").defect is Defect.NOT_STARTED


def _fake_base(folder: Path, fingerprint: str = FP) -> Path:
    """A base folder as far as the store reads it: quant.json and two configs."""
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "quant.json").write_text(json.dumps({
        "fingerprint": fingerprint, "source": "/models/tiny", "revision": None,
        "quant_config": {"bits": 4}, "unet_tensor_bytes": 10}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [4, 8]}))
    (folder / "unet" / "quantized.safetensors").write_bytes(os.urandom(256 * 1024))
    return folder


def test_bases_are_written_once_and_read_typed(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    address = "b" * 24
    assert store.read_base(storage, address) is None
    (tmp_path / "out" / "bases" / f".staging-{address}-crashed").mkdir(parents=True)
    done = store.write_base(storage, address, _fake_base(tmp_path / "one"), 1.5)
    assert set(done) == {"address", "fingerprint", "quantize_seconds", "created_at"}
    info = store.read_base(storage, address)
    assert (info.fingerprint, info.source, info.quant_config, info.quantize_seconds) == (
        FP, "/models/tiny", {"bits": 4}, 1.5)
    assert store.read_done(storage, address) == done == info.marker()
    assert sorted(os.listdir(tmp_path / "out" / "bases")) == [f".{address}.lock", address]
    # a second writer of the same address keeps the first base
    again = store.write_base(storage, address, _fake_base(tmp_path / "two", "e" * 64))
    assert again == done and store.read_base(storage, address).fingerprint == FP
    assert store.native_size(storage, address) == 16  # sample_size 8 x 2 (two VAE blocks)
    assert store.read_base_config(storage, address, "unet") == {"sample_size": 8}
    with pytest.raises(ValueError, match="not a folder name"):
        store.read_base_config(storage, address, "../x")
    assert store.complete_bases(storage) == {address: info}
    assert store.read_base(storage, "..") is None


@pytest.fixture
def remote_base(s3_server, s3_bucket, tmp_path):
    """(remote storage, address) of a fake base uploaded to moto."""
    remote = Storage(f"s3://{s3_bucket}/out", s3_server)
    address = "c" * 24
    store.write_base(remote, address, _fake_base(tmp_path / "base"))
    return remote, address


def _count_gets(storage: Storage) -> list[str]:
    calls: list[str] = []
    original = storage.fs._call_s3

    async def recording(method, *args, **kwargs):
        calls.append(method)
        return await original(method, *args, **kwargs)

    storage.fs._call_s3 = recording
    return calls


def test_cache_threads_download_once(remote_base, tmp_path):
    remote, address = remote_base
    calls = _count_gets(remote)
    barrier = threading.Barrier(4)
    paths: list[Path] = []

    def fetch() -> None:
        barrier.wait()
        paths.append(store.local_base_path(remote, address, FP, cache_dir=tmp_path / "c"))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache = tmp_path / "c" / "bases" / address
    assert paths == [cache] * 4
    assert calls.count("get_object") == 5  # the five files of the base, once
    assert (cache / ".fingerprint").read_text() == FP
    assert (cache / "unet" / "quantized.safetensors").stat().st_size == 256 * 1024
    assert sorted(os.listdir(cache.parent)) == [f".{address}.lock", address]


_CHILD = """
import json, os, sys
from pipeline.store import Storage, local_base_path
storage = Storage(sys.argv[1], json.loads(sys.argv[2]))
calls = []
original = storage.fs._call_s3
async def recording(method, *args, **kwargs):
    calls.append(method)
    return await original(method, *args, **kwargs)
storage.fs._call_s3 = recording
print("ready", flush=True)
path = local_base_path(storage, sys.argv[3], sys.argv[4], cache_dir=sys.argv[5])
print(json.dumps([str(path), os.stat(path).st_ino, calls.count("get_object")]))
"""


def test_cache_processes_download_once(remote_base, s3_server, tmp_path):
    remote, address = remote_base
    cache_dir = tmp_path / "node"
    leftover = cache_dir / "bases" / f".download-{address}-crashed"
    leftover.mkdir(parents=True)
    (leftover / "half").write_bytes(b"x")
    stale = cache_dir / "bases" / address
    stale.mkdir()
    (stale / ".fingerprint").write_text("0" * 64)  # another base's copy
    args = [sys.executable, "-c", _CHILD, remote.root, json.dumps(s3_server), address, FP,
            str(cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # the test holds the address's lock until both children are about to fetch, so
    # they ask at the same time
    with exclusive_lock(cache_dir / "bases" / f".{address}.lock"):
        children = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
                    for _ in range(2)]
        assert [child.stdout.readline() for child in children] == ["ready\n"] * 2
        time.sleep(0.5)
    results = [json.loads(child.communicate(timeout=120)[0]) for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert results[0][:2] == results[1][:2] == [str(stale), os.stat(stale).st_ino]
    assert sorted(r[2] for r in results) == [0, 5]  # one process downloaded, once
    assert (stale / ".fingerprint").read_text() == FP
    assert sorted(os.listdir(cache_dir / "bases")) == [f".{address}.lock", address]


def test_cache_refuses_a_base_of_another_fingerprint(remote_base, tmp_path):
    remote, address = remote_base
    with pytest.raises(store.StorageError, match="not the expected 000000000000"):
        store.local_base_path(remote, address, "0" * 64, cache_dir=tmp_path)
    assert sorted(os.listdir(tmp_path / "bases")) == [f".{address}.lock"]


@pytest.mark.parametrize("option", [
    "key=AKIA123", "secret=s3cr3t-value", "token=s3cr3t-value", "password=s3cr3t-value",
    "aws_access_key_id=AKIA123", "aws_secret_access_key=s3cr3t-value",
    "client_kwargs.aws_secret_access_key=s3cr3t-value",
    "client_kwargs.aws_session_token=s3cr3t-value",
    'client_kwargs={"region_name": "x", "aws_secret_access_key": "s3cr3t-value"}',
    's3_additional_kwargs={"SSECustomerKey": "s3cr3t-value"}',
])
def test_storage_options_refuse_credentials(option):
    with pytest.raises(ValueError) as info:
        store.parse_storage_options(["endpoint_url=http://127.0.0.1:9000", option])
    message = str(info.value)
    assert "passes a credential" in message and "s3cr3t-value" not in message
    for hint in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "profile=NAME", "~/.aws/credentials"):
        assert hint in message


def test_storage_options_without_credentials_pass():
    assert store.parse_storage_options([
        "profile=dev", "client_kwargs.region_name=eu-west-1",
        's3_additional_kwargs={"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "k-1"}',
    ]) == {"profile": "dev", "client_kwargs": {"region_name": "eu-west-1"},
           "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "k-1"}}


def test_meta_records_the_attempts_start_and_end():
    meta = _meta(started_unix=1_700_000_000.25, finished_unix=1_700_000_003.5)
    data = meta.to_dict()
    assert (data["started_unix"], data["finished_unix"]) == (1_700_000_000.25, 1_700_000_003.5)
    assert SubjectMeta.from_dict(data) == meta
