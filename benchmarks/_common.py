"""Shared helpers of the benchmark scripts: the SD v1.5 UNet, tables, JSON, memory.

The SD v1.5 UNet is built from its config values typed in here (the hub cannot be
reached), with random weights: sizes, memory and speed depend on the shapes only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

# runwayml/stable-diffusion-v1-5, unet/config.json (the fields that shape the model).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
}
SD15_UNET_PARAMETERS = 859_520_964  # the published UNet's parameter count
GIB = 2**30


def build_sd15_unet(seed: int = 0) -> torch.nn.Module:
    """The SD v1.5 UNet2DConditionModel with seeded random (diffusers-default) weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    count = sum(p.numel() for p in unet.parameters())
    if count != SD15_UNET_PARAMETERS:
        raise RuntimeError(
            f"SD v1.5 UNet has {count:,} parameters, expected "
            f"{SD15_UNET_PARAMETERS:,}: the config above is wrong"
        )
    return unet


def add_lora(unet: torch.nn.Module, rank: int = 4) -> None:
    """The LoRA baseline: freeze the UNet and add rank-`rank` adapters to the attention
    projections (the DreamBooth-LoRA recipe's targets), trainable."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def tensor_bytes(tensors) -> int:
    """Total storage of an iterable of tensors, in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with (key, header) `columns`; floats as given."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- memory


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so RSS shows live data."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since start or the last `reset_peak_rss`.

    (getrusage's ru_maxrss is no alternative: on Linux it reads the same counter, so
    the reset clears it too.)
    """
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True
