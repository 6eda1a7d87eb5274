"""ScaleBank: a fixed number of subjects' scale sets resident in one quantized UNet.

DESIGN section 2: y = s_out * ((W_q - z) @ (s_in * x)) + b, so a subject is nothing
but its scale rows, and which rows a sample uses is an index. The bank gives every
quantized layer, ONCE, scale tables of `capacity * N` rows

    scale_out (capacity * N, out)     scale_in (capacity * N, in)

(slot k holds a subject's N experts in rows k*N .. k*N + N - 1, the layout of
tuneqdm.scaleset.install_scale_sets) and then only ever copies a subject's rows into
a slot, in place: no table is reallocated and no base tensor (packed integers, zero
points, biases) is touched. Slots are reused least-recently-used first; the slots of
the batch being assembled are pinned, so a batch never evicts its own subjects.

`generate_slots` runs tuneqdm.generate.generate with each prompt on its bank slot:
prompts of different subjects share one UNet batch.

Proposed for tuneqdm (this module only uses its public API): `ScaleBank` as
tuneqdm/bank.py, and a `slots=` argument of tuneqdm.generate.generate in place of
setting `router.slots` before calling it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch
from torch import nn

from tuneqdm.generate import generate
from tuneqdm.model import get_router, quantized_layers
from tuneqdm.scaleset import ScaleSet


class BankFullError(RuntimeError):
    """A batch names more distinct subjects than the bank has slots."""


class ScaleBank:
    """`capacity` slots of scale rows in `unet`'s quantized layers, LRU-managed.

    Thread-safe (one lock); generation and slot writes must still not overlap, which
    the replica guarantees by doing both on its one batch thread.
    """

    def __init__(self, unet: nn.Module, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"bank capacity {capacity!r} is invalid: must be an int >= 1")
        self.unet = unet
        self.capacity = capacity
        self.num_experts = unet.tuneqdm_config.num_experts
        self._layers = quantized_layers(unet)
        if not self._layers:
            raise ValueError("ScaleBank needs a UNet quantized with tuneqdm")
        rows = capacity * self.num_experts
        with torch.no_grad():
            for layer in self._layers.values():
                device = layer.packed.device
                # every row starts as the base's own scales (s_out = s0, s_in = 1)
                table_out = layer.scale0.float().to(device).expand(rows, -1).clone()
                layer.scale_out = nn.Parameter(table_out, requires_grad=False)
                if layer.scale_in is not None:
                    table_in = torch.ones(rows, layer.in_features, device=device)
                    layer.scale_in = nn.Parameter(table_in, requires_grad=False)
        self._tables = [(name, attr, getattr(layer, attr).data)
                        for name, layer in self._layers.items()
                        for attr in ("scale_out", "scale_in") if getattr(layer, attr) is not None]
        self._lock = threading.Lock()
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # LRU first
        self._free = list(range(capacity - 1, -1, -1))
        self.writes = 0  # slot writes so far (a subject's rows copied in)

    # -- state --------------------------------------------------------------------------

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one subject's rows over all layers (fp32)."""
        return sum(
            self.num_experts * 4 * (layer.out_features + (
                layer.in_features if layer.scale_in is not None else 0))
            for layer in self._layers.values()
        )

    def resident(self) -> list[Hashable]:
        """Keys of the resident subjects, least recently used first."""
        with self._lock:
            return list(self._slots)

    def slot_of(self, key: Hashable) -> int | None:
        with self._lock:
            return self._slots.get(key)

    # -- changes -------------------------------------------------------------------------

    def acquire(self, entries: Sequence[tuple[Hashable, ScaleSet]]) -> list[int]:
        """Slots for a batch: one per entry, writing the rows of non-resident ones.

        Entries with the same key share a slot. Raises BankFullError if the batch
        has more distinct keys than the bank has slots, ScaleSetError if a set does not
        fit the UNet (nothing is written for it then).
        """
        distinct = list(dict(entries).items())
        if len(distinct) > self.capacity:
            raise BankFullError(f"a batch of {len(distinct)} distinct subjects does not fit "
                                f"a bank of {self.capacity} slots")
        with self._lock:
            # the batch's resident subjects are pinned first, so loading its other
            # subjects never evicts them
            pinned = {key: self._slots[key] for key, _ in distinct if key in self._slots}
            for key, scale_set in distinct:
                if key not in pinned:
                    scale_set.check_fits(self.unet)
                    slot = self._take_slot(set(pinned.values()))
                    self._write(slot, scale_set)
                    self._slots[key] = slot
                    pinned[key] = slot
                self._slots.move_to_end(key)
            return [pinned[key] for key, _ in entries]

    def demote(self, key: Hashable) -> None:
        """Make `key` the first to be evicted (its rows stay until the slot is reused)."""
        with self._lock:
            if key in self._slots:
                self._slots.move_to_end(key, last=False)

    def discard(self, key: Hashable) -> None:
        """Free `key`'s slot now."""
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    def _take_slot(self, pinned: set[int]) -> int:
        if self._free:
            return self._free.pop()
        for key, slot in self._slots.items():  # least recently used first
            if slot not in pinned:
                del self._slots[key]
                return slot
        raise BankFullError("every slot is pinned by the current batch")  # unreachable

    @torch.no_grad()
    def _write(self, slot: int, scale_set: ScaleSet) -> None:
        """Copy `scale_set`'s rows into `slot`, in place (tables keep their storage)."""
        n = self.num_experts
        rows = slice(slot * n, (slot + 1) * n)
        targets, sources = [], []
        for name, attr, table in self._tables:
            targets.append(table[rows])  # a view: (N, channels) of the preallocated table
            sources.append(scale_set.tensors[f"{name}.{attr}"])
        if sources[0].device != targets[0].device:  # host copy -> GPU bank
            sources = [t.to(targets[0].device, non_blocking=True) for t in sources]
        # one fused call for all 2 x layers copies (one multi-tensor kernel on GPU)
        torch._foreach_copy_(targets, sources)
        self.writes += 1


@torch.no_grad()
def generate_slots(pipe, prompts: list[str], slots: list[int], seeds: list[int],
                   **kwargs) -> list:
    """tuneqdm.generate.generate with prompt p on bank slot slots[p] and seed seeds[p].

    One image per prompt (repeat a prompt for several); kwargs: num_inference_steps,
    guidance_scale, height, width, negative_prompt (one per prompt or None).
    """
    if not (len(prompts) == len(slots) == len(seeds)):
        raise ValueError(f"{len(prompts)} prompts, {len(slots)} slots and {len(seeds)} seeds: "
                         "give one of each per prompt")
    router = get_router(pipe.unet)
    router.slots = torch.tensor(slots, dtype=torch.long)  # tiled by the router for CFG
    try:
        # scale_sets=None: generate keeps the UNet's tables and the slots set above
        return generate(pipe, prompts, None, seed=list(seeds), num_images_per_prompt=1,
                        **kwargs)
    finally:
        router.slots = None
