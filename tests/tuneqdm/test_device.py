"""Device and dtype decisions, CUDA out-of-memory handling, and autocast training: the
CUDA-only branches run here through their CPU twins (tuneqdm/device.py)."""

from __future__ import annotations

import pytest
import torch

from tuneqdm.base import load_quantized_pipeline
from tuneqdm.data import Subject, prepare_data
from tuneqdm.device import (
    DeviceError,
    OutOfMemory,
    is_cuda_oom,
    model_device_dtype,
    oom_retry_config,
    resolve_device,
    resolve_dtype,
    train_with_oom_retry,
    training_autocast,
)
from tuneqdm.train import TrainConfig, evaluation_loss, finetune

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize(
    "request_, assigned, available, expected",
    [
        ("auto", None, False, CPU),  # not under Ray, no CUDA
        ("auto", None, True, CUDA0),  # not under Ray, CUDA
        ("auto", [], True, CPU),  # under Ray, no GPU asked for: Ray hides them all
        ("auto", ["3"], True, CUDA0),  # Ray renumbers the visible GPUs from 0
        ("cpu", ["0"], True, CPU),
        ("cuda", ["5"], True, CUDA0),
        ("cuda:1", [0, 1], True, CUDA1),
    ],
)
def test_resolve_device(request_, assigned, available, expected):
    assert resolve_device(request_, assigned, available) == expected


@pytest.mark.parametrize(
    "request_, assigned, available, message",
    [
        ("cuda", [], True, "Ray assigned no GPU to this process"),
        ("cuda:0", [], False, "Ray assigned no GPU to this process"),
        ("cuda", None, False, "torch sees no CUDA device"),
        ("cuda:2", ["0", "1"], True, r"only 2 GPU\(s\) are visible"),
        ("gpu", None, True, "'gpu' is invalid: one of auto, cpu, cuda, cuda:N"),
        ("cuda:x", None, True, "is invalid"),
    ],
)
def test_resolve_device_refuses(request_, assigned, available, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(request_, assigned, available)


def test_resolve_dtype_and_training_autocast():
    assert resolve_dtype("auto", CUDA0) == torch.bfloat16  # bf16 is the CUDA default
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", CUDA0) == torch.float16  # allowed: the kernels pre-scale
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="'half' is invalid: one of auto, fp32"):
        resolve_dtype("half", CPU)
    assert training_autocast(CUDA0, torch.float32) == torch.bfloat16
    assert training_autocast(CUDA0, torch.bfloat16) is None  # already low precision
    assert training_autocast(CPU, torch.float32) is None


def test_is_cuda_oom():
    assert is_cuda_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_cuda_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_cuda_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_cuda_oom(MemoryError())
    assert not is_cuda_oom(ValueError("CUDA out of memory"))  # not a RuntimeError


def oom_until(fits):
    """A training function that runs out of CUDA memory unless `fits(config)`; it
    records the configs it was called with."""
    calls = []

    def train(config):
        calls.append(config)
        if not fits(config):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return f"trained with batch {config.batch_size}"

    return train, calls


def test_oom_retries_once_with_gradient_checkpointing():
    train, calls = oom_until(lambda c: c.gradient_checkpointing)
    config = TrainConfig(batch_size=2)
    assert train_with_oom_retry(train, config) == "trained with batch 2"
    assert [c.gradient_checkpointing for c in calls] == [False, True]
    assert config.gradient_checkpointing is False  # the caller's config is not mutated


def test_oom_retries_with_half_the_batch_when_checkpointing_is_on():
    train, calls = oom_until(lambda c: c.batch_size <= 2)
    assert train_with_oom_retry(train, TrainConfig(batch_size=4, gradient_checkpointing=True))
    assert [c.batch_size for c in calls] == [4, 2]


def test_oom_twice_is_a_typed_out_of_memory_error():
    train, calls = oom_until(lambda c: False)
    with pytest.raises(OutOfMemory, match="also when retried with gradient checkpointing") as err:
        train_with_oom_retry(train, TrainConfig())
    assert len(calls) == 2 and err.value.tried == ["gradient checkpointing"]
    config = TrainConfig(batch_size=1, gradient_checkpointing=True)
    assert oom_retry_config(config) is None
    with pytest.raises(OutOfMemory, match="nothing left to retry with"):
        train_with_oom_retry(oom_until(lambda c: False)[0], config)


def test_other_errors_are_not_retried():
    calls = []

    def train(config):
        calls.append(config)
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        train_with_oom_retry(train, TrainConfig())
    assert len(calls) == 1


# ----------------------------------------------------------------------------- autocast


def test_bf16_autocast_training_matches_fp32(tiny_base_dir, dog_images):
    """The CUDA training path (fp32 model, bf16 autocast) run on the CPU: the same
    losses step by step up to bf16 rounding, float32 scales, the same loss drop."""
    dog = Subject("dog", dog_images, "dog")
    pipes = [load_quantized_pipeline(tiny_base_dir) for _ in range(2)]
    assert model_device_dtype(pipes[0].unet) == (CPU, torch.float32)
    data = prepare_data(pipes[0], [dog], 16)
    before = evaluation_loss(pipes[0].unet, pipes[0].scheduler, data)
    config = TrainConfig(steps=20, batch_size=2, lr_scale_out=1e-3, resolution=16, seed=0)
    results = [
        finetune(pipe, [dog], config, autocast=amp)
        for pipe, amp in zip(pipes, (None, torch.bfloat16), strict=True)
    ]
    after = [evaluation_loss(p.unet, p.scheduler, data) for p in pipes]
    assert all(t.dtype == torch.float32 for t in results[1].scale_set.tensors.values())
    losses = [torch.tensor(r.losses) for r in results]
    assert torch.isfinite(losses[1]).all()
    torch.testing.assert_close(losses[1][:10], losses[0][:10], rtol=0.03, atol=0)
    drops = [before - a for a in after]
    assert drops[0] > 0.1 * before and drops[1] > 0.8 * drops[0], (before, after)


def test_autocast_quantized_layer_computes_centred_in_bf16():
    """Under autocast a quantized layer takes autocast's dtype and the centred weight
    (no fp32 zero-point folding cancelled in bf16): close to float32, fp32 scale grads."""
    from torch import nn

    from tuneqdm import QuantConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Linear(6, 5))
    quantize_(model, QuantConfig(bits=8, num_experts=1))
    x = torch.randn(2, 16, 6, 6) + 3.0  # a large common offset: the folding's worst case
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert got.dtype == torch.bfloat16
    assert float((got.detach().float() - want.detach()).norm() / want.detach().norm()) < 0.01
    got.float().sum().backward()
    assert model[0].scale_out.grad.dtype == torch.float32
