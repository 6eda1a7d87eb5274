"""Timestep-aware scale selection (TuneQDM part 2) and per-sample scale rows.

Every quantized layer holds a table of scale rows, (R, out) and (R, in). In training
R = N experts; in serving R = slots * N, one block of N rows per resident subject.
A `ScaleRouter`, shared by all quantized layers of one model, says which row each
sample of the current batch uses:

    row = slot * N + expert,   expert = clamp(floor(t * N / T), 0, N - 1)

`attach_timestep_router` sets the rows from the timestep argument of every forward of
a model called as model(sample, timestep, ...) (a diffusers UNet), so experts follow
the scheduler's t with no change to the sampling loop, for int and float t alike.
`tuneqdm.quantize_` attaches it by itself to every model whose forward has that
signature (`takes_timestep`). The rows are computed once per model forward, on the
device of its input; the slots of a batch are chosen with ScaleTable.select
(scaletable.py).
"""

from __future__ import annotations

import inspect

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
        strengths: optional (P,) float32 strength alpha of each prompt, tiled like
            the slots; None means alpha = 1 for every sample (the rows as they are).
        rows: (B,) int64 rows of the current forward, or None when not yet set.
        weights: (B, 1) float32 alphas of the current forward, or None (alpha = 1).
    """

    def __init__(self, num_experts: int, num_train_timesteps: int) -> None:
        self.num_experts = num_experts
        self.num_train_timesteps = num_train_timesteps
        self.slots: torch.Tensor | None = None
        self.strengths: torch.Tensor | None = None
        self.rows = None
        self._zeros: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def rows(self) -> torch.Tensor | None:
        """(B,) int64 rows of the current forward (slot * N + expert), or None."""
        return self._rows

    @rows.setter
    def rows(self, rows: torch.Tensor | None) -> None:
        self._rows = rows
        self._rows_on: dict[torch.device, torch.Tensor] = {}  # copies for other devices
        self._weights: torch.Tensor | None = None  # set by route_timesteps after the rows
        self._weights_on: dict[torch.device, torch.Tensor] = {}

    def route_timesteps(
        self,
        timesteps: torch.Tensor | float | int,
        batch: int,
        device: torch.device | str | None = None,
    ) -> None:
        """Set rows for a batch of `batch` samples at `timesteps` (scalar or (batch,)).

        With slots of length P and batch = k * P (classifier-free guidance stacks the
        unconditional and conditional halves), the slots are tiled k times. The rows
        are made on `device` (default: the timesteps' device), the layers' device, so
        no layer copies them.
        """
        experts = expert_index(timesteps, self.num_experts, self.num_train_timesteps)
        experts = experts.reshape(-1).expand(batch) if experts.numel() == 1 else experts
        if experts.shape != (batch,):
            raise ValueError(
                f"timesteps of shape {tuple(experts.shape)} do not match a batch of {batch}"
            )
        device = experts.device if device is None else torch.device(device)
        if self.slots is None:
            self.rows = experts.to(device).contiguous()
        else:
            if batch % len(self.slots):
                raise ValueError(
                    f"batch of {batch} samples is not a multiple of the {len(self.slots)} slots"
                )
            slots = self.slots.to(device).repeat(batch // len(self.slots))
            self.rows = slots * self.num_experts + experts.to(device)
        if self.strengths is not None:  # (P,) tiled like the slots: (B, 1)
            tiles = batch // len(self.strengths)
            self._weights = self.strengths.to(device).repeat(tiles)[:, None]

    def weights_for(self, device: torch.device) -> torch.Tensor | None:
        """(B, 1) float32 strengths of the current forward on `device`, or None (alpha = 1)."""
        weights = self._weights
        if weights is None or weights.device == device:
            return weights
        copy = self._weights_on.get(device)
        if copy is None:
            copy = self._weights_on[device] = weights.to(device)
        return copy

    def rows_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch,) rows for a layer whose input has `batch` samples, on `device`.

        No copy when the rows are on `device` already (route_timesteps made them
        there); otherwise one copy per device and forward, shared by all layers.
        """
        if self._rows is None:
            if self.num_experts == 1 and self.slots is None:
                return self._zero_rows(batch, torch.device(device))
            raise RuntimeError(self._unrouted_message())
        if self._rows.numel() != batch:
            raise RuntimeError(
                f"router holds {self._rows.numel()} rows but the layer input has {batch} samples"
            )
        if self._rows.device == device:
            return self._rows
        rows = self._rows_on.get(device)
        if rows is None:
            rows = self._rows_on[device] = self._rows.to(device)
        return rows

    def _unrouted_message(self) -> str:
        what = f"{self.num_experts} timestep experts"
        if self.slots is not None:
            what += f" and {len(self.slots)} selected slots"
        return (
            f"no scale rows selected: this model has {what} and nothing routed this batch "
            "(quantize_ routes a forward(sample, timestep, ...) by itself). For any other "
            "forward, route each batch before the call with "
            "tuneqdm.get_router(model).route_timesteps(timesteps, batch), or set "
            "tuneqdm.get_router(model).rows to a (batch,) tensor of row indices "
            "(slot * N + expert)"
        )

    def _zero_rows(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch,) zeros on `device`, made once per batch size (one expert, one slot)."""
        key = (batch, device)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(batch, dtype=torch.long, device=device)
        return self._zeros[key]


def takes_timestep(model: nn.Module) -> bool:
    """Whether model's forward is forward(sample, timestep, ...) (diffusers' models)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-implemented forward
        return False
    positional = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2 and positional[1] == "timestep"


def attach_timestep_router(model: nn.Module, router: ScaleRouter) -> None:
    """Route rows from model(sample, timestep, ...) on every forward (a pre-hook).

    Idempotent: attaching again replaces the hook. The hook finds the router on the
    module it is called for, so a deep copy of the model routes its own router.
    """
    if getattr(model, "_tuneqdm_timestep_hook", None) is not None:
        model._tuneqdm_timestep_hook.remove()
    model._tuneqdm_timestep_router = router
    model._tuneqdm_timestep_hook = model.register_forward_pre_hook(
        _route_from_timestep, with_kwargs=True
    )


def _route_from_timestep(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: rows of the batch from the call's sample and timestep."""
    # every argument by keyword: the sample is forward's first parameter
    first = next(iter(inspect.signature(module.forward).parameters)) if not args else None
    sample = args[0] if args else kwargs[first]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    module._tuneqdm_timestep_router.route_timesteps(timestep, sample.shape[0], sample.device)
