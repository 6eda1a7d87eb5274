"""`tuneqdm-pipeline import-reference`: the authors' released checkpoint becomes a base
and a subject that `status`, `generate` and the service's store see like trained ones;
checkpoints of one quantized model share one base; bad input writes nothing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tuneqdm.testing import save_tiny_pipeline, write_reference_checkpoint
from tuneqdm_cli.main import main

N = 2


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def checkpoints(float_model, tmp_path_factory):
    """Two released-format checkpoints of the same model: (path, delta_state) each."""
    folder = tmp_path_factory.mktemp("ckpt")
    return [(folder / f"s{seed}.pt",
             write_reference_checkpoint(float_model, folder / f"s{seed}.pt", N, seed=seed))
            for seed in (0, 1)]


def _import(path, float_model, out, subject, *extra):
    return CliRunner().invoke(main, ["import-reference", str(path), "--base-model",
                                     str(float_model), "--subject-id", subject, "--class",
                                     "dog", "-o", str(out), *extra])


def test_import_then_status_generate_and_the_service_store(checkpoints, float_model,
                                                          tmp_path):
    from deploy.store import SubjectStore
    from tuneqdm.scaleset import ScaleSet

    (first, state), (second, _) = checkpoints
    out = tmp_path / "out"
    result = _import(first, float_model, out, "ref-dog", "--token", "zwx")
    assert result.exit_code == 0, result.output
    (base,) = [p for p in (out / "bases").iterdir() if not p.name.startswith(".")]
    assert "imported " in result.output and "8-bit tuneqdm, N=2" in result.output
    assert f"base     {base} (written;" in result.output
    assert f"serve it: tuneqdm-pipeline serve {out} --base {base.name}" in result.output
    done = json.loads((base / "done.json").read_text())
    assert done["fingerprint"] == json.loads((base / "quant.json").read_text())["fingerprint"]

    # the stored scales are the checkpoint's, expert by expert
    scale_set = ScaleSet.load(out / "subjects" / "ref-dog" / "scales.safetensors")
    assert scale_set.base_fingerprint == done["fingerprint"]
    assert scale_set.subject_ids == ["ref-dog"]
    delta_out = state["conv_in.delta_out_experts"].reshape(N, -1)
    assert torch.equal(scale_set.tensors["conv_in.scale_out"], delta_out)

    status = CliRunner().invoke(main, ["status", str(out), "--verify"])
    assert status.exit_code == 0, status.output
    assert "1 subject(s): 1 done" in status.output
    info = SubjectStore(str(out)).servable("ref-dog")
    assert (info.token, info.class_noun, info.num_experts, info.bits) == ("zwx", "dog", N, 8)

    image = tmp_path / "dog.png"
    generated = CliRunner().invoke(main, ["generate", str(out), "ref-dog",
                                          "a photo of {token} {class_noun}", "--steps", "2",
                                          "-o", str(image)])
    assert generated.exit_code == 0, generated.output
    with Image.open(image) as png:
        assert png.size == (16, 16)

    # another checkpoint of the same quantized model: same base, a second subject
    again = _import(second, float_model, out, "ref-cat")
    assert again.exit_code == 0, again.output
    assert "(already there, reused;" in again.output
    assert [p.name for p in (out / "bases").iterdir() if not p.name.startswith(".")] == [
        base.name]
    assert len(SubjectStore(str(out)).list_subjects()) == 2


def test_bad_input_writes_nothing(checkpoints, float_model, tmp_path):
    (first, _), _ = checkpoints
    out = tmp_path / "out"
    bad_id = _import(first, float_model, out, "Bad Id")
    assert bad_id.exit_code == 2 and "subject id 'Bad Id' is not a valid id" in bad_id.output
    bad_prompt = _import(first, float_model, out, "dog", "--prompt", "a {class_noun}")
    assert bad_prompt.exit_code == 2 and "must contain {token}" in bad_prompt.output
    assert not out.exists()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"delta_state": Payload(), "config": {}}))
    refused = _import(evil, float_model, out, "dog")
    assert refused.exit_code == 1 and "weights-only" in refused.output
    assert "Traceback" not in refused.output and not (out / "subjects").exists()

    assert _import(first, float_model, out, "dog").exit_code == 0
    twice = _import(first, float_model, out, "dog")
    assert twice.exit_code == 2 and "already has a finished scale set" in twice.output
    assert _import(first, float_model, out, "dog", "--overwrite").exit_code == 0
