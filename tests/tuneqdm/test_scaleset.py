"""Scale sets: bit-exact round trip, and clear refusals of what does not fit."""

from __future__ import annotations

import pickle

import pytest
import torch

from tuneqdm import QuantConfig, quantized_layers
from tuneqdm.base import load_quantized_pipeline, quantize_pipeline
from tuneqdm.scaleset import ScaleSet, ScaleSetError, apply_scale_set


@pytest.fixture
def unet(tiny_base_dir):
    return load_quantized_pipeline(tiny_base_dir).unet


def _perturbed_set(unet, seed=0) -> ScaleSet:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quantized_layers(unet).values():
            layer.scale_out.mul_(1 + 0.1 * torch.randn(layer.scale_out.shape, generator=generator))
            layer.scale_in.mul_(1 + 0.1 * torch.randn(layer.scale_in.shape, generator=generator))
    subjects = [{"subject_id": "dog", "token": "sks", "class_noun": "dog"}]
    return ScaleSet.from_model(unet, subjects=subjects, training={"steps": 3}, final_loss=0.25)


def test_round_trip_bit_exact(unet, tmp_path):
    scale_set = _perturbed_set(unet)
    path = scale_set.save(tmp_path / "scales.safetensors")
    loaded = ScaleSet.load(path)
    assert loaded.to_bytes() == path.read_bytes()
    assert loaded.tensors.keys() == scale_set.tensors.keys()
    for name, tensor in scale_set.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    assert loaded.subjects == scale_set.subjects and loaded.final_loss == 0.25
    assert loaded.training == {"steps": 3} and loaded.num_experts == 2
    # two saves of the same set are the same bytes (metadata order is stable)
    assert scale_set.to_bytes() == scale_set.to_bytes()


def test_apply_restores_the_trained_weights(unet, tiny_base_dir):
    scale_set = _perturbed_set(unet)
    expected = {n: layer.dequantized_weight(1) for n, layer in quantized_layers(unet).items()}
    fresh = load_quantized_pipeline(tiny_base_dir).unet
    apply_scale_set(fresh, scale_set)
    for name, layer in quantized_layers(fresh).items():
        assert torch.equal(layer.dequantized_weight(1), expected[name]), name


def test_fp16_is_half_the_size(unet):
    scale_set = _perturbed_set(unet)
    full, half = scale_set.to_bytes(), scale_set.to_bytes(torch.float16)

    def data_bytes(blob: bytes) -> int:
        return len(blob) - 8 - int.from_bytes(blob[:8], "little")

    assert data_bytes(full) == 4 * scale_set.num_scales
    assert data_bytes(half) == 2 * scale_set.num_scales
    loaded = ScaleSet.from_bytes(half)
    for name, tensor in scale_set.tensors.items():
        torch.testing.assert_close(loaded.tensors[name], tensor, rtol=1e-3, atol=1e-6)


def test_other_base_is_refused(unet, tiny_pipeline_dir, tmp_path):
    scale_set = _perturbed_set(unet)
    quantize_pipeline(tiny_pipeline_dir, tmp_path / "w3", QuantConfig(bits=3, num_experts=2))
    other = load_quantized_pipeline(tmp_path / "w3").unet
    with pytest.raises(ScaleSetError, match="trained on base"):
        apply_scale_set(other, scale_set)


def test_wrong_shape_is_refused(unet):
    scale_set = _perturbed_set(unet)
    name = next(iter(scale_set.tensors))
    scale_set.tensors[name] = scale_set.tensors[name][:, :-1]
    with pytest.raises(ScaleSetError, match=f"{name} has shape"):
        apply_scale_set(unet, scale_set)


def test_method_mismatch_is_refused(unet, tiny_base_dir):
    scale_set = _perturbed_set(unet)
    peqa = load_quantized_pipeline(tiny_base_dir, config_override=QuantConfig.peqa(bits=4)).unet
    with pytest.raises(ScaleSetError, match="method=tuneqdm N=2"):
        apply_scale_set(peqa, scale_set)


def test_unknown_version_is_refused(unet):
    scale_set = _perturbed_set(unet)
    data = scale_set.to_bytes().replace(b'"format_version":"1"', b'"format_version":"9"')
    with pytest.raises(ScaleSetError, match="unknown scale-set format_version '9'"):
        ScaleSet.from_bytes(data)


def test_pickle_is_refused(unet, tmp_path):
    path = tmp_path / "scales.safetensors"
    path.write_bytes(pickle.dumps({"scale_out": torch.ones(3)}))
    with pytest.raises(ScaleSetError, match="pickles and other formats are refused"):
        ScaleSet.load(path)
    torch.save({"x": torch.ones(2)}, tmp_path / "torch.pt")
    with pytest.raises(ScaleSetError, match="not a safetensors"):
        ScaleSet.load(tmp_path / "torch.pt")
    with pytest.raises(ScaleSetError, match="does not exist"):
        ScaleSet.load(tmp_path / "missing.safetensors")
