"""ScaleBank: the cache policy of the subjects resident in one quantized UNet.

docs/design.md §2: y = s_out * ((W_q - z) @ (s_in * x)) + b, so a subject is nothing
but its scale rows, and which rows a sample uses is an index. The rows themselves
belong to tuneqdm's scale table (tuneqdm/scaletable.py): the bank has it allocate,
ONCE, `capacity` slots of N rows in every quantized layer, and then only has it copy a
subject's rows into a slot, in place: no table is reallocated and no base tensor
(packed integers, zero points, biases) is touched.

What is left here is the policy: which subject sits in which slot. Slots are reused
least-recently-used first; the slots of the batch being assembled are pinned, so a
batch never evicts its own subjects; Serve's cache may demote or discard a subject.
A batch then runs with `tuneqdm.generate.generate(..., slots=...)`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from torch import nn

from tuneqdm.scaleset import ScaleSet
from tuneqdm.scaletable import ScaleTable


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
        try:
            self.table = ScaleTable(unet)
        except ValueError:
            raise ValueError("ScaleBank needs a UNet quantized with tuneqdm") from None
        self.num_experts = self.table.num_experts
        # every row starts as the base's own scales (s_out = s0, s_in = 1)
        self.table.allocate(capacity, trainable=False)
        self._lock = threading.Lock()
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # LRU first
        self._free = list(range(capacity - 1, -1, -1))
        self.writes = 0  # slot writes so far (a subject's rows copied in)

    # -- state --------------------------------------------------------------------------

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one subject's rows over all layers (fp32)."""
        return self.table.bytes_per_slot

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

    def _write(self, slot: int, scale_set: ScaleSet) -> None:
        """Copy `scale_set`'s rows into `slot`, in place (tables keep their storage)."""
        self.table.write(slot, scale_set.tensors)
        self.writes += 1
