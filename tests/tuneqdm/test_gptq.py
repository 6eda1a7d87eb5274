"""GPTQ rounding (tuneqdm/gptq.py): same grid as round-to-nearest, smaller output error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tuneqdm import QuantConfig, quantize_, quantized_layers
from tuneqdm.gptq import collect_hessians, gptq_round, layer_columns
from tuneqdm.quant import dequantize_weight, quantize_weight


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) inputs whose columns correlate strongly, as a layer's inputs do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g) + 0.3 * (
        torch.randn(n, k, generator=g) @ mix)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_keeps_the_grid_and_lowers_the_output_error(bits):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 40, generator=g)
    x = correlated_inputs(2000, 40)
    config = QuantConfig(bits=bits)
    gptq = QuantConfig(bits=bits, rounding="gptq")
    q_rtn, z_rtn, s_rtn = quantize_weight(weight, config)
    q, z, s = quantize_weight(weight, gptq, x.T.double() @ x.double() / len(x))
    assert torch.equal(z, z_rtn) and torch.equal(s, s_rtn)  # the same grid and format
    assert q.dtype == torch.int8 and q.min() >= config.qmin and q.max() <= config.qmax
    assert not torch.equal(q, q_rtn)

    def output_error(ints):
        return (x @ (dequantize_weight(ints, z, s) - weight).T).pow(2).mean().item()

    assert output_error(q) < 0.7 * output_error(q_rtn)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    # H diagonal: no error moves to other columns, so every integer is RTN's
    weight = torch.randn(16, 30, generator=torch.Generator().manual_seed(2))
    hessian = torch.diag(torch.rand(30, generator=torch.Generator().manual_seed(3)) + 0.5)
    q_rtn, zero, scale = quantize_weight(weight, QuantConfig(bits=4))
    q = gptq_round(weight, scale, zero, hessian, -8, 7)
    assert torch.equal(q, q_rtn)


def test_gptq_ignores_inputs_that_never_fire():
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(500, 12)
    x[:, 5] = 0.0
    _, zero, scale = quantize_weight(weight, QuantConfig(bits=4))
    q = gptq_round(weight, scale, zero, x.T @ x / len(x), -8, 7)
    assert torch.equal(q[:, 5], torch.round(zero).to(torch.int8))  # weight taken as 0
    assert torch.isfinite(dequantize_weight(q, zero, scale)).all()


def test_layer_columns_are_the_conv_as_a_matmul():
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    columns = layer_columns(conv, x)  # (2 * 25, 27)
    out = conv(x) - conv.bias.view(1, -1, 1, 1)  # (2, 5, 5, 5)
    flat = columns @ conv.weight.reshape(5, -1).T  # (50, 5)
    assert torch.allclose(flat, out.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-5)
    with pytest.raises(ValueError, match="groups=1 and zero padding; got groups=3"):
        layer_columns(nn.Conv2d(3, 6, 3, groups=3), x)


def small_model() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


def test_quantize_with_collected_hessians_beats_round_to_nearest_on_the_model():
    model = small_model()
    inputs = torch.randn(64, 3, 6, 6).cumsum(dim=1)  # correlated channels

    def run_batches(m):
        for batch in inputs.split(16):
            m(batch)

    hessians = collect_hessians(model, run_batches)
    assert set(hessians) == {"0", "3"}
    assert hessians["0"].shape == (27, 27) and hessians["3"].shape == (288, 288)
    reference = model(inputs).detach()
    errors = {}
    for rounding in ("nearest", "gptq"):
        copy = small_model()
        quantize_(copy, QuantConfig(bits=4, rounding=rounding, method="peqa", num_experts=1),
                  hessians=hessians if rounding == "gptq" else None)
        errors[rounding] = (copy(inputs) - reference).pow(2).mean().item()
    assert errors["gptq"] < 0.8 * errors["nearest"]


def test_quantize_says_when_hessians_are_missing_or_unexpected():
    config = QuantConfig(bits=4, rounding="gptq")
    with pytest.raises(ValueError, match="rounding='gptq' needs hessians"):
        quantize_(small_model(), config)
    with pytest.raises(ValueError, match=r"no hessian for layer\(s\) \['3'\]"):
        quantize_(small_model(), config, hessians={"0": torch.eye(27)})
    with pytest.raises(ValueError, match="hessians are for rounding='gptq' only"):
        quantize_(small_model(), QuantConfig(bits=4), hessians={"0": torch.eye(27)})
    with pytest.raises(ValueError, match="a hessian goes with rounding='gptq'"):
        quantize_weight(torch.randn(4, 4), config)
    with pytest.raises(ValueError, match="does not match the weight's 4 input columns"):
        gptq_round(torch.randn(4, 4), torch.ones(4), torch.zeros(4), torch.eye(3), -8, 7)
    model = small_model()
    with pytest.raises(ValueError, match=r"never ran layer\(s\) \['3'\]"):
        collect_hessians(model, lambda m: m[0](torch.randn(1, 3, 6, 6)))
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed on error


def test_a_gptq_layer_trains_its_scales_like_any_other():
    model = small_model()
    hessians = collect_hessians(model, lambda m: m(torch.randn(32, 3, 6, 6)))
    quantize_(model, QuantConfig(bits=4, rounding="gptq", num_experts=1), hessians=hessians)
    layers = quantized_layers(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.{t}" for n in layers for t in ("scale_out",
                                                                             "scale_in"))
