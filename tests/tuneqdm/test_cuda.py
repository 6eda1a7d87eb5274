"""CUDA-only checks (marker `cuda`; skipped without a GPU; scripts/gpu_check.sh runs
them). Each has a CPU twin that CI runs: test_inference.py (fp16 overflow, cache),
test_device.py (device choice, OOM, autocast training), test_bf16.py (bf16 numbers).
Here the same code runs on the GPU against float32 on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tuneqdm import QuantConfig, quantize_
from tuneqdm.device import is_cuda_oom, resolve_device, resolve_dtype
from tuneqdm.inference import cache_expanded_weights

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def small_model(bits: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 8, 1))
    quantize_(model, QuantConfig(bits=bits, num_experts=1))
    for layer in model:
        if hasattr(layer, "router"):
            layer.router = None
    return model.eval()


def to_gpu(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy on the GPU: biases in `dtype`, scales and the grid float32."""
    gpu = copy.deepcopy(model).cuda()
    for layer in gpu:
        if getattr(layer, "bias", None) is not None and hasattr(layer, "packed"):
            layer.bias = layer.bias.to(dtype)
    return gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cached", [False, True])
def test_gpu_forward_matches_cpu_float32(dtype, cached):
    model = small_model()
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        want = model(x)
        gpu = to_gpu(model, dtype)
        if cached:
            cache_expanded_weights(gpu, dtype)
        got = gpu(x.cuda().to(dtype)).float().cpu()
    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert float((got - want).norm() / want.norm()) < tolerance


def test_fp16_on_gpu_does_not_overflow():
    torch.manual_seed(0)
    linear = nn.Linear(4096, 8)
    nn.init.uniform_(linear.weight, -0.01, 0.01)
    x = torch.sign(linear.weight[0]).detach().expand(2, 4096).clone()
    model = nn.Sequential(linear)
    quantize_(model, QuantConfig(bits=8, num_experts=1))
    model[0].router = None
    with torch.no_grad():
        want = model(x)
        got = to_gpu(model, torch.float16)(x.cuda().half()).float().cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_bf16_autocast_training_step_on_gpu():
    model = small_model(bits=4)
    gpu = copy.deepcopy(model).cuda().train()
    x = torch.randn(4, 16, 12, 12)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(x.cuda())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    cpu_out = model.train()(x)
    cpu_out.square().mean().backward()
    for gpu_layer, cpu_layer in ((gpu[0], model[0]), (gpu[2], model[2])):
        grad = gpu_layer.scale_out.grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        cosine = nn.functional.cosine_similarity(
            grad.cpu().flatten(), cpu_layer.scale_out.grad.flatten(), dim=0
        )
        assert cosine > 0.98


def test_device_and_dtype_resolve_to_the_gpu():
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", assigned_gpus=["0"]) == torch.device("cuda", 0)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


def test_a_real_cuda_oom_is_recognised():
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(torch.OutOfMemoryError) as err:
        torch.empty(int(free * 4), dtype=torch.uint8, device="cuda")
    assert is_cuda_oom(err.value)
    torch.cuda.empty_cache()


def test_peak_memory_of_a_quantized_training_step_is_measured():
    model = to_gpu(small_model(bits=4), torch.bfloat16).train()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(8, 16, 32, 32, device="cuda")).float().square().mean()
    loss.backward()
    peak = torch.cuda.max_memory_allocated()
    assert peak > 8 * 32 * 32 * 32 * 2  # at least one saved bf16 activation
