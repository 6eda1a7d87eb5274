"""The quantized base artefact: layout, bit-exact round trip, fingerprint, errors."""

from __future__ import annotations

import json

import pytest
import torch

from tuneqdm import QuantConfig, quantized_layers
from tuneqdm.base import (
    UNET_WEIGHTS,
    BaseModelError,
    frozen_state_dict,
    load_float_pipeline,
    load_quantized_pipeline,
    quantize_pipeline,
    read_base_info,
)


def test_layout_and_info(tiny_base_dir):
    info = read_base_info(tiny_base_dir)
    for part in (
        "model_index.json",
        "tokenizer",
        "text_encoder",
        "vae",
        "scheduler",
        "unet/config.json",
        UNET_WEIGHTS,
    ):
        assert (tiny_base_dir / part).exists(), part
    assert info["quant_config"]["bits"] == 4
    assert len(info["layers"]) == 83  # every Linear and Conv2d of the tiny UNet
    assert len(info["fingerprint"]) == 64


def test_round_trip_is_bit_exact(tiny_pipeline_dir, tiny_base_dir, tmp_path):
    pipe = load_float_pipeline(tiny_pipeline_dir)
    from tuneqdm import quantize_

    quantize_(pipe.unet, QuantConfig(bits=4, num_experts=2))
    expected = frozen_state_dict(pipe.unet)
    loaded = frozen_state_dict(load_quantized_pipeline(tiny_base_dir).unet)
    assert expected.keys() == loaded.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == loaded[name].dtype and torch.equal(tensor, loaded[name]), name
    # quantizing again writes the very same bytes
    again = tmp_path / "again"
    quantize_pipeline(tiny_pipeline_dir, again, QuantConfig(bits=4, num_experts=2))
    assert (again / UNET_WEIGHTS).read_bytes() == (tiny_base_dir / UNET_WEIGHTS).read_bytes()


def test_loaded_unet_matches_float_at_8_bits(tiny_pipeline_dir, tmp_path):
    quantize_pipeline(
        tiny_pipeline_dir, tmp_path / "w8", QuantConfig(bits=8, num_experts=1, method="peqa")
    )
    float_unet = load_float_pipeline(tiny_pipeline_dir).unet
    quant_unet = load_quantized_pipeline(tmp_path / "w8").unet
    sample = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 32)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = float_unet(sample, t, encoder_hidden_states=text).sample
        out = quant_unet(sample, t, encoder_hidden_states=text).sample
    relative = (out - ref).norm() / ref.norm()
    assert relative < 0.02, relative


def test_scales_start_at_s0_and_one(tiny_base_dir):
    unet = load_quantized_pipeline(tiny_base_dir).unet
    for layer in quantized_layers(unet).values():
        assert layer.scale_out.shape[0] == 2 and layer.scale_out.requires_grad
        assert torch.equal(layer.scale_out[1], layer.scale0)
        assert torch.all(layer.scale_in == 1)
    frozen = [n for n, p in unet.named_parameters() if p.requires_grad and "scale_" not in n]
    assert frozen == []


def test_tampered_weights_are_refused(tiny_base_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base_dir, copy)
    data = bytearray((copy / UNET_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (copy / UNET_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match="fingerprint"):
        load_quantized_pipeline(copy)


def test_unknown_version_and_missing_base(tiny_base_dir, tmp_path):
    with pytest.raises(BaseModelError, match="not a quantized base"):
        read_base_info(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_base_dir, copy)
    info = json.loads((copy / "quant.json").read_text())
    info["format_version"] = 99
    (copy / "quant.json").write_text(json.dumps(info))
    with pytest.raises(BaseModelError, match="format_version 99"):
        read_base_info(copy)


def test_config_override_cannot_change_bits(tiny_base_dir):
    with pytest.raises(BaseModelError, match="4-bit"):
        load_quantized_pipeline(tiny_base_dir, config_override=QuantConfig(bits=8))
    pipe = load_quantized_pipeline(tiny_base_dir, config_override=QuantConfig.peqa(bits=4))
    layer = next(iter(quantized_layers(pipe.unet).values()))
    assert layer.scale_in is None and layer.scale_out.shape[0] == 1
