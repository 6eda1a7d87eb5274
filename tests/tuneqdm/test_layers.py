"""Quantized layers and quantize_: the custom autograd path against plain autograd.

Parity (docs/design.md §2): QuantLinear / QuantConv2d compute
y = s_out * ((W_q - z) @ (s_in * x)) + bias with a hand-written backward that never
keeps a float weight. The reference builds W_r = s_out[r] * (W_q - z) * s_in[r] for
each sample's row r and runs the ORIGINAL float module (so PyTorch's own padding,
'same' and reflect handling included) through ordinary autograd, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tuneqdm import QuantConfig, QuantConv2d, QuantizedLayer, QuantLinear, quantize_
from tuneqdm.model import build_quantized_skeleton, quantized_layers, scale_parameters
from tuneqdm.quant import dequantize_weight, quantize_weight

# (name, float layer factory, input shape)
LAYERS = [
    ("linear-2d", lambda: nn.Linear(7, 5), (4, 7)),
    ("linear-2d-nobias", lambda: nn.Linear(7, 5, bias=False), (4, 7)),
    ("linear-3d", lambda: nn.Linear(7, 5), (4, 3, 7)),
    ("linear-4d", lambda: nn.Linear(6, 3), (3, 2, 2, 6)),
    ("conv-1x1", lambda: nn.Conv2d(6, 4, 1), (3, 6, 5, 5)),
    ("conv-3x3", lambda: nn.Conv2d(6, 4, 3, padding=1), (3, 6, 5, 5)),
    ("conv-3x3-nobias", lambda: nn.Conv2d(6, 4, 3, padding=1, bias=False), (3, 6, 5, 5)),
    ("conv-strided", lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1), (3, 6, 7, 7)),
    ("conv-strided-even", lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (2, 4, 8, 6)),
    ("conv-dilated", lambda: nn.Conv2d(6, 4, 3, dilation=2, padding=2), (3, 6, 7, 7)),
    ("conv-grouped", lambda: nn.Conv2d(6, 4, 3, groups=2, padding=1), (3, 6, 5, 5)),
    ("conv-depthwise", lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1), (3, 4, 5, 5)),
    ("conv-same-even", lambda: nn.Conv2d(5, 4, 4, padding="same"), (3, 5, 6, 6)),
    ("conv-same-dilated", lambda: nn.Conv2d(5, 4, 2, padding="same", dilation=3), (2, 5, 7, 7)),
    (
        "conv-same-even-reflect",
        lambda: nn.Conv2d(6, 6, 4, padding="same", padding_mode="reflect"),
        (3, 6, 7, 7),
    ),
    ("conv-reflect", lambda: nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"), (3, 4, 5, 5)),
    (
        "conv-circular",
        lambda: nn.Conv2d(4, 3, (3, 1), padding=(1, 0), padding_mode="circular"),
        (2, 4, 5, 5),
    ),
    (
        "conv-valid-rect",
        lambda: nn.Conv2d(4, 3, (1, 3), stride=(2, 1), padding="valid"),
        (2, 4, 6, 6),
    ),
]
CONFIGS = [
    ("peqa-8", QuantConfig.peqa(bits=8)),
    ("peqa-4", QuantConfig.peqa(bits=4)),
    ("tuneqdm-4-N3", QuantConfig(bits=4, num_experts=3)),
    ("tuneqdm-3-N2-sym", QuantConfig(bits=3, num_experts=2, symmetric=True)),
    ("tuneqdm-2-N4", QuantConfig(bits=2, num_experts=4)),
]


def quantized_float64(factory, config: QuantConfig, seed: int = 0):
    """(original float64 layer, its quantized float64 copy with random scales)."""
    torch.manual_seed(seed)
    original = factory().double()
    model = nn.Sequential(copy.deepcopy(original))
    quantize_(model, config)
    model.double()
    layer = model[0]
    with torch.no_grad():  # move every row off its initial value, differently per row
        layer.scale_out.mul_(1 + 0.2 * torch.randn_like(layer.scale_out))
        if layer.scale_in is not None:
            layer.scale_in.mul_(1 + 0.2 * torch.randn_like(layer.scale_in))
    return original, layer


def reference_weight(layer: QuantizedLayer, scale_out, scale_in, row: int) -> torch.Tensor:
    """W_r = s_out[r] * (W_q - z) * s_in[r], in the float module's weight layout."""
    w_q = layer.int_weight().double()
    view = (-1,) + (1,) * (w_q.dim() - 1)
    w = scale_out[row].view(view) * (w_q - layer.zero.double().view(view))
    if scale_in is not None:
        w = w * layer.weight_in_scale(scale_in[row])
    return w


@pytest.mark.parametrize("config_name, config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("name, factory, shape", LAYERS, ids=[spec[0] for spec in LAYERS])
def test_forward_and_backward_match_plain_autograd(name, factory, shape, config_name, config):
    original, layer = quantized_float64(factory, config)
    batch = shape[0]
    rows = torch.randint(0, config.num_experts, (batch,))
    layer.router.rows = rows
    has_bias = layer.bias is not None
    if has_bias:
        layer.bias.requires_grad_(True)  # frozen in training; its gradient is checked here
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    inputs = [x, layer.scale_out] + [t for t in (layer.scale_in, layer.bias) if t is not None]
    grads = torch.autograd.grad(y, inputs, grad_y)

    # reference: plain autograd through the float module with W_r, sample by sample
    x_ref = x.detach().clone().requires_grad_(True)
    scale_out = layer.scale_out.detach().clone().requires_grad_(True)
    scale_in = None
    if layer.scale_in is not None:
        scale_in = layer.scale_in.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True) if has_bias else None
    outputs = []
    for b in range(batch):
        params = {"weight": reference_weight(layer, scale_out, scale_in, int(rows[b]))}
        if has_bias:
            params["bias"] = bias
        outputs.append(functional_call(original, params, (x_ref[b : b + 1],)))
    y_ref = torch.cat(outputs)
    ref_inputs = [x_ref, scale_out] + [t for t in (scale_in, bias) if t is not None]
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_y)

    assert y.shape == y_ref.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    names = ["x", "scale_out"] + ["scale_in"] * (scale_in is not None) + ["bias"] * has_bias
    for got, want, what in zip(grads, grads_ref, names, strict=True):
        assert got.shape == want.shape, what
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=what)
    if rows.unique().numel() > 1 and config.num_experts > 1:
        # rows never used by the batch get no gradient
        unused = torch.ones(config.num_experts, dtype=torch.bool)
        unused[rows] = False
        assert torch.all(grads[1][unused] == 0)


@pytest.mark.parametrize("name, factory, shape", LAYERS[:1] + LAYERS[5:6])
def test_backward_without_input_grad(name, factory, shape):
    # the scales still get gradients when the input is a constant (the UNet's first conv)
    _, layer = quantized_float64(factory, QuantConfig(bits=4, num_experts=2))
    layer.router.rows = torch.zeros(shape[0], dtype=torch.long)
    layer(torch.randn(shape, dtype=torch.float64)).square().sum().backward()
    assert layer.scale_out.grad is not None and layer.scale_in.grad is not None
    assert layer.scale_out.grad[0].abs().sum() > 0 and layer.scale_out.grad[1].abs().sum() == 0


def test_initial_layer_equals_dequantized_float_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    q, zero, scale = quantize_weight(conv.weight, QuantConfig(bits=4))
    layer = QuantConv2d.from_float(conv, QuantConfig(bits=4, num_experts=2))
    torch.testing.assert_close(layer.scale_out, scale.expand(2, 4))
    assert torch.all(layer.scale_in == 1)
    torch.testing.assert_close(layer.int_weight(), q)
    w_hat = dequantize_weight(q, zero, scale)
    torch.testing.assert_close(layer.dequantized_weight(1), w_hat)
    layer.router = None  # no router: row 0 for every sample
    x = torch.randn(2, 6, 5, 5)
    expected = functional_call(conv, {"weight": w_hat, "bias": conv.bias}, (x,))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_unbatched_inputs():
    torch.manual_seed(0)
    linear = QuantLinear.from_float(nn.Linear(5, 3), QuantConfig.peqa(bits=8))
    x = torch.randn(5)
    torch.testing.assert_close(linear(x), linear(x[None])[0])
    conv = QuantConv2d.from_float(nn.Conv2d(2, 3, 3, padding=1), QuantConfig.peqa(bits=8))
    image = torch.randn(2, 4, 4)
    torch.testing.assert_close(conv(image), conv(image[None])[0])


def test_weight_in_scale_layout_for_grouped_conv():
    layer = QuantConv2d.from_float(nn.Conv2d(6, 4, 3, groups=2), QuantConfig(bits=4))
    scale_in = torch.arange(1.0, 7.0)  # input channel c -> c + 1
    laid_out = layer.weight_in_scale(scale_in)
    assert laid_out.shape == (4, 3, 1, 1)
    # outputs 0, 1 read inputs 0..2 (group 0); outputs 2, 3 read inputs 3..5 (group 1)
    assert laid_out[:, :, 0, 0].tolist() == [[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]]


def test_float32_training_step_moves_scales_and_lowers_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 1))
    target = copy.deepcopy(model)
    quantize_(model, QuantConfig(bits=4, num_experts=1))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        y_target = target(x)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (model(x) - y_target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- quantize_


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.conv(torch.relu(self.norm(x)))  # (B, 8, H, W)
        return x + self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def small_network() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(Block(), Block()),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.SiLU(),
        nn.Linear(16, 4),  # "6": skipped by the filter below
    )


def test_quantize_arbitrary_module_with_filter():
    torch.manual_seed(0)
    model = small_network()
    config = QuantConfig(bits=4, num_experts=2)
    quantize_(model, config, filter_fn=lambda module, name: name != "6")
    layers = quantized_layers(model)
    assert sorted(layers) == [
        "0", "1.0.conv", "1.0.proj", "1.1.conv", "1.1.proj", "4",
    ]  # fmt: skip
    assert isinstance(model[6], nn.Linear) and not model[6].weight.requires_grad
    assert isinstance(model[0], QuantConv2d) and isinstance(model[4], QuantLinear)
    # only scales train: every other parameter (norms, the skipped layer) is frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{s}" for n in layers for s in ("scale_out", "scale_in")}
    assert trainable == expected
    assert all(not hasattr(layer, "weight") or layer.weight is None for layer in layers.values())
    # the router is shared; numbers per expert: sum(out) + sum(in)
    assert len({id(layer.router) for layer in layers.values()}) == 1
    outs, ins = scale_parameters(model)
    assert sum(p.numel() for p in outs) == 2 * (8 + 8 + 8 + 8 + 8 + 16)
    assert sum(p.numel() for p in ins) == 2 * (3 + 8 + 8 + 8 + 8 + 32)
    # it runs and trains
    model.tuneqdm_router.rows = torch.tensor([0, 1])
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    assert all(p.grad is not None for p in outs + ins)
    assert model[6].weight.grad is None


def test_quantize_8_bit_output_close_to_float():
    torch.manual_seed(0)
    model = small_network()
    reference = copy.deepcopy(model)
    quantize_(model, QuantConfig.peqa(bits=8))
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        y, y_ref = model(x), reference(x)
    relative = float((y - y_ref).norm() / y_ref.norm())
    # 8-bit per-channel weights have ~48 dB SQNR (0.4 % RMS error) on these uniform
    # default-initialised weights; through 7 layers the output error measures ~0.4 %.
    # Bound: 1 %.
    assert relative < 1e-2, relative
    assert relative > 0  # it is really quantized


def test_quantize_refuses_lone_layer_and_double_quantization():
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        quantize_(nn.Linear(3, 3), QuantConfig())
    model = nn.Sequential(nn.Linear(3, 3))
    quantize_(model, QuantConfig())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, QuantConfig())


def test_skeleton_loads_state_dict_and_matches():
    torch.manual_seed(0)
    model = small_network()
    config = QuantConfig(bits=3, num_experts=2)
    quantize_(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    state = model.state_dict()
    skeleton = build_quantized_skeleton(small_network(), config, list(quantized_layers(model)))
    skeleton.load_state_dict(state)
    rows = torch.tensor([1, 0, 1])
    model.tuneqdm_router.rows = skeleton.tuneqdm_router.rows = rows
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(skeleton(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- networks


def test_network_parity_float64_with_reused_weight_buffer():
    # several quantized layers in a row share the kernels' transient weight buffer
    # (functional._transient_buffer): the whole network must still match plain
    # autograd through its dequantized weights, forward and backward.
    torch.manual_seed(0)
    original = small_network().double()
    model = copy.deepcopy(original)
    quantize_(model, QuantConfig(bits=4, num_experts=2))
    model.double()
    layers = quantized_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.scale_out.mul_(1 + 0.2 * torch.randn_like(layer.scale_out))
            layer.scale_in.mul_(1 + 0.2 * torch.randn_like(layer.scale_in))
    model.tuneqdm_router.rows = torch.ones(3, dtype=torch.long)  # expert 1 for all
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = model(x)
    grad_y = torch.randn_like(y)
    scales = [p for layer in layers.values() for p in (layer.scale_out, layer.scale_in)]
    grads = torch.autograd.grad(y, [x, *scales], grad_y)

    x_ref = x.detach().clone().requires_grad_(True)
    scales_ref = [p.detach().clone().requires_grad_(True) for p in scales]
    params = {}
    for i, (name, layer) in enumerate(layers.items()):
        s_out, s_in = scales_ref[2 * i], scales_ref[2 * i + 1]
        params[f"{name}.weight"] = reference_weight(layer, s_out, s_in, row=1)
    y_ref = functional_call(original, params, (x_ref,))
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *scales_ref], grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_expand_transient_reuses_one_buffer():
    a = QuantLinear.from_float(nn.Linear(10, 8), QuantConfig(bits=4))._packed_weight()
    b = QuantConv2d.from_float(nn.Conv2d(3, 2, 3), QuantConfig(bits=3))._packed_weight()
    wa = a.expand_transient(torch.float32)
    assert torch.equal(wa, a.expand(torch.float32)) and wa.shape == (8, 10)
    pointer = wa.data_ptr()
    wb = b.expand_transient(torch.float32)
    assert torch.equal(wb, b.expand(torch.float32)) and wb.shape == (2, 3, 3, 3)
    assert wb.data_ptr() == pointer  # the same memory: valid until the next call


def test_layers_in_parallel_threads():
    # the transient buffer is per thread: concurrent forwards (a serving thread pool)
    # must not see each other's weights
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    layers = [
        QuantLinear.from_float(nn.Linear(64, 64), QuantConfig.peqa(bits=8)),
        QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), QuantConfig.peqa(bits=4)),
    ]
    inputs = [torch.randn(2, 64), torch.randn(2, 8, 6, 6)]
    with torch.no_grad():
        expected = [layer(x) for layer, x in zip(layers, inputs, strict=True)]

    def run(i):
        with torch.no_grad():
            return all(torch.equal(layers[i](inputs[i]), expected[i]) for _ in range(50))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, [0, 1] * 4))


def test_quantize_releases_float_weights_as_it_goes(monkeypatch):
    # regression: quantize_ listed (name, layer) pairs first, so every float weight
    # stayed alive until it returned (peak = float model + quantized model)
    import weakref

    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    refs = [weakref.ref(layer.weight) for layer in model]
    alive_at_each_call = []
    original = QuantLinear.from_float.__func__

    def spy(cls, linear, config, hessian=None):
        alive_at_each_call.append(sum(ref() is not None for ref in refs))
        return original(cls, linear, config, hessian)

    monkeypatch.setattr(QuantLinear, "from_float", classmethod(spy))
    quantize_(model, QuantConfig(bits=4))
    assert alive_at_each_call == [4, 3, 2, 1]  # only the not yet quantized ones
    assert all(ref() is None for ref in refs)


@pytest.mark.parametrize("first", ["inference_mode", "grad"])
def test_inference_mode_then_training_and_back(first):
    # the reused weight buffer must not become an inference tensor when the first call
    # of a thread is under torch.inference_mode (serving), nor break it afterwards
    from concurrent.futures import ThreadPoolExecutor

    def run() -> bool:  # a fresh thread: its buffer is created by the first call below
        torch.manual_seed(0)
        layer = QuantLinear.from_float(nn.Linear(48, 40), QuantConfig(bits=4, num_experts=1))
        x = torch.randn(2, 48)
        calls = ["inference_mode", "grad"] if first == "inference_mode" else ["grad"] * 2
        calls.append("inference_mode")
        outputs = []
        for mode in calls:
            if mode == "inference_mode":
                with torch.inference_mode():
                    outputs.append(layer(x).clone())
            else:
                y = layer(x)
                y.sum().backward()
                outputs.append(y.detach())
        return all(torch.equal(out, outputs[0]) for out in outputs)

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(run).result()
