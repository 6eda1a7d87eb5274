"""The scale table: the one owner of every quantized layer's rows of scales.

Each quantized layer holds two tables of rows (docs/design.md §1):

    scale_out (slots * N, out)   float32, a row initialised to s0
    scale_in  (slots * N, in)    float32, a row initialised to 1 (TuneQDM only; PEQA: None)

Slot k holds one subject's N timestep experts in rows k*N .. k*N + N - 1. Training
uses one slot, and the tables are the trainable parameters; serving keeps several
subjects resident at once. Since the scales are diagonal they act on activations
(docs/design.md §2), so a subject is nothing but a block of rows and the row of each
sample is an index: one batch can mix subjects and timesteps.

This module is the only place that
- allocates the tables (`ScaleTable.allocate`; layers start with one slot),
- initialises rows, s_out <- s0 and s_in <- 1 (`ScaleRows.reset_scales`),
- writes a subject's scales into a slot in place (`ScaleTable.write`),
- selects each sample's row (`ScaleTable.select` picks the slots of a batch; a
  layer gathers its per-sample scales in `ScaleRows._scales`).
Which expert a sample uses is decided by the model's ScaleRouter (experts.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .experts import ScaleRouter

SCALE_ATTRS = ("scale_out", "scale_in")


class ScaleRows(nn.Module):
    """Base class of quantized layers: the layer's scale tables and their per-sample rows.

    A subclass registers the (out,) buffer `scale0` (the quantization grid's initial
    scale) and calls `_init_scale_rows` in its constructor.
    """

    scale0: torch.Tensor
    scale_out: nn.Parameter  # (R, out)
    scale_in: nn.Parameter | None  # (R, in), None for PEQA

    def _init_scale_rows(self, rows: int, out_features: int, in_features: int | None) -> None:
        """Tables of `rows` rows: (rows, out) and, unless `in_features` is None, (rows, in)."""
        self.scale_out = nn.Parameter(torch.ones(rows, out_features))
        self.scale_in = None if in_features is None else nn.Parameter(torch.ones(rows, in_features))
        self.router: ScaleRouter | None = None

    @property
    def num_rows(self) -> int:
        """R, the number of rows of each table."""
        return self.scale_out.shape[0]

    @torch.no_grad()
    def reset_scales(self, rows: slice | None = None) -> None:
        """scale_out <- s0 and scale_in <- 1 in `rows` (default: every row), in place.

        The paper's initialisation: the layer then computes exactly its quantized
        weight (W_q - z) * s0. The one place in the library that writes it.
        """
        rows = slice(None) if rows is None else rows
        scale_out = self.scale_out[rows]  # (rows, out), a view
        scale_out.copy_(self.scale0.expand_as(scale_out))
        if self.scale_in is not None:
            self.scale_in[rows].fill_(1.0)

    def _resize_rows(self, rows: int, trainable: bool) -> None:
        """Tables of `rows` rows on scale0's device, reusing those that already fit.

        A table is reallocated (float32) when its row count or device differs or it
        was never materialised (meta device); otherwise it is kept, storage and dtype
        included, and only its trainability is set. Values are left to the caller.
        """
        device = self.scale0.device
        for attr in SCALE_ATTRS:
            table = getattr(self, attr)
            if table is None:
                continue
            if table.is_meta or table.shape[0] != rows or table.device != device:
                fresh = torch.empty(rows, table.shape[1], device=device)
                setattr(self, attr, nn.Parameter(fresh, requires_grad=trainable))
            else:
                table.requires_grad_(trainable)

    def _scales(self, batch: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per-sample scales ((B, in) or None, (B, out)): each sample's row of the tables.

        The rows come from the router (computed once per model forward, on the
        input's device); without a router every sample uses row 0. With per-sample
        strengths alpha (B, 1) (ScaleTable.select), each sample's scales are
        s_out = s0 + alpha (row - s0) and s_in = 1 + alpha (row - 1), as torch.lerp,
        which is exact at alpha = 0 (the base) and alpha = 1 (the row itself).
        """
        router = self.router
        if router is None:
            rows = torch.zeros(batch, dtype=torch.long, device=device)
            weights = None
        else:
            rows = router.rows_for(batch, device)
            weights = router.weights_for(device)
        scale_in = None if self.scale_in is None else self.scale_in[rows]
        scale_out = self.scale_out[rows]
        if weights is None:  # every alpha is 1: the rows as they are
            return scale_in, scale_out
        weights = weights.to(scale_out.dtype)
        scale_out = torch.lerp(self.scale0.to(scale_out.dtype).expand_as(scale_out),
                               scale_out, weights)
        if scale_in is not None:
            scale_in = torch.lerp(torch.ones_like(scale_in), scale_in, weights)
        return scale_in, scale_out


class ScaleTable:
    """The scale tables of every quantized layer of one model, slot by slot.

    Holds the layers, not their tensors, so it stays valid when tables are
    reallocated. Attributes: layers (name -> layer, in module order), num_experts (N),
    router (the model's shared ScaleRouter).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[str, ScaleRows] = {
            name: module for name, module in model.named_modules() if isinstance(module, ScaleRows)
        }
        router = getattr(model, "tuneqdm_router", None)
        if not self.layers or router is None:
            raise ValueError("module is not quantized with tuneqdm.quantize_")
        self.router: ScaleRouter = router
        self.num_experts: int = router.num_experts

    # -- shape ----------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Subjects the tables hold: rows // N."""
        return next(iter(self.layers.values())).num_rows // self.num_experts

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one slot's rows over all layers, in fp32 (N * (out + in) * 4 each)."""
        return sum(
            self.num_experts * 4 * sum(getattr(layer, attr).shape[1] for attr in self._attrs(layer))
            for layer in self.layers.values()
        )

    def slot_shapes(self) -> dict[str, tuple[int, int]]:
        """Tensor name "<layer>.scale_out" / "<layer>.scale_in" -> (N, channels) of a slot."""
        return {
            f"{name}.{attr}": (self.num_experts, getattr(layer, attr).shape[1])
            for name, layer in self.layers.items()
            for attr in self._attrs(layer)
        }

    # -- allocation and writes ------------------------------------------------------

    @torch.no_grad()
    def allocate(self, slots: int, trainable: bool) -> None:
        """Make every table `slots * N` rows, each row initialised (s_out = s0, s_in = 1).

        Tables that already have that many rows on the layer's device are reused in
        place; others are replaced by fresh float32 parameters. `trainable` sets
        requires_grad. Forgets any slot selection (slot indices refer to the old table).
        """
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"scale table slots {slots!r} is invalid: must be an int >= 1")
        for layer in self.layers.values():
            layer._resize_rows(slots * self.num_experts, trainable)
            layer.reset_scales()
        self.router.slots = None

    @torch.no_grad()
    def reset(self, slot: int | None = None) -> None:
        """Initialise the rows of `slot` (default: every slot): s_out <- s0, s_in <- 1."""
        rows = None if slot is None else self._slot_rows(slot)
        for layer in self.layers.values():
            layer.reset_scales(rows)

    @torch.no_grad()
    def write(self, slot: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a subject's scales into `slot`, in place: no table is reallocated.

        tensors: "<layer>.scale_out" -> (N, out) and "<layer>.scale_in" -> (N, in) for
            every layer (a ScaleSet's tensors; check it with ScaleSet.check_fits first).
        One fused multi-tensor copy for all layers (one kernel launch on a GPU).
        """
        rows = self._slot_rows(slot)
        targets, sources = [], []
        for name, layer in self.layers.items():
            for attr in self._attrs(layer):
                targets.append(getattr(layer, attr).detach()[rows])  # (N, channels), a view
                sources.append(tensors[f"{name}.{attr}"])
        if sources[0].device != targets[0].device:  # host copy -> GPU table
            sources = [t.to(targets[0].device, non_blocking=True) for t in sources]
        torch._foreach_copy_(targets, sources)

    def read(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """The rows of `slot` as a scale set's tensors: name -> (N, channels) float32 CPU copies."""
        rows = self._slot_rows(slot)
        return {
            f"{name}.{attr}": getattr(layer, attr).detach()[rows].float().cpu().clone().contiguous()
            for name, layer in self.layers.items()
            for attr in self._attrs(layer)
        }

    # -- selection ------------------------------------------------------------------

    @contextlib.contextmanager
    def select(
        self,
        slots: Sequence[int] | torch.Tensor | None,
        strengths: Sequence[float] | torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Within the block, the model's batches use these slots, one per sample.

        slots: (P,) slot of each sample, or None (slot 0 for every sample). A batch of
            k * P samples (classifier-free guidance stacks unconditional and
            conditional halves) tiles them k times; each sample's expert still follows
            its timestep. The previous selection is restored on exit.
        strengths: (P,) finite strength alpha of each sample, or None (alpha = 1 for
            all: the rows as they are, the cheapest path). A sample's scales are then
            s0 + alpha (s - s0) and 1 + alpha (s_in - 1), computed when a layer gathers
            its rows: alpha 0 is the untuned base, 1 the subject; no table is copied.
        """
        if slots is None and strengths is None:
            yield
            return
        if slots is None:
            slots = [0] * len(torch.as_tensor(strengths).reshape(-1))
        slots = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
        bad = [s for s in slots.tolist() if not 0 <= s < self.num_slots]
        if bad or not len(slots):
            raise ValueError(
                f"slots {bad or '[]'} are invalid: one or more slot indices in "
                f"[0, {self.num_slots}) (the tables hold {self.num_slots} slots)"
            )
        weights = None if strengths is None else _check_strengths(strengths, len(slots))
        previous = self.router.slots, self.router.strengths
        self.router.slots, self.router.strengths = slots, weights
        try:
            yield
        finally:
            self.router.slots, self.router.strengths = previous

    # -- helpers --------------------------------------------------------------------

    def _slot_rows(self, slot: int) -> slice:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is invalid: the tables hold {self.num_slots} slots")
        return slice(slot * self.num_experts, (slot + 1) * self.num_experts)

    @staticmethod
    def _attrs(layer: ScaleRows) -> tuple[str, ...]:
        return tuple(attr for attr in SCALE_ATTRS if getattr(layer, attr) is not None)


def _check_strengths(strengths: Sequence[float] | torch.Tensor, count: int) -> torch.Tensor:
    """(count,) float32 strengths, or ValueError naming what is wrong."""
    weights = torch.as_tensor(strengths, dtype=torch.float32).reshape(-1)
    if len(weights) != count:
        raise ValueError(f"{len(weights)} strengths for {count} slots: give one per slot")
    if not torch.isfinite(weights).all():
        raise ValueError(f"strengths {weights.tolist()} are invalid: must be finite numbers")
    return weights
