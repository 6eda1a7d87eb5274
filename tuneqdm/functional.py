"""Scaled quantized linear and conv2d with a memory-lean custom backward.

DESIGN section 2: diagonal scales move from the weight onto the activations,

    W = s_out[:, None] * (W_q - z) * s_in[None, :]
    y = s_out * ((W_q - z) @ (s_in * x)) + bias
    conv: y = s_out * conv(s_in * x, W_q - z) + bias

and the zero point is folded out of the weight so the integers are only ever cast,
never rewritten:  (W_q - z) @ v = W_u @ v - z_u * sum(v)  with W_u = W_q - qmin
(unsigned, straight from the packed bytes) and z_u = z - qmin. For a conv the sum is a
box filter over each group's kernel window (a conv with an all-ones kernel).
Folding is for float32/float64 only: in bf16/fp16 the two terms (each ~z_u * sum(v))
are rounded to 8 or 11 bits before they cancel, which cost 8% relative error through a
tiny UNet (tests/tuneqdm/test_bf16.py). There the weight is expanded as W_q - z instead,
integers in [-255, 255], exact in both formats, and nothing cancels.

Scales are per sample, (B, out) and (B, in), so one batch can mix timesteps (experts)
and subjects. Autograd keeps the layer input and the pre-scale output u; the float
weight is re-expanded from the packed integers in backward and never saved.

Speed on CPU (benchmarks/train_memory.py, docs/benchmarks.md): the expanded weight is
written into a buffer reused by every call of the thread (`_transient_buffer`), since a
fresh allocation of it costs more in page faults than the conversion; and the
zero-point and scale corrections are in-place fused multiply-adds (addcmul), so a
layer runs few element-wise passes over its activations.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import unpack_unsigned

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


@dataclass
class PackedWeight:
    """A frozen packed integer weight, as the kernels read it.

    packed: flat uint8 stream (see quant.pack_int); shape: the weight's shape,
    (out, in) or (out, in / groups, kh, kw); zero_u: (out,) float, z - qmin.
    """

    packed: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    zero_u: torch.Tensor

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


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _expanded(weight: PackedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, z_u) for float32/float64: W = W_u, the caller subtracts z_u * sum; else
    (W_q - z, None): centred integers, exact in bf16/fp16. W is transient (see
    `PackedWeight.expand_transient`)."""
    w_u = weight.expand_transient(dtype)
    zero = weight.zero_u.to(dtype)
    if dtype in (torch.float32, torch.float64):
        return w_u, zero
    w_u.view(w_u.shape[0], -1).sub_(zero[:, None])
    return w_u, None


def _per_sample(scale: torch.Tensor, ndim: int, channel_dim: int, dtype: torch.dtype):
    """(B, C) scales viewed to broadcast over a (B, ...) activation with C at channel_dim."""
    shape = [scale.shape[0]] + [1] * (ndim - 1)
    shape[channel_dim] = scale.shape[1]
    return scale.to(dtype).view(shape)


def _scale_and_bias(u: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, view):
    """u * scale + bias in one pass; bias (C,) viewed as `view` to broadcast."""
    if bias is None:
        return u * scale
    return torch.addcmul(bias.to(u.dtype).view(view), u, scale)


class ScaledQuantLinear(torch.autograd.Function):
    """y = s_out * (W_u @ (s_in x) - z_u * sum(s_in x)) + bias, per-sample scales.

    x: (B, ..., in); scale_in: (B, in) or None (PEQA); scale_out: (B, out);
    bias: (out,) or None. Returns (B, ..., out).
    """

    @staticmethod
    def forward(ctx, x, scale_in, scale_out, bias, weight: PackedWeight):
        xs = x if scale_in is None else x * _per_sample(scale_in, x.dim(), -1, x.dtype)
        w, zero = _expanded(weight, x.dtype)
        u = F.linear(xs, w)  # (B, ..., out)
        del w
        if zero is not None:  # u -= z_u * sum(xs), in place
            u.addcmul_(xs.sum(dim=-1, keepdim=True), zero, value=-1)
        del xs
        y = _scale_and_bias(u, _per_sample(scale_out, u.dim(), -1, u.dtype), bias, (-1,))
        ctx.weight = weight
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, scale_in, scale_out, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, scale_in, scale_out, u = ctx.saved_tensors
        weight: PackedWeight = ctx.weight
        sum_dims = tuple(range(1, grad_y.dim() - 1))  # token dims between B and channels
        grad_scale_out = _reduce(grad_y * u, sum_dims).to(scale_out.dtype)  # (B, out)
        grad_u = grad_y * _per_sample(scale_out, grad_y.dim(), -1, grad_y.dtype)
        grad_scale_in = grad_x = None
        want_scale_in = scale_in is not None and ctx.needs_input_grad[1]
        if ctx.needs_input_grad[0] or want_scale_in:
            w, zero = _expanded(weight, grad_u.dtype)
            grad_xs = torch.matmul(grad_u, w)  # (B, ..., in)
            del w
            if zero is not None:
                grad_xs -= (grad_u @ zero).unsqueeze(-1)
            if want_scale_in:
                grad_scale_in = _reduce(grad_xs * x, sum_dims).to(scale_in.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = grad_xs
                if scale_in is not None:
                    grad_x = grad_xs.mul_(_per_sample(scale_in, x.dim(), -1, grad_xs.dtype))
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_scale_in, grad_scale_out, grad_bias, None


class ScaledQuantConv2d(torch.autograd.Function):
    """y = s_out * (conv(s_in x, W_u) - z_u * box(s_in x)) + bias, per-sample scales.

    x: (B, Cin, H, W) already padded if the layer's padding is not plain zeros;
    scale_in: (B, Cin) or None; scale_out: (B, Cout); bias: (Cout,) or None.
    Returns (B, Cout, H', W').
    """

    @staticmethod
    def forward(ctx, x, scale_in, scale_out, bias, weight: PackedWeight, geo: ConvGeometry):
        xs = x if scale_in is None else x * _per_sample(scale_in, 4, 1, x.dtype)
        w, zero = _expanded(weight, x.dtype)  # (Cout, Cin / groups, kh, kw)
        u = F.conv2d(xs, w, None, geo.stride, geo.padding, geo.dilation, geo.groups)
        del w
        if zero is not None:
            box = F.conv2d(xs, _box_kernel(weight, geo, x), None, geo.stride, geo.padding,
                           geo.dilation, geo.groups)  # (B, groups, H', W')
            # u -= z_u * box, in place; output channel o reads the box of its group
            groups, per_group = geo.groups, weight.shape[0] // geo.groups
            u_grouped = u.unflatten(1, (groups, per_group))  # (B, G, Cout / G, H', W')
            u_grouped.addcmul_(box.unsqueeze(2), zero.view(1, groups, per_group, 1, 1), value=-1)
            del box
        del xs
        y = _scale_and_bias(u, _per_sample(scale_out, 4, 1, u.dtype), bias, (1, -1, 1, 1))
        ctx.weight, ctx.geo, ctx.has_bias = weight, geo, bias is not None
        ctx.save_for_backward(x, scale_in, scale_out, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, scale_in, scale_out, u = ctx.saved_tensors
        weight: PackedWeight = ctx.weight
        geo: ConvGeometry = ctx.geo
        grad_scale_out = (grad_y * u).sum(dim=(2, 3)).to(scale_out.dtype)  # (B, Cout)
        grad_u = grad_y * _per_sample(scale_out, 4, 1, grad_y.dtype)
        grad_scale_in = grad_x = None
        want_scale_in = scale_in is not None and ctx.needs_input_grad[1]
        if ctx.needs_input_grad[0] or want_scale_in:
            w, zero = _expanded(weight, grad_u.dtype)
            grad_xs = _conv_input_grad(x, w, grad_u, geo)
            del w
            if zero is not None:
                # the box term: grad_box[b, g] = sum over g's outputs o of z_u[o] grad_u[b, o],
                # a grouped 1x1 conv with the zero points as its kernel
                grad_box = F.conv2d(grad_u, zero.view(geo.groups, -1, 1, 1), groups=geo.groups)
                grad_xs -= _conv_input_grad(x, _box_kernel(weight, geo, x), grad_box, geo)
            if want_scale_in:
                grad_scale_in = (grad_xs * x).sum(dim=(2, 3)).to(scale_in.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = grad_xs
                if scale_in is not None:
                    grad_x = grad_xs.mul_(_per_sample(scale_in, 4, 1, grad_xs.dtype))
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(dim=(0, 2, 3))
        return grad_x, grad_scale_in, grad_scale_out, grad_bias, None, None


def _reduce(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return t.sum(dim=dims) if dims else t


def _box_kernel(weight: PackedWeight, geo: ConvGeometry, like: torch.Tensor) -> torch.Tensor:
    """All-ones kernel (groups, Cin / groups, kh, kw): sums each group's window."""
    _, cin_per_group, kh, kw = weight.shape
    return torch.ones(geo.groups, cin_per_group, kh, kw, dtype=like.dtype, device=like.device)


def _conv_input_grad(x, kernel, grad_out, geo: ConvGeometry) -> torch.Tensor:
    """d conv(x, kernel) / d x applied to grad_out; (B, Cin, H, W)."""
    grad_input, _, _ = torch.ops.aten.convolution_backward(
        grad_out,
        x,
        kernel,
        None,
        list(geo.stride),
        list(geo.padding),
        list(geo.dilation),
        False,
        [0, 0],
        geo.groups,
        [True, False, False],
    )
    return grad_input
