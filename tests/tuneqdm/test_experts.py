"""Timestep experts (TuneQDM part 2): expert_index, ScaleRouter rows, UNet routing.

The UNet tests build a tiny diffusers UNet offline (tuneqdm.testing.tiny_components).
"""

from __future__ import annotations

import math

import pytest
import torch

from tuneqdm import QuantConfig, ScaleRouter, enable_timestep_experts, expert_index, quantize_
from tuneqdm.experts import attach_timestep_router
from tuneqdm.model import quantized_layers


def reference_expert(t: float, n: int, total: int) -> int:
    """floor(t * N / T) clamped to [0, N - 1], written out with Python numbers."""
    return min(max(math.floor(t * n / total), 0), n - 1)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0, 0),
        (1, 0),
        (249, 0),  # T / N - 1
        (250, 1),  # T / N
        (499, 1),
        (500, 2),
        (749, 2),
        (750, 3),
        (999, 3),  # T - 1
        (1000, 3),  # T: clamped
        (5000, 3),
        (-1, 0),  # negative: clamped
        (-1000, 0),
        (0.0, 0),
        (249.99, 0),
        (250.0, 1),
        (249.999999, 0),
        (999.9, 3),
        (1000.0, 3),
        (-0.5, 0),
        (1e9, 3),
    ],
)
def test_expert_index_boundaries(t, expected):
    assert expert_index(t, 4, 1000).item() == expected
    dtype = torch.float64 if isinstance(t, float) else torch.int64
    assert expert_index(torch.tensor(t, dtype=dtype), 4, 1000).item() == expected
    assert expert_index(torch.tensor([t, t], dtype=dtype), 4, 1000).tolist() == [expected] * 2


def test_python_float_timestep_is_not_rounded_to_float32():
    # regression: a Python float went through float32 first, and 249.999999 became 250.0
    assert expert_index(249.999999, 4, 1000).item() == 0
    # a float32 tensor holds 250.0 already: its expert is 1
    assert expert_index(torch.tensor(249.999999, dtype=torch.float32), 4, 1000).item() == 1


def test_expert_index_dtype_and_shape():
    assert expert_index(3, 4, 1000).dtype == torch.int64
    assert expert_index(3, 4, 1000).shape == ()
    ints = torch.tensor([[0, 999], [250, 500]], dtype=torch.int32)
    assert expert_index(ints, 4, 1000).tolist() == [[0, 3], [1, 2]]
    floats = torch.tensor([249.99, 250.0], dtype=torch.float32)  # float32 t as Euler gives
    assert expert_index(floats, 4, 1000).tolist() == [0, 1]


@pytest.mark.parametrize("n, total", [(1, 1000), (2, 1000), (3, 1000), (4, 1000), (7, 100)])
def test_expert_index_matches_reference_everywhere(n, total):
    ints = torch.arange(-3, total + 3)
    expected = [reference_expert(int(t), n, total) for t in ints]
    assert expert_index(ints, n, total).tolist() == expected
    floats = torch.linspace(-2.0, total + 2.0, 3001, dtype=torch.float64)
    expected = [reference_expert(float(t), n, total) for t in floats]
    assert expert_index(floats, n, total).tolist() == expected
    # every expert covers an interval of T / N timesteps (up to the rounding of T / N)
    counts = torch.bincount(expert_index(torch.arange(total), n, total), minlength=n)
    assert counts.sum() == total and int(counts.max() - counts.min()) <= 1


def test_single_expert_is_always_zero():
    ts = torch.tensor([-5, 0, 500, 999, 1000, 10**6])
    assert expert_index(ts, 1, 1000).tolist() == [0] * 6
    assert expert_index(torch.tensor([0.0, 999.99, 1e6]), 1, 1000).tolist() == [0] * 3


# ----------------------------------------------------------------------------- router


def test_router_rows_from_timesteps():
    router = ScaleRouter(num_experts=4, num_train_timesteps=1000)
    router.route_timesteps(torch.tensor([10, 260, 999, 500]), batch=4)
    assert router.rows.tolist() == [0, 1, 3, 2]
    router.route_timesteps(600, batch=3)  # a scalar t broadcasts
    assert router.rows.tolist() == [2, 2, 2]
    router.route_timesteps(torch.tensor([300.5]), batch=2)
    assert router.rows.tolist() == [1, 1]
    assert router.rows_for(2, torch.device("cpu")).tolist() == [1, 1]


def test_router_slots_and_cfg_doubled_batch():
    router = ScaleRouter(num_experts=4, num_train_timesteps=1000)
    router.slots = torch.tensor([2, 0, 1])  # three prompts, three resident scale sets
    router.route_timesteps(torch.tensor(700), batch=6)  # [uncond x 3; cond x 3]
    expert = 2
    assert router.rows.tolist() == [s * 4 + expert for s in (2, 0, 1, 2, 0, 1)]
    router.route_timesteps(torch.tensor([0, 999, 250]), batch=3)
    assert router.rows.tolist() == [8 + 0, 0 + 3, 4 + 1]
    with pytest.raises(ValueError, match="not a multiple of the 3 slots"):
        router.route_timesteps(100, batch=4)


def test_router_errors():
    router = ScaleRouter(num_experts=4, num_train_timesteps=1000)
    with pytest.raises(RuntimeError, match="no scale rows selected"):
        router.rows_for(2, torch.device("cpu"))
    with pytest.raises(ValueError, match="do not match a batch of 3"):
        router.route_timesteps(torch.tensor([1, 2]), batch=3)
    router.route_timesteps(torch.tensor([1, 2]), batch=2)
    with pytest.raises(RuntimeError, match="holds 2 rows but the layer input has 5"):
        router.rows_for(5, torch.device("cpu"))
    single = ScaleRouter(num_experts=1, num_train_timesteps=1000)
    assert single.rows_for(3, torch.device("cpu")).tolist() == [0, 0, 0]


def test_attach_timestep_router_reads_args_and_kwargs():
    router = ScaleRouter(num_experts=2, num_train_timesteps=10)
    calls = []

    class TwoArgs(torch.nn.Module):
        def forward(self, sample, timestep, extra=None):
            calls.append(router.rows.tolist())
            return sample

    model = TwoArgs()
    attach_timestep_router(model, router)
    model(torch.zeros(2, 1), torch.tensor([1, 7]))
    model(sample=torch.zeros(3, 1), timestep=9)
    attach_timestep_router(model, router)  # re-attaching replaces the hook
    model(torch.zeros(1, 1), timestep=torch.tensor(5.0))
    assert calls == [[0, 1], [1, 1, 1], [1]]
    assert len(model._forward_pre_hooks) == 1


# ----------------------------------------------------------------------------- UNet


@pytest.fixture(scope="module")
def tiny_unet_quantized(tmp_path_factory):
    from tuneqdm.testing import tiny_components, write_clip_tokenizer_files

    tokenizer_dir = write_clip_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    unet = tiny_components(seed=0, tokenizer_dir=tokenizer_dir)["unet"].eval()
    quantize_(unet, QuantConfig(bits=4, num_experts=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the four experts differ, as after training
        for layer in quantized_layers(unet).values():
            noise = torch.randn(layer.scale_out.shape, generator=generator)
            layer.scale_out.mul_(1 + 0.3 * noise)
            noise = torch.randn(layer.scale_in.shape, generator=generator)
            layer.scale_in.mul_(1 + 0.3 * noise)
    enable_timestep_experts(unet)
    return unet.double()  # float64: batched and one-by-one agree to rounding


def test_unet_mixed_timesteps_use_per_sample_experts(tiny_unet_quantized):
    unet = tiny_unet_quantized
    router = unet.tuneqdm_router
    torch.manual_seed(0)
    sample = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    text = torch.randn(4, 5, 32, dtype=torch.float64)
    timesteps = torch.tensor([10, 300, 600, 900])  # experts 0, 1, 2, 3
    with torch.no_grad():
        batched = unet(sample, timesteps, encoder_hidden_states=text).sample
        assert router.rows.tolist() == [0, 1, 2, 3]
        alone = torch.cat([
            unet(sample[i : i + 1], timesteps[i : i + 1], encoder_hidden_states=text[i : i + 1])
            .sample for i in range(4)
        ])  # fmt: skip
        # the same call with expert 0 forced on every sample (routing hook removed)
        unet._tuneqdm_timestep_hook.remove()
        router.rows = torch.zeros(4, dtype=torch.long)
        expert0 = unet(sample, timesteps, encoder_hidden_states=text).sample
        enable_timestep_experts(unet)
    torch.testing.assert_close(batched, alone, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(batched[0], expert0[0], rtol=1e-9, atol=1e-10)
    for i in (1, 2, 3):  # the experts really differ: far above the tolerance
        assert (batched[i] - expert0[i]).abs().max() > 1e-2


def test_unet_float_timesteps_and_scalar_timestep(tiny_unet_quantized):
    unet = tiny_unet_quantized
    sample = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    text = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        unet(sample, torch.tensor([249.99, 250.0]), encoder_hidden_states=text)
        assert unet.tuneqdm_router.rows.tolist() == [0, 1]
        unet(sample, 999, encoder_hidden_states=text)
        assert unet.tuneqdm_router.rows.tolist() == [3, 3]
