"""The inference path of the quantized layers, the weight cache, and fp16 safety.

Without a gradient the layers skip autograd (functional.scaled_quant_linear / _conv2d)
and may read a cached centred weight (tuneqdm.inference). Both must equal the plain
formula y = s_out * ((W_q - z) @ (s_in x)) + bias, built here from the integers in
float64 and run through the ORIGINAL float module (its own padding and groups).
fp16: the kernels' pre-scale output u is in integer units, about 1/s0 times the
layer's output; the inputs below drive it past fp16's 65,504 while the layer's real
output stays small, which overflowed before the weight was pre-scaled per row.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tuneqdm import QuantConfig, quantize_
from tuneqdm.functional import ScaledQuantConv2d, ScaledQuantLinear
from tuneqdm.inference import (
    cache_expanded_weights,
    clear_expanded_weights,
    expanded_weight_bytes,
)
from tuneqdm.packed import EXPANDED_WEIGHT, fp16_row_factor

LAYERS = [
    ("linear-3d", lambda: nn.Linear(12, 10), (3, 4, 12)),
    ("linear-nobias", lambda: nn.Linear(12, 10, bias=False), (3, 12)),
    ("conv-3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), (3, 6, 5, 5)),
    ("conv-strided-grouped", lambda: nn.Conv2d(6, 4, 3, 2, 1, groups=2), (3, 6, 7, 7)),
    ("conv-reflect-1x3", lambda: nn.Conv2d(4, 6, (1, 3), 1, (0, 1), padding_mode="reflect"),
     (2, 4, 5, 5)),
]  # fmt: skip
CONFIGS = [
    ("peqa-8", QuantConfig.peqa(bits=8)),
    ("tuneqdm-4-N3", QuantConfig(bits=4, num_experts=3)),
    ("tuneqdm-3-N2-sym", QuantConfig(bits=3, num_experts=2, symmetric=True)),
    ("tuneqdm-2-N2", QuantConfig(bits=2, num_experts=2)),
]


def quantized(factory, config: QuantConfig, dtype=torch.float64, seed: int = 0):
    """(float layer, its quantized copy with scales moved off their initial values)."""
    torch.manual_seed(seed)
    original = factory().to(dtype)
    model = nn.Sequential(copy.deepcopy(original))
    quantize_(model, config)
    layer = model[0]
    layer.bias = None if layer.bias is None else layer.bias.to(dtype)
    with torch.no_grad():
        layer.scale_out.mul_(1 + 0.2 * torch.randn_like(layer.scale_out))
        if layer.scale_in is not None:
            layer.scale_in.mul_(1 + 0.2 * torch.randn_like(layer.scale_in))
    return original, layer


def plain_formula(original, layer, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sample by sample: the float module with W_r = s_out[r] (W_q - z) s_in[r], float64."""
    view = (-1,) + (1,) * (len(layer.weight_shape) - 1)
    centred = layer.int_weight().double() - layer.zero.double().view(view)
    outputs = []
    for b, row in enumerate(rows.tolist()):
        weight = layer.scale_out[row].detach().double().view(view) * centred
        if layer.scale_in is not None:
            weight = weight * layer.weight_in_scale(layer.scale_in[row].detach().double())
        params = {"weight": weight}
        if layer.bias is not None:
            params["bias"] = layer.bias.double()
        outputs.append(functional_call(original.double(), params, (x[b : b + 1].double(),)))
    return torch.cat(outputs)


@pytest.mark.parametrize("cached", [False, True], ids=["expanded-per-call", "cached"])
@pytest.mark.parametrize("config_name, config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=[spec[0] for spec in LAYERS])
def test_inference_path_equals_plain_formula(name, factory, shape, config_name, config, cached):
    original, layer = quantized(factory, config)
    rows = torch.randint(0, config.num_experts, (shape[0],))
    layer.router.rows = rows
    x = torch.randn(shape, dtype=torch.float64)
    if cached:
        size = cache_expanded_weights(layer, torch.float64)
        assert size == layer.out_features * 8 * layer.int_weight()[0].numel()
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, plain_formula(original, layer, x, rows), rtol=1e-10, atol=1e-12)
    # float32, as served
    layer32 = copy.deepcopy(layer).float()
    if cached:
        cache_expanded_weights(layer32, torch.float32)
    with torch.inference_mode():
        y32 = layer32(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True], ids=["expanded-per-call", "cached"])
@pytest.mark.parametrize(
    "name, factory, shape",
    [
        ("linear", lambda: nn.Linear(12, 10), (2, 64, 12)),
        ("conv", lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 12, 12)),
        ("conv-reflect-nobias", lambda: nn.Conv2d(6, 8, 3, 1, 1, bias=False,
                                                  padding_mode="reflect"), (2, 6, 9, 9)),
    ],
)  # fmt: skip
def test_one_row_batches_scale_the_weight_and_match(name, factory, shape, cached):
    """A batch whose samples share one row (one subject, one timestep) and whose input
    outweighs the weight takes W_r = s_out (W_q - z) s_in and the float layer's op."""
    original, layer = quantized(factory, QuantConfig(bits=4, num_experts=3))
    x = torch.randn(shape, dtype=torch.float64)
    assert 2 * layer.int_weight().numel() <= x.numel()  # the weight-scaling case
    if cached:
        cache_expanded_weights(layer, torch.float64)
    for rows in (torch.tensor([2, 2]), torch.tensor([2, 0])):  # one row; two rows
        layer.router.rows = rows
        with torch.no_grad():
            y = layer(x)
        want = plain_formula(original, layer, x, rows)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    if cached:  # the cache itself is never scaled in place
        layer.router.rows = torch.tensor([1, 1])
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, plain_formula(original, layer, x, layer.router.rows))


def test_no_grad_skips_autograd_and_grad_uses_it():
    _, layer = quantized(LAYERS[2][1], QuantConfig(bits=4, num_experts=1), torch.float32)
    layer.router = None
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    y = layer(x)  # the scales require grad: the custom Function records
    assert type(y.grad_fn).__name__ == ScaledQuantConv2d.__name__ + "Backward"
    linear = quantized(LAYERS[0][1], QuantConfig(bits=8, num_experts=1), torch.float32)[1]
    linear.router = None
    backward = type(linear(torch.randn(2, 12)).grad_fn).__name__
    assert backward == ScaledQuantLinear.__name__ + "Backward"


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("config_name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_training_with_the_cache_matches_per_call_expansion(
    name, factory, shape, config_name, config
):
    """Training reads the cache when it holds the compute dtype: the same output and
    gradients for x, s_in and s_out as expanding per call (which folds the zero point
    out in fp32, so equal to float32 rounding, not bit for bit)."""
    _, layer = quantized(factory, config, torch.float32)
    torch.manual_seed(1)
    layer.router.rows = torch.randint(0, config.num_experts, (shape[0],))
    x = torch.randn(shape)
    grad_y = torch.randn_like(layer(x))
    results = []
    for cached in (False, True):
        if cached:
            assert cache_expanded_weights(layer) > 0
        xr = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(xr)
        y.backward(grad_y)
        grads = [xr.grad, layer.scale_out.grad]
        if layer.scale_in is not None:
            grads.append(layer.scale_in.grad)
        results.append([y.detach(), *grads])
    for plain, fast in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    # and the cache is what training read: a doctored one changes the output
    cache = layer.__dict__[EXPANDED_WEIGHT]
    cache.weight = cache.weight * 2
    assert not torch.equal(layer(x.clone().requires_grad_(True)).detach(), results[0][0])
    clear_expanded_weights(layer)


def test_cache_bytes_clear_and_staleness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    quantize_(model, QuantConfig(bits=4, num_experts=1))
    model.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
    weights = 8 * 4 * 9 + 4 * 8
    assert cache_expanded_weights(model, torch.bfloat16) == 2 * weights  # bf16: 2 bytes each
    assert cache_expanded_weights(model) == 4 * weights  # replaces it: fp32, 4 bytes each
    assert expanded_weight_bytes(model) == 4 * weights
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        # a forward in another dtype does not use the cache (and stays right)
        got = model.double()(x.double()).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        model.float()
        # the integers change in place (a new base loaded into the same tensors): the
        # stale cache is not used
        layer = model[0]
        layer.packed.copy_(torch.flip(layer.packed, dims=[0]))
        changed = model(x)
        clear_expanded_weights(model)
        assert expanded_weight_bytes(model) == 0
        torch.testing.assert_close(changed, model(x), rtol=1e-5, atol=1e-6)
    assert (changed - expected).abs().max() > 0.1
    with pytest.raises(ValueError, match="float dtype"):
        cache_expanded_weights(model, torch.int8)
    with pytest.raises(ValueError, match="no quantized layers"):
        cache_expanded_weights(nn.Linear(2, 2))


def test_low_resolution_conv_cache_takes_onednn_layout():
    """A conv whose weight outweighs its input (the UNet's 1280-channel convs at 8 x 8)
    keeps its cached weight in oneDNN's layout: same numbers, same bytes, any input."""
    import pickle

    original, layer = quantized(lambda: nn.Conv2d(64, 48, 3, padding=1), QuantConfig(bits=4),
                                dtype=torch.float32)
    rows = torch.tensor([0, 3])
    layer.router.rows = rows
    size = cache_expanded_weights(layer)
    x = torch.randn(2, 64, 4, 4)  # 2,048 inputs against 27,648 weights
    with torch.no_grad():
        y = layer(x)
    cache = layer.__dict__["expanded_weight"]
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert cache.onednn is not False and cache.weight is None  # re-laid out, dense dropped
    assert expanded_weight_bytes(layer) == size
    torch.testing.assert_close(y.double(), plain_formula(original, layer, x, rows),
                               rtol=1e-4, atol=1e-5)
    layer.router.rows = torch.tensor([1, 2, 0])
    x3 = torch.randn(3, 64, 9, 7)  # another batch and size: still right
    with torch.no_grad():
        torch.testing.assert_close(layer(x3).double(),
                                   plain_formula(original, layer, x3, layer.router.rows),
                                   rtol=1e-4, atol=1e-5)
    # copies and pickles drop the cache (a copy's integers are other tensors anyway)
    assert copy.deepcopy(layer).__dict__["expanded_weight"] is None
    assert pickle.loads(pickle.dumps(layer)).__dict__["expanded_weight"] is None
    # a training step with the cache in place: the autograd path
    layer.router.rows = rows
    layer(x).sum().backward()
    assert layer.scale_out.grad is not None and torch.isfinite(layer.scale_out.grad).all()


# ----------------------------------------------------------------------------- fp16


def overflowing_case(kind: str):
    """A float layer and an input for which (W_q - z) @ x passes 65,504 while the layer's
    output is about 20: inputs aligned with the signs of output channel 0's weights."""
    torch.manual_seed(0)
    if kind == "linear":
        original = nn.Linear(4096, 8)
        nn.init.uniform_(original.weight, -0.01, 0.01)
        x = torch.sign(original.weight[0]).detach().expand(2, 4096).clone()
    else:
        original = nn.Conv2d(512, 8, 3, padding=1)
        nn.init.uniform_(original.weight, -0.01, 0.01)
        x = torch.sign(original.weight[0]).detach()[None].expand(2, -1, -1, -1).clone()
        x = nn.functional.pad(x, (1, 1, 1, 1))  # (2, 512, 5, 5): the centre sees the kernel
    return original, x


@pytest.mark.parametrize("cached", [False, True], ids=["expanded-per-call", "cached"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fp16_does_not_overflow_where_integer_units_would(kind, cached):
    original, x = overflowing_case(kind)
    model = nn.Sequential(copy.deepcopy(original))
    quantize_(model, QuantConfig(bits=8, num_experts=1))
    layer = model[0]
    layer.router = None
    with torch.no_grad():
        want = layer(x)  # float32
    assert want.abs().max() < 100
    # the unscaled integer-unit product overflows fp16: this input is a real test
    view = (-1,) + (1,) * (len(layer.weight_shape) - 1)
    centred = (layer.int_weight().float() - layer.zero.view(view)).half()
    if kind == "linear":
        raw = nn.functional.linear(x.half(), centred)
    else:
        raw = nn.functional.conv2d(x.half(), centred, padding=1)
    assert torch.isinf(raw).any()
    layer.bias = layer.bias.half()
    if cached:
        cache_expanded_weights(layer, torch.float16)
    with torch.no_grad():
        got = layer(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    # and training in fp16: finite gradients that match float32's
    x16 = x.half().requires_grad_(True)
    layer(x16).float().square().sum().backward()
    grad16 = layer.scale_out.grad.clone()
    layer.scale_out.grad = None
    layer.bias = layer.bias.float()
    layer(x.requires_grad_(True)).square().sum().backward()
    assert torch.isfinite(grad16).all() and torch.isfinite(x16.grad).all()
    scale = grad16.abs().max().item()
    torch.testing.assert_close(grad16, layer.scale_out.grad, rtol=3e-2, atol=1e-3 * scale)


def test_fp16_row_factor_is_a_power_of_two_near_s0():
    scale0 = torch.tensor([3e-3, 7.8e-5, 1e-8, 0.9, 4.0])
    factor = fp16_row_factor(scale0)
    assert torch.equal(torch.log2(factor), torch.round(torch.log2(factor)))  # powers of two
    assert factor[0] == 2.0**-8 and factor[1] == 2.0**-14  # 3e-3 ~ 2^-8.4; 2^-13.6
    assert factor[2] == 2.0**-14  # floor: fp16's smallest normal number
    assert factor[3] == 1.0 and factor[4] == 1.0  # never scaled up
