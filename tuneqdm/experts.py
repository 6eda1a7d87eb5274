"""Timestep-aware scale selection (TuneQDM part 2) and per-sample scale rows.

Every quantized layer holds a table of scale rows, (R, out) and (R, in). In training
R = N experts; in serving R = slots * N, one block of N rows per resident subject.
A `ScaleRouter`, shared by all quantized layers of one model, says which row each
sample of the current batch uses:

    row = slot * N + expert,   expert = clamp(floor(t * N / T), 0, N - 1)

`attach_timestep_router` sets the rows from the timestep argument of every forward of
a model called as model(sample, timestep, ...) (a diffusers UNet), so experts follow
the scheduler's t with no change to the sampling loop, for int and float t alike.
"""

from __future__ import annotations

import torch
from torch import nn


def expert_index(
    timesteps: torch.Tensor | float | int, num_experts: int, num_train_timesteps: int
) -> torch.Tensor:
    """Expert of each timestep: floor(t * N / T) clamped to [0, N - 1].

    Args:
        timesteps: scalar or (B,) int or float timesteps (Euler-type schedulers use
            float t).
    Returns:
        int64 tensor with the shape of `timesteps`.
    """
    if isinstance(timesteps, float):  # not through float32: 249.999999 must stay < 250
        t = torch.tensor(timesteps, dtype=torch.float64)
    else:
        t = torch.as_tensor(timesteps)
    if t.is_floating_point():
        index = torch.floor(t.double() * num_experts / num_train_timesteps).long()
    else:
        index = torch.div(t.long() * num_experts, num_train_timesteps, rounding_mode="floor")
    return index.clamp(0, num_experts - 1)


class ScaleRouter:
    """Which scale row each sample of the current batch uses (shared by all layers).

    Attributes:
        num_experts: N.
        num_train_timesteps: T.
        slots: optional (P,) int64, the resident scale set (bank slot) of each
            prompt; None means slot 0 for every sample.
        rows: (B,) int64 rows of the current forward, or None when not yet set.
    """

    def __init__(self, num_experts: int, num_train_timesteps: int) -> None:
        self.num_experts = num_experts
        self.num_train_timesteps = num_train_timesteps
        self.slots: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def route_timesteps(self, timesteps: torch.Tensor | float | int, batch: int) -> None:
        """Set rows for a batch of `batch` samples at `timesteps` (scalar or (batch,)).

        With slots of length P and batch = k * P (classifier-free guidance stacks the
        unconditional and conditional halves), the slots are tiled k times.
        """
        experts = expert_index(timesteps, self.num_experts, self.num_train_timesteps)
        experts = experts.reshape(-1).expand(batch) if experts.numel() == 1 else experts
        if experts.shape != (batch,):
            raise ValueError(
                f"timesteps of shape {tuple(experts.shape)} do not match a batch of {batch}"
            )
        slots = torch.zeros(batch, dtype=torch.long)
        if self.slots is not None:
            if batch % len(self.slots):
                raise ValueError(
                    f"batch of {batch} samples is not a multiple of the {len(self.slots)} slots"
                )
            slots = self.slots.repeat(batch // len(self.slots))
        self.rows = slots.to(experts.device) * self.num_experts + experts

    def rows_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch,) rows for a layer whose input has `batch` samples."""
        if self.rows is None:
            if self.num_experts == 1 and self.slots is None:
                return torch.zeros(batch, dtype=torch.long, device=device)
            raise RuntimeError(
                "no scale rows selected: call the model through attach_timestep_router "
                "or set router.rows (one row index per sample)"
            )
        if self.rows.numel() != batch:
            raise RuntimeError(
                f"router holds {self.rows.numel()} rows but the layer input has {batch} samples"
            )
        return self.rows.to(device)


def attach_timestep_router(model: nn.Module, router: ScaleRouter) -> None:
    """Route rows from model(sample, timestep, ...) on every forward (a pre-hook)."""
    if getattr(model, "_tuneqdm_timestep_hook", None) is not None:
        model._tuneqdm_timestep_hook.remove()

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        router.route_timesteps(timestep, sample.shape[0])

    model._tuneqdm_timestep_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
