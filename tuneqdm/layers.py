"""Quantized nn.Linear / nn.Conv2d with trainable separable scales.

A layer holds frozen buffers (packed integers, zero point z, initial scale s0, the
float bias) and trainable fp32 parameters:

    scale_out (R, out)   initialised to s0           (PEQA and TuneQDM)
    scale_in  (R, in)    initialised to 1            (TuneQDM only; None for PEQA)

R is the number of scale rows: N experts when training, slots * N when serving
several subjects; the tables are owned by scaletable.py (allocation, initialisation,
slot writes, per-sample rows). Its effective weight for row r is
W_r = scale_out[r][:, None] * (W_q - z) * scale_in[r][None, :] (docs/design.md §1);
the forward never builds it (functional.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .functional import (
    EXPANDED_WEIGHT,
    ConvGeometry,
    PackedWeight,
    scaled_quant_conv2d,
    scaled_quant_linear,
)
from .quant import pack_int, packed_nbytes, quantize_weight, unpack_int
from .scaletable import ScaleRows


class QuantizedLayer(ScaleRows):
    """Shared state of quantized layers; subclasses define the kernel call.

    The scale tables and their per-sample rows come from ScaleRows (scaletable.py).
    """

    in_features: int
    out_features: int

    def __init__(
        self, weight_shape: tuple[int, ...], scale_in_size: int, has_bias: bool, config: QuantConfig
    ) -> None:
        super().__init__()
        self.bits = config.bits
        self.weight_shape = tuple(weight_shape)
        out = weight_shape[0]
        self.register_buffer(
            "packed",
            torch.zeros(packed_nbytes(math.prod(weight_shape), config.bits), dtype=torch.uint8),
        )
        self.register_buffer("zero", torch.zeros(out))
        self.register_buffer("scale0", torch.ones(out))
        self.register_buffer("bias", torch.zeros(out) if has_bias else None)
        scale_in = scale_in_size if config.train_scale_in else None
        self._init_scale_rows(config.num_experts, out, scale_in)
        self._qmin = config.qmin

    # -- construction ---------------------------------------------------------------

    def _load_quantized(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
        hessian: torch.Tensor | None = None,
    ) -> None:
        q, zero, scale0 = quantize_weight(weight, config, hessian)
        self.packed = pack_int(q, config.bits).to(weight.device)
        self.zero = zero.to(weight.device)
        self.scale0 = scale0.to(weight.device)
        if bias is not None:
            self.bias = bias.detach().to(torch.float32).clone()
        self.reset_scales()

    # -- views ------------------------------------------------------------------------

    def int_weight(self) -> torch.Tensor:
        """W_q as int8, shape `weight_shape`."""
        return unpack_int(self.packed, self.bits, self.weight_shape)

    def dequantized_weight(self, row: int = 0) -> torch.Tensor:
        """The effective float weight of scale row `row` (for tests and export)."""
        view = (-1,) + (1,) * (len(self.weight_shape) - 1)
        w = self.int_weight().float() - self.zero.view(view)
        w = w * self.scale_out[row].detach().view(view)
        if self.scale_in is not None:
            w = w * self.weight_in_scale(self.scale_in[row].detach())
        return w

    def weight_in_scale(self, scale_in: torch.Tensor) -> torch.Tensor:
        """An (in,) input-channel scale laid out over the weight: (1, in) for a linear,
        (Cout, Cin / groups, 1, 1) for a conv (each output's group sees its own inputs).
        """
        if len(self.weight_shape) == 2:
            return scale_in.view(1, -1)
        out, cin_per_group = self.weight_shape[:2]
        groups = self.in_features // cin_per_group
        per_group = scale_in.view(groups, 1, cin_per_group)  # (G, 1, Cin / G)
        return per_group.expand(groups, out // groups, cin_per_group).reshape(out, -1)[
            ..., None, None
        ]

    def _packed_weight(self) -> PackedWeight:
        return PackedWeight(
            self.packed,
            self.bits,
            self.weight_shape,
            self.zero,
            self._qmin,
            self.scale0,
            self.__dict__.get(EXPANDED_WEIGHT),
        )


class QuantLinear(QuantizedLayer):
    """Quantized nn.Linear. Input (B, ..., in) -> (B, ..., out)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, config: QuantConfig
    ) -> None:
        super().__init__((out_features, in_features), in_features, bias, config)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(
        cls, linear: nn.Linear, config: QuantConfig, hessian: torch.Tensor | None = None
    ) -> QuantLinear:
        """hessian: (in, in), for config.rounding="gptq" only (gptq.py)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config)
        layer._load_quantized(linear.weight, linear.bias, config, hessian)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return self.forward(x[None])[0]
        scale_in, scale_out = self._scales(x.shape[0], x.device)
        return scaled_quant_linear(x, scale_in, scale_out, self.bias, self._packed_weight())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


class QuantConv2d(QuantizedLayer):
    """Quantized nn.Conv2d (any kernel, stride, padding, dilation, groups, padding mode).

    Input (B, Cin, H, W) -> (B, Cout, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        groups: int,
        bias: bool,
        padding_mode: str,
        config: QuantConfig,
    ) -> None:
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(shape, in_channels, bias, config)
        self.in_features, self.out_features = in_channels, out_channels
        self.kernel_size, self.padding_mode = tuple(kernel_size), padding_mode
        self.pre_pad, conv_padding = _explicit_padding(padding, kernel_size, dilation, padding_mode)
        self.geometry = ConvGeometry(tuple(stride), conv_padding, tuple(dilation), groups)

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, config: QuantConfig, hessian: torch.Tensor | None = None
    ) -> QuantConv2d:
        """hessian: (K, K), K = in * kh * kw, for config.rounding="gptq" only (gptq.py)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            config,
        )
        layer._load_quantized(conv.weight, conv.bias, config, hessian)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self.forward(x[None])[0]
        if self.pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.pre_pad, mode=mode)
        scale_in, scale_out = self._scales(x.shape[0], x.device)
        return scaled_quant_conv2d(
            x, scale_in, scale_out, self.bias, self._packed_weight(), self.geometry
        )

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{self.in_features}, {self.out_features}, kernel={self.kernel_size}, "
            f"stride={g.stride}, padding={g.padding}, groups={g.groups}, bits={self.bits}"
        )


def _explicit_padding(padding, kernel_size, dilation, padding_mode):
    """(pre_pad for F.pad or None, symmetric conv padding) for any nn.Conv2d padding.

    Non-zero padding modes and asymmetric 'same' padding are applied with F.pad
    before the kernel, which then runs unpadded.
    """
    if padding == "valid":
        pads = [(0, 0), (0, 0)]
    elif padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in padding]
    symmetric = all(lo == hi for lo, hi in pads)
    if padding_mode == "zeros" and symmetric:
        return None, (pads[0][0], pads[1][0])
    (top, bottom), (left, right) = pads
    return (left, right, top, bottom), (0, 0)
