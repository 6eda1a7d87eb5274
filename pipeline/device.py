"""Which torch device a FineTuner actor computes on (`submit --device`).

    auto   cuda when this process has a GPU it can use, else cpu
    cpu    always the CPU, even on an actor that holds (logical) GPUs: the cluster
           tests schedule actors on GPUs without computing on them
    cuda   the GPU Ray assigned to this actor; an error when it has none
"""

from __future__ import annotations

from collections.abc import Sequence

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The requested device cannot be used in this process."""


def resolve_device(requested: str, gpu_ids: Sequence[object] | None,
                   cuda_available: bool) -> str:
    """"cpu" or "cuda" for `requested` (one of DEVICES), given the GPUs Ray assigned to
    this process (`ray.get_gpu_ids()`, None outside Ray) and whether torch sees CUDA."""
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r} is invalid: one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    has_gpu = cuda_available and (gpu_ids is None or len(gpu_ids) > 0)
    if requested == "auto":
        return "cuda" if has_gpu else "cpu"
    if gpu_ids is not None and not gpu_ids:
        raise DeviceError("--device cuda: this actor has no GPU assigned by Ray (ask for "
                          "GPUs with --num-gpus-per-actor, or use --device cpu/auto)")
    if not cuda_available:
        raise DeviceError("--device cuda: torch sees no CUDA device on this node (a CPU "
                          "build of torch, or no driver); use --device cpu or auto")
    return "cuda"


def actor_device(requested: str) -> str:
    """resolve_device for the calling process: Ray's GPU ids when inside a Ray worker."""
    import torch

    gpu_ids = None
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = ray.get_gpu_ids()
    except ImportError:
        pass
    return resolve_device(requested, gpu_ids, torch.cuda.is_available())
