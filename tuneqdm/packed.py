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
_DECIDING = threading.Lock()  # ExpandedWeight.onednn_conv's one-time decision


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


@dataclass
class ExpandedWeight:
    """A layer's centred weight kept expanded: `weight` = (W_q - z) * fp16 row factor,
    made from the packed stream `source` when its in-place version was `version`.

    A float32 CPU conv whose weight outweighs its input (the UNet's low-resolution,
    1280-channel convs) keeps it in oneDNN's blocked layout instead (`onednn_conv`),
    decided at its first call: the dense conv reorders the weight on every call, which
    costs as much as the conv itself at 8 x 8. Not copied or pickled (a copy expands
    per call until it is cached again).
    """

    weight: torch.Tensor | None
    source: torch.Tensor
    version: int
    onednn: torch.Tensor | bool | None = None  # None: not decided; False: stays dense

    def serves(self, packed: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether its dense weight is this stream's, unchanged since, in `dtype` on
        its device."""
        weight = self.weight
        return (
            weight is not None
            and packed is self.source
            # (inside torch.compile the identity is what its guards check)
            and (torch.compiler.is_compiling() or packed._version == self.version)
            and weight.dtype == dtype
            and weight.device == packed.device
        )

    def onednn_conv(
        self, x: torch.Tensor, padding, stride, dilation, groups
    ) -> torch.Tensor | None:
        """The weight in oneDNN's layout for conv inputs like x (B, Cin, H, W), or None
        when this layer stays dense. Decided at the first call; then the dense copy is
        dropped (same bytes)."""
        if self.onednn is None:
            with _DECIDING:  # once per layer; a second thread waits, then reads it
                if self.onednn is None:
                    args = (padding, stride, dilation, groups)
                    self.onednn = _onednn_conv_weight(self.weight, x, *args)
                    if self.onednn is not False:
                        self.weight = None
        return None if self.onednn is False else self.onednn

    def nbytes(self) -> int:
        tensor = self.weight if self.weight is not None else self.onednn
        return tensor.numel() * tensor.element_size()

    def __reduce__(self):
        return _no_cache, ()


def _no_cache() -> None:
    return None


def _onednn_conv_weight(weight, x, padding, stride, dilation, groups) -> torch.Tensor | bool:
    """`weight` (Cout, Cin / groups, kh, kw) reordered for oneDNN convs of inputs like x,
    or False where that does not pay (or this torch has no oneDNN): a float32 CPU conv
    whose weight has at least 4x the elements of its input."""
    usable = (
        weight is not None
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.numel() >= 4 * x.numel()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )
    if not usable:
        return False
    try:
        with torch.inference_mode(False):  # a normal tensor, usable in any later mode
            return torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), padding, stride, dilation, groups, list(x.shape)
            )
    except (RuntimeError, NotImplementedError):
        return False


@dataclass
class PackedWeight:
    """A frozen packed integer weight, as the kernels read it.

    packed: flat uint8 stream (see quant.pack_int); shape: the weight's shape,
    (out, in) or (out, in / groups, kh, kw); zero: (out,) float zero points z; qmin:
    the grid's smallest integer; scale0: (out,) float32 initial scales (sets the fp16
    row factor, `fp16_row_factor`); cached: the layer's `ExpandedWeight`
    (tuneqdm.inference.cache_expanded_weights) or None.
    """

    packed: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    zero: torch.Tensor
    qmin: int
    scale0: torch.Tensor | None = None
    cached: ExpandedWeight | None = None

    @property
    def zero_u(self) -> torch.Tensor:
        """(out,) z - qmin: the zero point in the unsigned integers' units (computed only
        when a weight is expanded: a cached weight needs none)."""
        return self.zero - self.qmin

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

    def scaled(
        self, dtype: torch.dtype, scale_out: torch.Tensor, scale_in: torch.Tensor | None
    ) -> torch.Tensor:
        """One row's float weight W_r = s_out[:, None] * (W_q - z) * s_in, shape
        `self.shape`, `dtype` (transient on CPU, like `centred`).

        scale_out: (out,) float32; scale_in: None or broadcastable to `self.shape`
        ((1, in) for a linear, (1, Cin, 1, 1) for an ungrouped conv).
        """
        w, factor = self.centred(dtype)
        scale = scale_out if factor is None else scale_out / factor
        scale = scale.to(dtype).view((-1,) + (1,) * (len(self.shape) - 1))
        if self.cached is not None and w is self.cached.weight:  # never write the cache
            out = None
            if w.device.type == "cpu" and not torch.compiler.is_compiling():
                out = _transient_buffer(w.numel(), dtype).view(self.shape)
            w = torch.mul(w, scale, out=out)
        else:
            w.mul_(scale)
        return w if scale_in is None else w.mul_(scale_in.to(dtype))


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
