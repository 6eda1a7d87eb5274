"""quantize_ keeps a module callable as before: a forward(sample, timestep, ...) (a
diffusers UNet) routes its experts by itself with any N, one expert needs no routing on
any module, and a module with N > 1 experts and no timestep says how to route."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tuneqdm import QuantConfig, enable_timestep_experts, get_router, quantize_, quantized_layers
from tuneqdm.experts import takes_timestep
from tuneqdm.model import build_quantized_skeleton


@pytest.fixture(scope="module")
def float_unet(tmp_path_factory):
    from tuneqdm.testing import tiny_components, write_clip_tokenizer_files

    tokenizer_dir = write_clip_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    return tiny_components(seed=0, tokenizer_dir=tokenizer_dir)["unet"].eval().double()


def quantized_unet(float_unet, num_experts: int) -> nn.Module:
    """A quantized float64 copy of the tiny UNet whose experts differ (as after training)."""
    unet = quantize_(copy.deepcopy(float_unet), QuantConfig(bits=4, num_experts=num_experts))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in quantized_layers(unet).values():
            layer.scale_out.mul_(1 + 0.3 * torch.randn(layer.scale_out.shape, generator=generator))
            layer.scale_in.mul_(1 + 0.3 * torch.randn(layer.scale_in.shape, generator=generator))
    return unet


def inputs(batch: int):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(batch, 5, 32, generator=generator, dtype=torch.float64)
    return sample, text


def forced_rows(unet: nn.Module, rows: list[int], sample, t, text) -> torch.Tensor:
    """The UNet's output with each sample's row set by hand (the routing hook off)."""
    hook = unet._tuneqdm_timestep_hook
    hook.remove()
    try:
        get_router(unet).rows = torch.tensor(rows)
        return unet(sample, t, encoder_hidden_states=text).sample
    finally:
        enable_timestep_experts(unet)


@pytest.mark.parametrize("num_experts", [1, 2, 4])
def test_quantized_unet_routes_experts_from_its_timestep(float_unet, num_experts):
    unet = quantized_unet(float_unet, num_experts)
    sample, text = inputs(4)
    t = torch.tensor([10, 300, 600, 999])
    expected_rows = [min(int(x) * num_experts // 1000, num_experts - 1) for x in t]
    with torch.no_grad():
        out = unet(sample, t, encoder_hidden_states=text).sample  # no routing call
        assert get_router(unet).rows.tolist() == expected_rows
        by_keyword = unet(sample=sample, timestep=t, encoder_hidden_states=text).sample
        reference = forced_rows(unet, expected_rows, sample, t, text)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(by_keyword, reference, rtol=0, atol=0)
    if num_experts > 1:  # the experts really differ, so routing matters
        with torch.no_grad():
            expert0 = forced_rows(unet, [0] * 4, sample, t, text)
        assert (out[3] - expert0[3]).abs().max() > 1e-2


def test_enable_timestep_experts_is_idempotent(float_unet):
    unet = quantized_unet(float_unet, 2)
    hooks = len(unet._forward_pre_hooks)
    assert enable_timestep_experts(unet) is get_router(unet)
    enable_timestep_experts(unet)
    assert len(unet._forward_pre_hooks) == hooks == 1
    sample, text = inputs(2)
    with torch.no_grad():
        unet(sample, torch.tensor([100, 900]), encoder_hidden_states=text)
    assert get_router(unet).rows.tolist() == [0, 1]


def test_skeleton_and_deep_copy_route_their_own_router(float_unet):
    source = quantized_unet(float_unet, 2)
    names = list(quantized_layers(source))
    config = QuantConfig(bits=4, num_experts=2)
    skeleton = build_quantized_skeleton(copy.deepcopy(float_unet), config, names)
    skeleton.load_state_dict(source.state_dict())
    twin = copy.deepcopy(source)
    sample, text = inputs(2)
    t = torch.tensor([100, 900])
    with torch.no_grad():
        expected = source(sample, t, encoder_hidden_states=text).sample
        for other in (skeleton, twin):
            torch.testing.assert_close(
                other(sample, t, encoder_hidden_states=text).sample, expected, rtol=0, atol=0
            )
            assert get_router(other) is not get_router(source)
            assert get_router(other).rows.tolist() == [0, 1]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_plain_mlp_with_one_expert_needs_no_routing():
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    quantize_(model, QuantConfig(bits=8, num_experts=1))
    assert not model._forward_pre_hooks  # nothing to route from
    x = torch.randn(5, 6)
    with torch.no_grad():
        for name in ("hidden", "out"):  # the reference runs the dequantized weights
            getattr(reference, name).weight.copy_(getattr(model, name).dequantized_weight(0))
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x[:2]), reference(x[:2]), rtol=1e-5, atol=1e-6)


def test_plain_mlp_with_experts_says_how_to_route():
    torch.manual_seed(0)
    model = quantize_(MLP(), QuantConfig(bits=4, num_experts=4))
    x = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="no scale rows selected") as error:
        model(x)
    message = str(error.value)
    assert "4 timestep experts" in message
    assert "tuneqdm.get_router(model).route_timesteps(timesteps, batch)" in message
    get_router(model).route_timesteps(torch.tensor([0, 500, 999]), batch=3)
    out = model(x)
    rows = get_router(model).rows.tolist()
    assert rows == [0, 2, 3] and out.shape == (3, 3)


def test_takes_timestep_reads_the_signature(float_unet):
    class Named(nn.Module):
        def forward(self, sample, timestep, extra=None):
            return sample

    class Other(nn.Module):
        def forward(self, x, t):
            return x

    assert takes_timestep(float_unet) and takes_timestep(Named())
    assert not takes_timestep(Other()) and not takes_timestep(MLP())
    assert not takes_timestep(nn.Sequential(nn.Linear(2, 2)))
