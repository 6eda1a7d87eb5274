"""Frozen packed integer weights as the kernels read them, and their expansion.

A quantized layer's weight is a packed uint8 stream (quant.py). The kernels
(functional.py) expand it per call into a float tensor: W_u = W_q - qmin for the fp32
training path (which folds the zero point out, functional.py), or the centred
W_q - z (integers in [-255, 255], exact in every float format) for the bf16/fp16
training path and for inference. On CPU the expansion goes into one buffer per thread
and dtype, reused by every layer; a serving replica may instead keep the centred
weight expanded once per layer (`tuneqdm.inference.cache_expanded_weights`, the layer
attribute named EXPANDED_WEIGHT), since it is the same for every subject (docs/design.md §2).

fp16 (docs/benchmarks.md, "Fast everywhere"): u = (W_q - z)(s_in x) is in integer
units, about 1/s0 times the layer's output, and can pass fp16's 65,504; in fp16 the
centred weight is pre-scaled per row by a power of two near s0 (`fp16_row_factor`),
exactly, and the kernels divide s_out by the same factor.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .quant import unpack_unsigned

EXPANDED_WEIGHT = "expanded_weight"  # the layer attribute holding its ExpandedWeight

_THREAD_BUFFERS = threading.local()


def _transient_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat (numel,) CPU buffer of `dtype`, reused by every kernel call of this thread.

    Valid until the next call in the same thread. It grows to the largest layer and
    stays (59 MB in fp32 for SD v1's largest, a 1280 x 1280 x 3 x 3 conv). Why: on
    CPU, glibc returns large freed blocks to the OS, so a fresh weight-sized tensor
    faults every page in again; that cost 6x the uint8 -> float conversion itself here.
    """
    buffers = getattr(_THREAD_BUFFERS, "by_dtype", None)
    if buffers is None:
        buffers = _THREAD_BUFFERS.by_dtype = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        # a normal tensor even when first called under inference_mode: an inference
        # tensor could not be written to by a later forward outside inference_mode
        with torch.inference_mode(False):
            buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


@dataclass(frozen=True)
class ExpandedWeight:
    """A layer's centred weight kept expanded: `weight` = (W_q - z) * fp16 row factor,
    made from the packed stream `source` when its in-place version was `version`."""

    weight: torch.Tensor
    source: torch.Tensor
    version: int

    def serves(self, packed: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether it is this stream's, unchanged since, in `dtype` on its device."""
        weight = self.weight
        return (
            packed is self.source
            and packed._version == self.version
            and weight.dtype == dtype
            and weight.device == packed.device
        )


@dataclass
class PackedWeight:
    """A frozen packed integer weight, as the kernels read it.

    packed: flat uint8 stream (see quant.pack_int); shape: the weight's shape,
    (out, in) or (out, in / groups, kh, kw); zero_u: (out,) float, z - qmin;
    scale0: (out,) float32 initial scales (sets the fp16 row factor, `fp16_row_factor`);
    cached: the layer's `ExpandedWeight` (tuneqdm.inference.cache_expanded_weights) or None.
    """

    packed: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    zero_u: torch.Tensor
    scale0: torch.Tensor | None = None
    cached: ExpandedWeight | None = None

    def expand(self, dtype: torch.dtype) -> torch.Tensor:
        """W_u = W_q - qmin as `dtype`, shape `self.shape` (a new tensor)."""
        numel = math.prod(self.shape)
        return unpack_unsigned(self.packed, self.bits, numel, dtype).view(self.shape)

    def expand_transient(self, dtype: torch.dtype) -> torch.Tensor:
        """W_u like `expand`, on CPU written into this thread's reused buffer: only valid
        until the next `expand_transient` of the thread, so use it and drop it."""
        if self.packed.device.type != "cpu":
            return self.expand(dtype)  # the CUDA caching allocator already reuses memory
        numel = math.prod(self.shape)
        out = _transient_buffer(numel, dtype)
        return unpack_unsigned(self.packed, self.bits, numel, dtype, out=out).view(self.shape)

    def centred(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_c, factor): W_c = (W_q - z) * factor[:, None], shape `self.shape`, `dtype`.

        factor is None (i.e. 1) except in fp16 (`fp16_row_factor`). Integers in
        [-255, 255] times a power of two: exact in every float format. Taken from the
        cache when it holds `dtype`, else expanded into the transient buffer (valid
        until the next expansion of the thread).
        """
        factor = fp16_row_factor(self.scale0) if dtype == torch.float16 else None
        if self.cached is not None and self.cached.serves(self.packed, dtype):
            return self.cached.weight, factor
        zero = self.zero_u.to(dtype)[:, None]  # (out, 1)
        numel = math.prod(self.shape)
        if torch.compiler.is_compiling():  # no thread-local buffers inside a traced graph
            w = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        elif self.packed.device.type == "cpu":
            w = _transient_buffer(numel, dtype).view(self.shape)
        else:
            w = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        rows = w.view(w.shape[0], -1)  # (out, in * k * k)
        per_byte = 8 // self.bits if self.bits in (8, 4, 2) else 0
        if per_byte and rows.shape[1] % per_byte == 0:  # whole rows per byte run
            _unpack_centred(self.packed, self.bits, rows, zero)
        else:
            unpack_unsigned(self.packed, self.bits, numel, dtype, out=w.view(-1))
            rows.sub_(zero)
        if factor is not None:
            rows.mul_(factor.to(dtype)[:, None])
        return w, factor


def _unpack_centred(
    packed: torch.Tensor, bits: int, rows: torch.Tensor, zero: torch.Tensor
) -> None:
    """rows <- unpacked values - zero, one strided pass per lane (8 / bits lanes).

    rows: (out, K) float, K a multiple of 8 / bits, so that each row's values fill
    whole bytes; zero: (out, 1) z_u in rows' dtype. uint8 - float promotes to float,
    so the cast, the shift and the centring are one pass (what the training kernels
    in bf16/fp16 and every inference call pay for the weight).
    """
    per_byte = 8 // bits
    by_row = packed[: rows.numel() // per_byte].view(rows.shape[0], -1)  # (out, K / lanes)
    lanes = rows.view(rows.shape[0], -1, per_byte)  # (out, K / lanes, lanes), low bits first
    mask = 2**bits - 1
    for lane in range(per_byte):
        values = by_row if per_byte == 1 else (by_row >> (lane * bits)) & mask
        torch.sub(values, zero, out=lanes[..., lane])


def fp16_row_factor(scale0: torch.Tensor | None) -> torch.Tensor | None:
    """(out,) float32 powers of two 2^round(log2 s0), clamped to [2^-14, 1].

    Why: the kernels compute u = (W_q - z)(s_in x) in integer units and apply s_out
    after, so u is about 1/s0 times the layer's output (10^2 to 10^3 at 8 bits) and
    passes fp16's 65,504 where the float layer does not. With the weight pre-scaled
    by this factor, u is the layer's output to within a factor of 2 (the float
    layer's own range); powers of two keep the integers exact, and 2^-14 is fp16's
    smallest normal number. s_out is divided by the factor in float32.
    """
    if scale0 is None:
        raise ValueError("fp16 kernels need the layer's scale0 (PackedWeight.scale0)")
    exponent = torch.round(torch.log2(scale0.float())).clamp_(min=-14.0, max=0.0)
    return torch.exp2(exponent)
