"""Shared pieces of the generation-speed benchmarks (generate_speed.py, gpu_check.py).

- `Variant` and `interleave`: methods timed round by round, order rotated, so that on a
  shared machine all see the same load; per-round ratios to the first, then medians.
- `sd_unets`: the SD v1.5 UNet (or a reduced one for CI) float, and quantized at given
  bit widths, on a device in a dtype, ready for inference.
- `cast_float_tensors`: the quantized UNet's float tensors to the compute dtype, scales
  and the grid (z, s0) kept in float32 (what tuneqdm.base does on load).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import SD15_UNET_CONFIG, build_sd15_unet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# the SD v1.5 UNet's layout at CI size: the same blocks, 32-64 channels
REDUCED_SD_CONFIG = dict(
    SD15_UNET_CONFIG,
    block_out_channels=(32, 64, 64, 64),
    cross_attention_dim=32,
    layers_per_block=1,
    sample_size=16,
)


@dataclass
class Variant:
    """One timed method: `run()` is measured; `before()` / `after()` run untimed around
    it every round (e.g. building and dropping a weight cache)."""

    name: str
    run: Callable[[], Any]
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(variants: list[Variant], rounds: int, device: torch.device) -> list[dict]:
    """Round 0 warms every variant up (not counted); rounds 1..rounds are measured.

    Returns one dict per variant: wall and CPU seconds per round, their medians, the
    median per-round ratio to the first variant, and (CUDA) peak memory of its calls.
    """
    wall = {v.name: [] for v in variants}
    cpu = {v.name: [] for v in variants}
    peak = {v.name: 0 for v in variants}
    for round_index in range(rounds + 1):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if variant.before is not None:
                variant.before()
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            variant.run()
            synchronize(device)
            if round_index:
                wall[variant.name].append(time.perf_counter() - start)
                cpu[variant.name].append(time.process_time() - cpu_start)
            if device.type == "cuda":
                peak[variant.name] = max(
                    peak[variant.name], torch.cuda.max_memory_allocated(device)
                )
            if variant.after is not None:
                variant.after()
    first = variants[0].name
    rows = []
    for variant in variants:
        name = variant.name
        rows.append(
            {
                "name": name,
                **variant.info,
                "wall_s": wall[name],
                "cpu_s": cpu[name],
                "median_s": statistics.median(wall[name]),
                "median_cpu_s": statistics.median(cpu[name]),
                "ratio": _median_ratio(wall[name], wall[first]),
                "cpu_ratio": _median_ratio(cpu[name], cpu[first]),
                "peak_gpu_bytes": peak[name] if device.type == "cuda" else None,
            }
        )
    return rows


def _median_ratio(series: list[float], base: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(series, base, strict=True))


def build_unet(reduced: bool, seed: int = 0) -> torch.nn.Module:
    """The SD v1.5 UNet with seeded random weights, or its CI-sized twin."""
    if not reduced:
        return build_sd15_unet(seed)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**REDUCED_SD_CONFIG)


def cast_float_tensors(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every float parameter and buffer of a quantized UNet to `dtype`, except the
    scales (trainable, float32) and the grid's z and s0 (float32)."""
    from tuneqdm.model import quantized_layers

    keep = set()
    for layer in quantized_layers(unet).values():
        for tensor in (layer.scale_out, layer.scale_in, layer.zero, layer.scale0):
            if tensor is not None:
                keep.add(id(tensor))
    for module in unet.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in keep and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and id(buf) not in keep and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)


def sd_unets(
    bits: list[int], reduced: bool, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """{"float": UNet, "w4": quantized UNet, ...}: eval mode, on `device`, computing in
    `dtype`; quantized ones are TuneQDM N=4 at the scales' initial values (s0, 1),
    experts routed by the timestep argument."""
    from tuneqdm import QuantConfig, enable_timestep_experts, quantize_

    models = {"float": build_unet(reduced).to(device, dtype).eval()}
    for b in bits:
        unet = build_unet(reduced)
        quantize_(unet, QuantConfig(bits=b, num_experts=4))
        enable_timestep_experts(unet)
        unet.to(device)
        cast_float_tensors(unet, dtype)
        models[f"w{b}"] = unet.eval()
    return models


def unet_inputs(batch: int, reduced: bool, device, dtype, latent: int | None = None):
    """(sample, timestep, encoder_hidden_states) for one UNet forward."""
    config = REDUCED_SD_CONFIG if reduced else SD15_UNET_CONFIG
    size = latent or config["sample_size"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, size, size, generator=generator)
    text = torch.randn(batch, 77, config["cross_attention_dim"], generator=generator)
    timestep = torch.full((batch,), 500, dtype=torch.long)
    return sample.to(device, dtype), timestep.to(device), text.to(device, dtype)


def profile_table(run: Callable[[], Any], rows: int, device: torch.device) -> str:
    """torch.profiler's per-op table of one call of `run`, top `rows` by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
