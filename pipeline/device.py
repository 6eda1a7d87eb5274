"""Which torch device a FineTuner actor computes on (`submit --device`).

    auto   cuda when Ray assigned this actor a GPU that torch can use, else cpu
    cpu    always the CPU, even on an actor that holds (logical) GPUs: the cluster
           tests schedule actors on GPUs without computing on them
    cuda   the GPU Ray assigned to this actor; a clear error when it has none

The decision itself is tuneqdm.device.resolve_device (one owner, shared with the
Serve replicas); this module only supplies what Ray assigned.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


def ray_gpu_ids() -> list | None:
    """The GPU ids Ray assigned to this process, or None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_gpu_ids() if ray.is_initialized() else None


def actor_device(requested: str) -> str:
    """"cpu" or "cuda:N" for `requested` (one of DEVICES) in the calling process.

    Raises tuneqdm.device.DeviceError for "cuda" where Ray assigned no GPU or torch
    sees none."""
    from tuneqdm.device import resolve_device

    if requested not in DEVICES:
        raise ValueError(f"device {requested!r} is invalid: one of {', '.join(DEVICES)}")
    return str(resolve_device(requested, ray_gpu_ids()))
