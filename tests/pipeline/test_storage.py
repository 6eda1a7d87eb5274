"""Storage: atomic local writes, single-PUT S3 writes against moto on 127.0.0.1, safe
paths, storage options; and the per-subject artefact checks that resume relies on."""

from __future__ import annotations

import os
import pickle

import pytest

from pipeline.store import Storage, StorageError, parse_storage_options
from pipeline.store import subjects as artifacts


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "out"))
    uri = storage.write_bytes("subjects/dog/meta.json", b"one")
    assert uri == str(tmp_path / "out" / "subjects" / "dog" / "meta.json")
    assert storage.read_bytes("subjects/dog/meta.json") == b"one"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match=r"cannot write .*meta\.json: disk full"):
        storage.write_bytes("subjects/dog/meta.json", b"two")
    monkeypatch.undo()
    assert storage.read_bytes("subjects/dog/meta.json") == b"one"  # old content intact
    assert os.listdir(tmp_path / "out" / "subjects" / "dog") == ["meta.json"]


def test_local_basics_and_relative_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = Storage("rel/out")
    assert storage.root == str(tmp_path / "rel" / "out")  # absolute for Ray workers
    assert storage.list_dir("subjects") == []
    storage.write_json("subjects/a/done.json", {"x": 1})
    storage.write_bytes("subjects/b/scales.safetensors", b"s")
    assert storage.list_dir("subjects") == ["a", "b"]
    assert storage.exists("subjects/a/done.json") and not storage.exists("subjects/c")
    assert storage.read_json("subjects/a/done.json") == {"x": 1}
    storage.remove("subjects/a", recursive=True)
    assert storage.list_dir("subjects") == ["b"]
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.root == storage.root and clone.read_bytes("subjects/b/scales.safetensors")


@pytest.mark.parametrize("bad", ["../x", "subjects/../../etc", "a//b", "a/./b", "a\\b"])
def test_unsafe_paths_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="unsafe storage path"):
        Storage(str(tmp_path)).write_bytes(bad, b"x")


def test_parse_storage_options():
    assert parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=false",
                                  "client_kwargs.region_name=eu-west-1", "max_concurrency=4"]
                                 ) == {"endpoint_url": "http://127.0.0.1:9000", "anon": False,
                                       "client_kwargs": {"region_name": "eu-west-1"},
                                       "max_concurrency": 4}
    for bad in ["novalue", "=x", "a..b=1"]:
        with pytest.raises(ValueError, match="use key=value"):
            parse_storage_options([bad])


def test_s3_round_trip_with_single_puts(s3_server, s3_bucket, tmp_path):
    storage = Storage(f"s3://{s3_bucket}/runs/one/", s3_server)
    assert storage.root == f"s3://{s3_bucket}/runs/one" and storage.remote
    calls: list[str] = []
    original = storage.fs._call_s3

    async def recording(method, *args, **kwargs):
        calls.append(method)
        return await original(method, *args, **kwargs)

    storage.fs._call_s3 = recording
    payload = os.urandom(3 * 2**20)
    assert storage.write_bytes("subjects/dog/scales.safetensors", payload) == (
        f"s3://{s3_bucket}/runs/one/subjects/dog/scales.safetensors")
    storage.write_json("subjects/dog/done.json", {"status": "done"})
    assert calls.count("put_object") == 2 and "create_multipart_upload" not in calls
    storage.fs._call_s3 = original
    assert storage.read_bytes("subjects/dog/scales.safetensors") == payload
    assert storage.exists("subjects/dog/done.json")
    assert storage.list_dir("subjects") == ["dog"]
    assert storage.list_dir("subjects/dog") == ["done.json", "scales.safetensors"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("subjects/cat/done.json")

    local = tmp_path / "folder"
    (local / "unet").mkdir(parents=True)
    (local / "quant.json").write_text("{}")
    (local / "unet" / "w.bin").write_bytes(b"w" * 10)
    storage.upload_dir(local, "bases/abc")
    back = tmp_path / "back"
    storage.download_dir("bases/abc", back)
    assert (back / "unet" / "w.bin").read_bytes() == b"w" * 10
    storage.remove("bases/abc", recursive=True)
    assert not storage.exists("bases/abc/quant.json")
    # a fresh client (another process) sees the same objects
    assert Storage(storage.root, s3_server).read_json("subjects/dog/done.json") == {
        "status": "done"}


# -- artefacts and their verification ------------------------------------------------


def _scale_set_bytes(subject_id: str, fingerprint: str) -> bytes:
    import torch

    from tuneqdm.scaleset import ScaleSet

    return ScaleSet(tensors={"layer.scale_out": torch.ones(2, 3)}, method="tuneqdm",
                    num_experts=2, num_train_timesteps=1000, base_fingerprint=fingerprint,
                    subjects=[{"subject_id": subject_id, "token": "sks",
                               "class_noun": "dog"}]).to_bytes()


def _write(storage, subject_id="dog", fingerprint="f" * 64, spec="s1"):
    meta = {"status": "done", "base": {"fingerprint": fingerprint}, "spec_hash": spec,
            "final_loss": 0.5, "run_id": "r1"}
    return artifacts.write_subject(storage, subject_id, _scale_set_bytes(subject_id,
                                                                           fingerprint),
                                   meta, [b"png-bytes"])


@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    options = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/out", options)


def test_write_files_writes_each_file_and_puts_them_concurrently(any_storage):
    files = {f"subjects/dog/photos/{i:02d}.png": os.urandom(1000 + i) for i in range(4)}
    files["subjects/dog/meta.json"] = b"{}"
    flight = {"now": 0, "most": 0, "puts": 0}
    if any_storage.remote:
        original = any_storage.fs._call_s3

        async def recording(method, *args, **kwargs):
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
            flight["puts"] += method == "put_object"
            try:
                return await original(method, *args, **kwargs)
            finally:
                flight["now"] -= 1

        any_storage.fs._call_s3 = recording
    any_storage.write_files(files)
    if any_storage.remote:
        any_storage.fs._call_s3 = original
        assert flight["puts"] == 5 and flight["most"] >= 2  # one batch, not 5 round trips
    assert {rel: any_storage.read_bytes(rel) for rel in files} == files
    assert any_storage.list_dir("subjects/dog") == ["meta.json", "photos"]
    with pytest.raises(ValueError):
        any_storage.write_files({"../escape": b"x"})


def test_finished_subject_verifies_and_every_defect_is_caught(any_storage):
    storage = any_storage
    fp = "f" * 64
    assert artifacts.verify_subject(storage, "dog", fp, "s1").reason == "not started"
    _write(storage)
    verdict = artifacts.verify_subject(storage, "dog", fp, "s1")
    assert verdict.done and verdict.meta["final_loss"] == 0.5
    assert not artifacts.verify_subject(storage, "dog", "0" * 64, "s1").done
    assert "settings changed" in artifacts.verify_subject(storage, "dog", fp, "s2").reason

    scales = "subjects/dog/scales.safetensors"
    good = storage.read_bytes(scales)
    storage.write_bytes(scales, good[:-1] + bytes([good[-1] ^ 1]))
    assert "does not match its checksum" in artifacts.verify_subject(storage, "dog", fp,
                                                                     "s1").reason
    storage.write_bytes(scales, good)
    storage.remove("subjects/dog/samples/00.png")
    assert "samples/00.png is missing" in artifacts.verify_subject(storage, "dog", fp,
                                                                   "s1").reason
    storage.remove("subjects/dog/done.json")
    assert "unfinished" in artifacts.verify_subject(storage, "dog", fp, "s1").reason


def test_scale_set_of_another_subject_or_garbage_is_not_finished(tmp_path):
    storage = Storage(str(tmp_path))
    fp = "f" * 64
    meta = {"status": "done", "base": {"fingerprint": fp}, "spec_hash": "s1"}
    artifacts.write_subject(storage, "dog", _scale_set_bytes("cat", fp), meta, [])
    assert "not dog" in artifacts.verify_subject(storage, "dog", fp, "s1").reason
    artifacts.write_subject(storage, "dog", b"\x80\x04pickle-ish", meta, [])
    assert "does not load" in artifacts.verify_subject(storage, "dog", fp, "s1").reason
