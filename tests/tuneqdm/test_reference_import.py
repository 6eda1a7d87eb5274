"""Import of the released implementation's checkpoint layout into our artefacts."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from tuneqdm import QuantConfig, quantized_layers
from tuneqdm.base import load_float_pipeline, load_quantized_pipeline
from tuneqdm.quant import quantize_weight
from tuneqdm.reference_import import ReferenceCheckpointError, import_reference_checkpoint
from tuneqdm.scaleset import ScaleSet, apply_scale_set

N = 2


def _write_reference_checkpoint(float_dir, path, unsigned: bool = False) -> dict:
    """A checkpoint in the released layout, made from the tiny pipeline's float UNet:
    8-bit asymmetric integers, perturbed per-expert scales, zero points (out, 1[, 1, 1])."""
    unet = load_float_pipeline(float_dir).unet
    config = QuantConfig(bits=8, num_experts=N)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        q, zero, scale0 = quantize_weight(module.weight, config)
        out, inp = module.weight.shape[:2]
        conv = isinstance(module, nn.Conv2d)
        tail = (1, 1) if conv else ()
        delta_out = scale0.view(1, out) * (1 + 0.05 * torch.randn(N, out, generator=generator))
        delta_in = 1 + 0.05 * torch.randn(N, inp, generator=generator)
        if unsigned:  # some exports keep the grid as [0, 2^b)
            q, zero = (q.to(torch.int16) + 128).to(torch.uint8), zero + 128
        state[f"{name}.weight_int"] = q
        state[f"{name}.zero_point"] = zero.view(out, 1, *tail)
        state[f"{name}.delta_out_experts"] = delta_out.view(N, out, 1, *tail)
        state[f"{name}.delta_in_experts"] = delta_in.view(N, 1, inp, *tail)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().clone()
    config_dict = {
        "n_bits": 8,
        "symmetric": False,
        "num_experts": N,
        "total_denoising_steps": 1000,
        "train_delta_in": True,
        "train_bias": False,
    }
    torch.save({"delta_state": state, "config": config_dict}, path)
    return state


def _reference_weight(state, name, expert):
    """The released forward: W = (weight_int - zero_point) * delta_out[i] * delta_in[i]."""
    q = state[f"{name}.weight_int"].double()
    return (
        (q - state[f"{name}.zero_point"].double())
        * state[f"{name}.delta_out_experts"][expert].double()
        * state[f"{name}.delta_in_experts"][expert].double()
    )


@pytest.mark.parametrize("unsigned", [False, True])
def test_import_reproduces_the_released_forward(tiny_pipeline_dir, tmp_path, unsigned):
    state = _write_reference_checkpoint(tiny_pipeline_dir, tmp_path / "ckpt.pt", unsigned)
    info, scale_set = import_reference_checkpoint(
        tmp_path / "ckpt.pt", tiny_pipeline_dir, tmp_path / "base"
    )
    assert info["scale0_source"] == {"recomputed": len(info["layers"])}
    path = scale_set.save(tmp_path / "scales.safetensors")
    unet = load_quantized_pipeline(tmp_path / "base").unet
    apply_scale_set(unet, ScaleSet.load(path))
    for name, layer in quantized_layers(unet).items():
        for expert in range(N):
            ours = layer.dequantized_weight(expert).double()
            torch.testing.assert_close(
                ours, _reference_weight(state, name, expert), rtol=1e-6, atol=1e-9
            )


def test_whole_unet_matches_the_float_model_with_released_weights(tiny_pipeline_dir, tmp_path):
    state = _write_reference_checkpoint(tiny_pipeline_dir, tmp_path / "ckpt.pt")
    _, scale_set = import_reference_checkpoint(
        tmp_path / "ckpt.pt", tiny_pipeline_dir, tmp_path / "base"
    )
    unet = load_quantized_pipeline(tmp_path / "base").unet
    apply_scale_set(unet, scale_set)
    reference = load_float_pipeline(tiny_pipeline_dir).unet
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    for t, expert in ((100, 0), (900, 1)):
        with torch.no_grad():
            for name, module in reference.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.weight.copy_(_reference_weight(state, name, expert).float())
            expected = reference(sample, t, encoder_hidden_states=text).sample
            got = unet(sample, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pickled_code_and_bad_layouts_are_refused(tiny_pipeline_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"delta_state": Payload(), "config": {}}))
    with pytest.raises(ReferenceCheckpointError, match="weights-only"):
        import_reference_checkpoint(tmp_path / "evil.pt", tiny_pipeline_dir, tmp_path / "b")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ReferenceCheckpointError, match="'delta_state' and 'config'"):
        import_reference_checkpoint(tmp_path / "other.pt", tiny_pipeline_dir, tmp_path / "b")
    state = _write_reference_checkpoint(tiny_pipeline_dir, tmp_path / "ckpt.pt")
    state["conv_in.weight_int"] = state["conv_in.weight_int"][:, :2]
    config = {"n_bits": 8, "symmetric": False, "num_experts": N, "total_denoising_steps": 1000}
    torch.save({"delta_state": state, "config": config}, tmp_path / "bad.pt")
    with pytest.raises(ReferenceCheckpointError, match=r"conv_in\.weight_int has shape"):
        import_reference_checkpoint(tmp_path / "bad.pt", tiny_pipeline_dir, tmp_path / "b")
