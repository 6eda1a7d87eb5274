"""deploy/store.py reads subjects through the store's one verifier: each defect of a
subject folder becomes the Serve error it always was (404 not there, 409 does not fit
the served base), and folders written before the records were typed still serve.
No Ray and no trained pipeline: the base is a marker and a quant.json."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from deploy.errors import InvalidRequest, SubjectMismatch, SubjectNotFound
from deploy.store import SubjectStore
from pipeline.store import Storage, SubjectMeta, write_base, write_subject
from tuneqdm.scaleset import ScaleSet

SERVED = "a" * 64
OTHER = "0" * 64


def _scales(subject_id: str, fingerprint: str = SERVED) -> bytes:
    return ScaleSet(tensors={"layer.scale_out": torch.ones(2, 3)}, method="tuneqdm",
                    num_experts=2, num_train_timesteps=1000, base_fingerprint=fingerprint,
                    subjects=[{"subject_id": subject_id, "token": "sks",
                               "class_noun": "dog"}]).to_bytes()


def _meta(subject_id: str, fingerprint: str = SERVED) -> SubjectMeta:
    return SubjectMeta(subject_id=subject_id, base_fingerprint=fingerprint, spec_hash="s",
                       class_noun="dog", token="sks", prompt="a photo of {token} {class_noun}",
                       quant_config={"method": "tuneqdm", "bits": 4, "num_experts": 2},
                       final_loss=0.5, steps=3, finished_at="2026-01-01T00:00:00+0000")


@pytest.fixture
def output(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "quant.json").write_text(json.dumps({"fingerprint": SERVED, "source": "/m",
                                                 "quant_config": {"bits": 4}}))
    write_base(storage, "b" * 24, base)
    write_subject(storage, "dog", _scales("dog"), _meta("dog"), [])
    write_subject(storage, "alien", _scales("alien", OTHER), _meta("alien", OTHER), [])
    write_subject(storage, "swapped", _scales("dog"), _meta("swapped"), [])
    write_subject(storage, "forged", _scales("forged", OTHER), _meta("forged"), [])
    write_subject(storage, "garbage", b"\x80\x04pickle", _meta("garbage"), [])
    for name in ("corrupt", "unmeta", "noscales"):
        write_subject(storage, name, _scales(name), _meta(name), [])
    storage.write_bytes("subjects/corrupt/scales.safetensors", _scales("corrupt")[:-1] + b" ")
    storage.write_bytes("subjects/unmeta/meta.json", b"{}")
    storage.remove("subjects/noscales/scales.safetensors")
    storage.write_bytes("subjects/halfway/meta.json", b"{}")
    return storage


def test_serve_errors_for_each_defect(output):
    store = SubjectStore(output.root)
    assert store.base.fingerprint == SERVED and store.base.quant_config == {"bits": 4}
    scale_set, info = store.read_scale_set("dog")
    assert scale_set.subject_ids == ["dog"] and info.servable
    assert info.instance_prompt == "a photo of sks dog" and info.bits == 4
    cases = [
        ("nobody", SubjectNotFound, "no finished scale set of that id"),
        ("halfway", SubjectNotFound, "no finished scale set of that id"),
        ("noscales", SubjectNotFound, "scales.safetensors is missing"),
        ("alien", SubjectMismatch, "was trained on base 000000000000..."),
        ("corrupt", SubjectMismatch, "does not match its checksum (changed or corrupt"),
        ("garbage", SubjectMismatch, "scale set of 'garbage' is not a safetensors"),
        ("forged", SubjectMismatch, "names base 000000000000..., not the served base"),
        ("swapped", SubjectMismatch, "scale set is for ['dog'], not swapped"),
        ("unmeta", SubjectMismatch, "meta.json does not match its checksum"),
    ]
    for subject_id, error, message in cases:
        with pytest.raises(error) as raised:
            store.read_scale_set(subject_id)
        assert message in str(raised.value), subject_id
    listed = [(s.subject_id, s.servable) for s in store.list_subjects()]
    assert listed == [("alien", False), ("corrupt", True), ("dog", True), ("forged", True),
                      ("garbage", True), ("noscales", True), ("swapped", True)]


def test_folders_written_before_typed_records_still_serve(output):
    """done.json with the fingerprint and spec hash, meta.json with status and the
    instance prompt: what earlier versions wrote."""
    data = _scales("old")
    meta = {"status": "done", "subject_id": "old", "class_noun": "dog", "token": "zwx",
            "prompt": "a photo of {token} {class_noun}", "instance_prompt": "a photo of zwx dog",
            "quant_config": {"method": "tuneqdm", "bits": 4}, "spec_hash": "s",
            "base": {"address": "b" * 24, "fingerprint": SERVED, "source": "/m"}}
    meta_bytes = json.dumps(meta).encode()
    output.write_bytes("subjects/old/scales.safetensors", data)
    output.write_bytes("subjects/old/meta.json", meta_bytes)
    output.write_json("subjects/old/done.json", {
        "status": "done", "subject_id": "old", "base_fingerprint": SERVED, "spec_hash": "s",
        "files": {"scales.safetensors": hashlib.sha256(data).hexdigest(),
                  "meta.json": hashlib.sha256(meta_bytes).hexdigest()}})
    scale_set, info = SubjectStore(output.root).read_scale_set("old")
    assert scale_set.subject_ids == ["old"]
    assert (info.token, info.instance_prompt, info.servable) == ("zwx", "a photo of zwx dog",
                                                                 True)


def test_samples_are_read_checked_and_bounded(output):
    """GET .../samples/{index}'s reader: the listed file's bytes, or the error of each
    defect; an index is bounded before any storage access."""
    pngs = [b"\x89PNG first", b"\x89PNG second"]
    meta = dataclasses.replace(_meta("pictured"), images=("/p/a.jpg", "/p/b.jpg", "/p/c.jpg"))
    write_subject(output, "pictured", _scales("pictured"), meta, pngs)
    store = SubjectStore(output.root)
    assert [store.read_sample("pictured", i) for i in (0, 1)] == pngs
    info = store.describe("pictured")
    assert (info.samples, info.training_photos) == (2, 3)
    assert (store.describe("dog").samples, store.describe("dog").training_photos) == (0, 0)
    assert info.photos == 0  # written without thumbnails (as before they were kept)
    thumbs = [b"\x89PNG thumb a", b"\x89PNG thumb b", b"\x89PNG thumb c"]
    write_subject(output, "thumbed", _scales("thumbed"), dataclasses.replace(
        _meta("thumbed"), images=("/p/a.jpg", "/p/b.jpg", "/p/c.jpg")), [], photos=thumbs)
    assert store.describe("thumbed").photos == 3
    assert [store.read_sample("thumbed", i, "photo") for i in range(3)] == thumbs
    with pytest.raises(SubjectNotFound, match=r"has no sample 0 \(its samples: none\)"):
        store.read_sample("thumbed", 0)
    with pytest.raises(InvalidRequest, match=r"photo index 100 is invalid"):
        store.read_sample("thumbed", 100, "photo")
    cases = [
        ("pictured", 2, SubjectNotFound, "has no sample 2 (its samples: 0..1)"),
        ("dog", 0, SubjectNotFound, "has no sample 0 (its samples: none)"),
        ("nobody", 0, SubjectNotFound, "no finished scale set of that id"),
        ("halfway", 0, SubjectNotFound, "no finished scale set of that id"),
        ("pictured", 100, InvalidRequest, "sample index 100 is invalid: use an integer in "
                                          "[0, 99]"),
        ("pictured", -1, InvalidRequest, "sample index -1 is invalid"),
        ("pictured", True, InvalidRequest, "sample index True is invalid"),
        ("../dog", 0, InvalidRequest, "subject id '../dog' is invalid"),
    ]
    for subject_id, index, error, message in cases:
        with pytest.raises(error) as raised:
            store.read_sample(subject_id, index)
        assert message in str(raised.value), (subject_id, index)
    output.write_bytes("subjects/pictured/samples/01.png", b"\x89PNG changed")
    with pytest.raises(SubjectMismatch, match=r"01\.png does not match its checksum"):
        store.read_sample("pictured", 1)
    output.remove("subjects/pictured/samples/00.png")
    with pytest.raises(SubjectNotFound, match=r"samples/00\.png is missing"):
        store.read_sample("pictured", 0)
