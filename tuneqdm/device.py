"""Where and in what precision to compute: pure decisions, taken once at the edge.

The callers (pipeline actors, deploy replicas) pass in what they know: the user's
request (`--device auto|cpu|cuda[:N]`, `--dtype auto|fp32|bf16|fp16`), the GPU ids Ray
assigned to the process (`ray.get_gpu_ids()`, or None outside Ray) and whether torch
sees CUDA. Ray hides every GPU from an actor or replica that did not ask for one, so
"auto" there means the CPU, and an explicit "cuda" is refused with a clear error
instead of silently running on the CPU.

Precision (docs/benchmarks.md, "Fast everywhere"): bf16 is the default compute dtype
on CUDA (fp32's range, 8 mantissa bits; the integers of W_q - z are exact in it);
fp16 is allowed, since the kernels pre-scale the weight so that nothing overflows
(packed.fp16_row_factor, tests/tuneqdm/test_inference.py). Scales and optimiser state
stay float32 whatever the compute dtype. Training on CUDA with an fp32 model runs
under bf16 autocast (`training_autocast`).

CUDA out of memory: `is_cuda_oom` recognises it; `train_with_oom_retry` retries a
training once with gradient checkpointing (or, when it is already on, half the
batch) and otherwise raises `OutOfMemory`, so that callers can report it as what it
is rather than as the subject's own failure.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .model import quantized_layers

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
Result = TypeVar("Result")


class DeviceError(ValueError):
    """A device request that cannot be met here (bad name, or no GPU assigned)."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory, also after the one retry; `tried` says what was tried."""

    def __init__(self, message: str, tried: list[str]) -> None:
        super().__init__(message)
        self.tried = tried


def resolve_device(
    request: str = "auto",
    assigned_gpus: Sequence[Any] | None = None,
    cuda_available: bool | None = None,
) -> torch.device:
    """The device to compute on.

    Args:
        request: "auto", "cpu", "cuda" or "cuda:N".
        assigned_gpus: the GPU ids Ray assigned to this process (ray.get_gpu_ids());
            None when not running under Ray. Ray renumbers the visible GPUs from 0,
            so "cuda" is "cuda:0" and N must be below len(assigned_gpus).
        cuda_available: torch.cuda.is_available() unless given.
    Returns:
        torch.device("cpu") or torch.device("cuda", N).
    Raises:
        DeviceError: an unknown request, or "cuda" where no GPU is assigned or visible.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    usable = cuda_available and (assigned_gpus is None or len(assigned_gpus) > 0)
    if request == "cpu":
        return torch.device("cpu")
    if request == "auto":
        return torch.device("cuda", 0) if usable else torch.device("cpu")
    index = _cuda_index(request)
    if assigned_gpus is not None and len(assigned_gpus) == 0:
        raise DeviceError(
            f"device {request!r} was asked for, but Ray assigned no GPU to this process: "
            "ask for one (num_gpus=1 for the actor or replica) or use --device auto or cpu"
        )
    if not cuda_available:
        raise DeviceError(
            f"device {request!r} was asked for, but torch sees no CUDA device (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}): "
            "use --device auto or cpu"
        )
    visible = len(assigned_gpus) if assigned_gpus is not None else torch.cuda.device_count()
    if index >= visible:
        raise DeviceError(
            f"device {request!r}: only {visible} GPU(s) are visible here "
            f"(cuda:0 to cuda:{visible - 1})"
        )
    return torch.device("cuda", index)


def _cuda_index(request: str) -> int:
    """N of "cuda" (0) or "cuda:N"; DeviceError for anything else."""
    allowed = "one of auto, cpu, cuda, cuda:N"
    if request == "cuda":
        return 0
    prefix, _, number = str(request).partition(":")
    if prefix != "cuda" or not number.isdigit():
        raise DeviceError(f"device {request!r} is invalid: {allowed}")
    return int(number)


def resolve_dtype(request: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype: "auto" is bf16 on CUDA and float32 elsewhere; otherwise one of
    fp32/float32, bf16/bfloat16, fp16/float16."""
    if request == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if request not in DTYPES:
        raise ValueError(f"dtype {request!r} is invalid: one of auto, {', '.join(DTYPES)}")
    return DTYPES[request]


def training_autocast(device: torch.device | str, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for training: bf16 for an fp32 model on CUDA, else None (a
    model already in bf16/fp16 computes in its own dtype; the CPU trains in fp32)."""
    if torch.device(device).type == "cuda" and compute_dtype == torch.float32:
        return torch.bfloat16
    return None


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype) of a UNet, float or quantized (a quantized layer computes
    in its input's dtype, which is its bias's: tuneqdm.base casts both on load)."""
    layers = quantized_layers(model)
    if layers:
        layer = next(iter(layers.values()))
        compute = layer.bias.dtype if layer.bias is not None else torch.float32
        return layer.packed.device, compute
    param = next(model.parameters())
    return param.device, param.dtype


def is_cuda_oom(error: BaseException) -> bool:
    """Whether `error` is CUDA running out of memory (torch.OutOfMemoryError, or a
    RuntimeError with CUDA's message, as some kernels raise it)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and "CUDA" in message and "out of memory" in message


def oom_retry_config(config: Any) -> tuple[Any, str] | None:
    """(config for the one retry, what it changes), or None when nothing is left to try:
    gradient checkpointing when it is off, else half the batch when it is above 1.
    `config`: a frozen dataclass with gradient_checkpointing and batch_size (TrainConfig).
    """
    if not config.gradient_checkpointing:
        return dataclasses.replace(config, gradient_checkpointing=True), "gradient checkpointing"
    if config.batch_size > 1:
        half = config.batch_size // 2
        return dataclasses.replace(config, batch_size=half), f"batch size {half}"
    return None


def train_with_oom_retry(train: Callable[[Any], Result], config: Any) -> Result:
    """train(config); on CUDA out of memory, once more with `oom_retry_config(config)`.

    Raises:
        OutOfMemory: out of memory again, or nothing left to try. Other errors pass.
    """
    try:
        return train(config)
    except Exception as error:
        if not is_cuda_oom(error):
            raise
        first = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    # the exception is gone here (and with it its frames' tensors): give memory back
    _release_cuda_memory()
    retry = oom_retry_config(config)
    if retry is None:
        raise OutOfMemory(
            f"CUDA out of memory ({first}) with gradient checkpointing on and batch size "
            f"{config.batch_size}: nothing left to retry with",
            [],
        )
    retry_config, change = retry
    try:
        return train(retry_config)
    except Exception as error:
        if not is_cuda_oom(error):
            raise
        message = f"CUDA out of memory, also when retried with {change} ({first})"
    _release_cuda_memory()
    raise OutOfMemory(message, [change])


def _release_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
