"""Pure quantization primitives: per-output-channel grid, rounding, bit packing.

The grid is docs/design.md §1 (TuneQDM arXiv 2401.04339, eq. 1; PEQA):

    qmin = -2^(b-1), qmax = 2^(b-1) - 1
    s0   = (max_row - min_row) / (qmax - qmin)      clamped below at 1e-8
    z    = qmin - round(min_row / s0)              a float
    W_q  = clamp(round(W / s0 + z), qmin, qmax)

Symmetric: s0 = max|row| / qmax, z = 0. Rows are output channels: a weight of shape
(out, ...) is viewed as (out, in * k * k). Nothing here knows about modules.

Packing: integers are stored unsigned (q - qmin, in [0, 2^b)) in a flat uint8 stream.
8 bits: one per byte; 4 bits: two per byte; 2 bits: four per byte; 3 bits: eight
values in three bytes (a true 3-bit stream, 0.375 bytes per weight).
"""

from __future__ import annotations

import math

import torch

from .config import QuantConfig
from .gptq import gptq_round

SCALE_FLOOR = 1e-8


def quantize_weight(
    weight: torch.Tensor, config: QuantConfig, hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight per output channel.

    Args:
        weight: (out, ...) float tensor.
        config: bits, grid and rounding.
        hessian: the layer's input Hessian (K, K), K = weight[0].numel(); required by
            and only used for config.rounding="gptq" (gptq.py).

    Returns:
        (q, zero, scale): q int8 (same shape as weight, values in [qmin, qmax]),
        zero (out,) float32, scale s0 (out,) float32.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)  # (out, K)
    if (config.rounding == "gptq") != (hessian is not None):
        raise ValueError(f"quantize_weight: a hessian goes with rounding='gptq' and only "
                         f"with it (rounding={config.rounding!r}, hessian "
                         f"{'given' if hessian is not None else 'missing'})")
    if config.rounding == "mse":
        scale, zero = _mse_search(rows, config)
    else:
        scale, zero = _grid(rows.amin(dim=1), rows.amax(dim=1), config)
    if hessian is not None:
        q = gptq_round(rows, scale, zero, hessian, config.qmin, config.qmax)
    else:
        q = _round_to_grid(rows, scale, zero, config)
    return q.reshape(weight.shape), zero, scale


def dequantize_weight(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W = s0 * (q - z) per output channel. q: (out, ...) int; zero, scale: (out,)."""
    view = (-1,) + (1,) * (q.dim() - 1)
    return scale.view(view) * (q.to(scale.dtype) - zero.view(view))


def _grid(
    row_min: torch.Tensor, row_max: torch.Tensor, config: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both (out,) float32) for per-row ranges."""
    if config.symmetric:
        absmax = torch.maximum(row_min.abs(), row_max.abs())
        scale = (absmax / config.qmax).clamp_min(SCALE_FLOOR)
        return scale, torch.zeros_like(scale)
    scale = ((row_max - row_min) / (config.qmax - config.qmin)).clamp_min(SCALE_FLOOR)
    zero = config.qmin - torch.round(row_min / scale)
    return scale, zero


def _round_to_grid(
    rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantConfig
) -> torch.Tensor:
    """clamp(round(W / s0 + z), qmin, qmax) as int8. rows: (out, K)."""
    q = torch.round(rows / scale[:, None] + zero[:, None])
    return q.clamp_(config.qmin, config.qmax).to(torch.int8)


def _mse_search(rows: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping ratio that minimises ||W - dequant(quant(W))||^2.

    Tries ratios r in [mse_min_ratio, 1] on the range [r * min, r * max] and keeps,
    per row, the grid with the smallest squared error. rows: (out, K) float32.
    """
    row_min, row_max = rows.amin(dim=1), rows.amax(dim=1)
    best_err = torch.full_like(row_min, float("inf"))
    best_scale, best_zero = _grid(row_min, row_max, config)
    for ratio in torch.linspace(config.mse_min_ratio, 1.0, config.mse_grid).tolist():
        scale, zero = _grid(row_min * ratio, row_max * ratio, config)
        q = _round_to_grid(rows, scale, zero, config)
        err = (dequantize_weight(q, zero, scale) - rows).pow_(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||W||^2 / ||W - W_hat||^2)."""
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).sum()
    return float(10.0 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))


# ----------------------------------------------------------------------------- packing


def _group(bits: int) -> tuple[int, int]:
    """(values, bytes) per packing group: the smallest whole-byte run of b-bit values."""
    total = bits * 8 // math.gcd(bits, 8)  # lcm(bits, 8)
    return total // bits, total // 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack_int` uses for `numel` b-bit values."""
    values, nbytes = _group(bits)
    return -(-numel // values) * nbytes


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed b-bit integers into a flat uint8 stream.

    Args:
        q: int8 tensor of any shape, values in [-2^(b-1), 2^(b-1) - 1].
    Returns:
        (packed_nbytes(q.numel(), bits),) uint8.
    """
    offset = 2 ** (bits - 1)
    if bits in (8, 4, 2):  # whole values per byte: byte-wise shifts and ors
        unsigned = (q.reshape(-1).to(torch.int16) + offset).to(torch.uint8)  # (numel,)
        per_byte = 8 // bits
        pad = (-unsigned.numel()) % per_byte
        if pad:
            unsigned = torch.cat([unsigned, unsigned.new_zeros(pad)])
        lanes = unsigned.view(-1, per_byte)  # (nbytes, per_byte), value i at bits i * b
        packed = lanes[:, 0].clone()
        for i in range(1, per_byte):
            packed |= lanes[:, i] << (i * bits)
        return packed
    flat = (q.reshape(-1).to(torch.int16) + offset).to(torch.int32)  # unsigned values
    values, nbytes = _group(bits)
    pad = (-flat.numel()) % values
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, values)  # (G, values)
    shifts = torch.arange(values, dtype=torch.int32, device=q.device) * bits
    word = (groups << shifts).sum(dim=1, dtype=torch.int64)  # (G,) <= 24 bits used
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=q.device) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_unsigned(
    packed: torch.Tensor,
    bits: int,
    numel: int,
    dtype: torch.dtype = torch.uint8,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `pack_int` without the offset: flat (numel,) values q - qmin in `dtype`.

    The fast paths (8, 4, 2 bits) are a few byte-wise ops, cheap enough to run in
    every forward and backward instead of keeping unpacked integers around.

    Args:
        out: optional flat (numel,) tensor of `dtype` to write into (the kernels pass
            a reused buffer: on CPU a fresh allocation costs more page faults than the
            conversion itself). Returned when given.
    """
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    elif out.shape != (numel,) or out.dtype != dtype:
        raise ValueError(f"out must be ({numel},) {dtype}, got {tuple(out.shape)} {out.dtype}")
    if bits == 8:
        return out.copy_(packed[:numel])
    if bits == 4 and numel % 2 == 0:  # low nibble first: two strided lane copies
        lanes = out.view(-1, 2)  # (nbytes, 2)
        lanes[:, 0].copy_(packed & 0x0F)
        lanes[:, 1].copy_(packed >> 4)
        return out
    if bits in (4, 2):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        values = (packed[:, None] >> shifts) & (2**bits - 1)  # (nbytes, 8 / bits)
        return out.copy_(values.reshape(-1)[:numel])
    values, nbytes = _group(bits)
    groups = packed.view(-1, nbytes).to(torch.int32)
    word = (groups << (torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8)).sum(
        dim=1
    )
    shifts = torch.arange(values, dtype=torch.int32, device=packed.device) * bits
    unpacked = (word[:, None] >> shifts) & (2**bits - 1)
    return out.copy_(unpacked.reshape(-1)[:numel])


def unpack_int(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_int`: signed int8 of `shape`."""
    numel = math.prod(shape)
    unsigned = unpack_unsigned(packed, bits, numel, torch.int16)
    return (unsigned - 2 ** (bits - 1)).to(torch.int8).reshape(shape)
