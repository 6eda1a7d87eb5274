"""Scaled quantized linear and conv2d with a memory-lean custom backward.

docs/design.md §2: diagonal scales move from the weight onto the activations,

    W = s_out[:, None] * (W_q - z) * s_in[None, :]
    y = s_out * ((W_q - z) @ (s_in * x)) + bias
    conv: y = s_out * conv(s_in * x, W_q - z) + bias

Two paths, chosen per call by `scaled_quant_linear` / `scaled_quant_conv2d`:

- Training (autograd records and something needs a gradient): the autograd Functions
  below. In float32/float64 the zero point is folded out of the weight so the
  integers are only ever cast, never rewritten:  (W_q - z) @ v = W_u @ v - z_u * sum(v)
  with W_u = W_q - qmin (unsigned, straight from the packed bytes) and z_u = z - qmin;
  for a conv the sum is a box filter over each group's kernel window (a conv with a
  cached all-ones kernel). In bf16/fp16 the two terms (each ~z_u * sum(v)) would be
  rounded to 8 or 11 bits before they cancel, which cost 8% relative error through a
  tiny UNet (tests/tuneqdm/test_bf16.py); there the weight is expanded as W_q - z
  instead, integers in [-255, 255], exact in both formats, and nothing cancels.
  Autograd keeps the layer input and the pre-scale output u; the float weight is
  re-expanded from the packed integers in backward and never saved. A layer whose
  centred weight is cached in the compute dtype (`tuneqdm.inference.
  cache_expanded_weights`: serving, or training a small model) reads the cache in
  forward and backward instead, nothing folded. Why fp32 folds rather than centres
  when nothing is cached: on the SD v1.5 UNet, centring made a training step 15-35 %
  slower (docs/benchmarks.md, "The zero-point fold, measured again").
- Inference (no gradient wanted): the centred weight W_q - z (from the layer's cache,
  `tuneqdm.inference.cache_expanded_weights`, or expanded in one pass), one matmul or
  conv, no box filter, nothing saved, the output scaled and biased in place.

In fp16 the centred weight is pre-scaled per output row by a power of two near s0
(packed.fp16_row_factor) so that u, otherwise in integer units (about 1/s0 times the
output), stays within fp16's range; s_out is divided by the same factor in float32.

Scales are per sample, (B, out) and (B, in), so one batch can mix timesteps (experts)
and subjects.

Speed on CPU (docs/benchmarks.md): the expanded weight is written into a buffer reused
by every call of the thread (packed._transient_buffer), since a fresh allocation of
it costs more in page faults than the conversion; the zero-point and scale
corrections are in-place fused multiply-adds (addcmul), so a layer runs few
element-wise passes over its activations.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packed import EXPANDED_WEIGHT, PackedWeight

__all__ = [
    "EXPANDED_WEIGHT",
    "ConvGeometry",
    "PackedWeight",
    "ScaledQuantConv2d",
    "ScaledQuantLinear",
    "scaled_quant_conv2d",
    "scaled_quant_linear",
]


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _expanded(weight: PackedWeight, dtype: torch.dtype):
    """The kernels' weight, (W, z_u or None, factor or None).

    The layer's cached centred weight when it holds `dtype` (PackedWeight.centred
    checks): (W, None, factor). Else, in float32/float64, (W_u, z_u, None), the caller
    subtracts z_u * sum; in bf16/fp16 the centred W_q - z (exact there, pre-scaled by
    the fp16 row factor): (W, None, factor). W is transient unless it is the cache:
    never write into it.
    """
    fold = dtype in (torch.float32, torch.float64)
    if fold and weight.cached is not None:
        fold = not weight.cached.serves(weight.packed, dtype)
    if fold:
        return weight.expand_transient(dtype), weight.zero_u.to(dtype), None
    w, factor = weight.centred(dtype)
    return w, None, factor


def _divided(scale_out: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """s_out / factor, (B, out) float32: the output scale that goes with a pre-scaled W."""
    return scale_out if factor is None else scale_out / factor


def _per_sample(scale: torch.Tensor, ndim: int, channel_dim: int, dtype: torch.dtype):
    """(B, C) scales viewed to broadcast over a (B, ...) activation with C at channel_dim."""
    shape = [scale.shape[0]] + [1] * (ndim - 1)
    shape[channel_dim] = scale.shape[1]
    return scale.to(dtype).view(shape)


def _scale_and_bias(u, scale, bias, view, in_place: bool = False) -> torch.Tensor:
    """u * scale + bias in one pass, written over u when `in_place` (no new
    activation-sized tensor); bias (C,) viewed as `view` to broadcast."""
    if bias is None:
        return u.mul_(scale) if in_place else u * scale
    out = u if in_place else None
    return torch.addcmul(bias.to(u.dtype).view(view), u, scale, out=out)


def _linear_u(xs: torch.Tensor, weight: PackedWeight):
    """(u, factor): u = ((W_q - z) @ xs) * factor, (B, ..., out); xs (B, ..., in)."""
    w, zero, factor = _expanded(weight, xs.dtype)
    u = F.linear(xs, w)
    if zero is not None:  # u -= z_u * sum(xs), in place
        u.addcmul_(xs.sum(dim=-1, keepdim=True), zero, value=-1)
    return u, factor


def _conv_u(xs: torch.Tensor, weight: PackedWeight, geo: ConvGeometry, use_cache: bool):
    """(u, factor): u = conv(xs, W_q - z) * factor, (B, Cout, H', W'); xs (B, Cin, H, W).
    `use_cache`: a cached weight may be read in oneDNN's layout (inference only)."""
    onednn = _onednn_weight(xs, weight, geo) if use_cache else None
    if onednn is not None:  # the cache, in oneDNN's layout: centred, nothing to fold
        args = (list(geo.padding), list(geo.stride), list(geo.dilation), geo.groups)
        # (small inputs only: at most a quarter of the weight, so making one contiguous,
        # as the UNet's 8 x 8 activations are not, costs little)
        xs = xs.contiguous()
        u = torch.ops.mkldnn._convolution_pointwise(xs, onednn, None, *args, "none", [], "")
        return u, None
    w, zero, factor = _expanded(weight, xs.dtype)  # (Cout, Cin / groups, kh, kw)
    u = F.conv2d(xs, w, None, geo.stride, geo.padding, geo.dilation, geo.groups)
    if zero is not None:
        box = F.conv2d(
            xs,
            _box_kernel(weight, geo, xs),
            None,
            geo.stride,
            geo.padding,
            geo.dilation,
            geo.groups,
        )  # (B, groups, H', W')
        # u -= z_u * box, in place; output channel o reads the box of its group
        groups, per_group = geo.groups, weight.shape[0] // geo.groups
        u_grouped = u.unflatten(1, (groups, per_group))  # (B, G, Cout / G, H', W')
        u_grouped.addcmul_(box.unsqueeze(2), zero.view(1, groups, per_group, 1, 1), value=-1)
    return u, factor


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast asks for on x's device, or None when autocast is off."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _onednn_weight(xs: torch.Tensor, weight: PackedWeight, geo: ConvGeometry):
    """The cached weight in oneDNN's conv layout (packed.ExpandedWeight.onednn_conv), or
    None: no cache, a stale one, not float32 on the CPU, or inside torch.compile."""
    cached = weight.cached
    if cached is None or xs.dtype != torch.float32:
        return None
    if torch.compiler.is_compiling():
        return None
    if cached.onednn is None and not cached.serves(weight.packed, xs.dtype):
        return None
    if weight.packed is not cached.source or weight.packed._version != cached.version:
        return None
    args = (list(geo.padding), list(geo.stride), list(geo.dilation), geo.groups)
    return cached.onednn_conv(xs, *args)


def _one_row_weight(x, scale_in, scale_out, weight: PackedWeight, in_view):
    """The float weight W_r of a batch whose samples all have the same scales (one
    subject at one timestep: classifier-free guidance's two halves), when the weight
    has at most half the input's elements, on the CPU; else None. Scaling the weight
    then costs less than scaling the activations twice, and the bias fuses into the
    matmul or conv, as in the float layer."""
    if x.device.type != "cpu" or 2 * math.prod(weight.shape) > x.numel():
        return None
    if torch.compiler.is_compiling() or not _same_rows(scale_out):
        return None
    if scale_in is not None and not _same_rows(scale_in):
        return None
    s_in = None if scale_in is None else scale_in[0].view(in_view)
    return weight.scaled(x.dtype, scale_out[0], s_in)


def _same_rows(scale: torch.Tensor) -> bool:
    """Whether every sample's row of a (B, C) scale is the same."""
    return scale.shape[0] == 1 or torch.equal(scale, scale[:1].expand_as(scale))


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd is recording and any of `tensors` requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def scaled_quant_linear(x, scale_in, scale_out, bias, weight: PackedWeight) -> torch.Tensor:
    """y = s_out * ((W_q - z) @ (s_in x)) + bias; shapes as `ScaledQuantLinear`.

    The autograd Function when a gradient is wanted; else the inference path: the
    same arithmetic without autograd's bookkeeping (nothing saved, the output scaled
    in place), with the layer's cached centred weight when it has one. Under autocast
    (bf16 training on CUDA) x is cast to autocast's dtype and the layer computes in it,
    scales still float32; the output is in that dtype.
    """
    amp = _autocast_dtype(x)
    if amp is not None:  # compute in autocast's dtype, centred: no bf16 cancellation
        with torch.autocast(x.device.type, enabled=False):
            return scaled_quant_linear(x.to(amp), scale_in, scale_out, bias, weight)
    if needs_autograd(x, scale_in, scale_out, bias):
        return ScaledQuantLinear.apply(x, scale_in, scale_out, bias, weight)
    w = _one_row_weight(x, scale_in, scale_out, weight, (1, -1))
    if w is not None:
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    xs = x if scale_in is None else x * _per_sample(scale_in, x.dim(), -1, x.dtype)
    u, factor = _linear_u(xs, weight)
    scale = _per_sample(_divided(scale_out, factor), u.dim(), -1, u.dtype)
    return _scale_and_bias(u, scale, bias, (-1,), in_place=True)


def scaled_quant_conv2d(
    x, scale_in, scale_out, bias, weight: PackedWeight, geo: ConvGeometry
) -> torch.Tensor:
    """y = s_out * conv(s_in x, W_q - z) + bias; shapes as `ScaledQuantConv2d`.

    Dispatches like `scaled_quant_linear`; with a cached weight no box filter runs.
    """
    amp = _autocast_dtype(x)
    if amp is not None:
        with torch.autocast(x.device.type, enabled=False):
            return scaled_quant_conv2d(x.to(amp), scale_in, scale_out, bias, weight, geo)
    if needs_autograd(x, scale_in, scale_out, bias):
        return ScaledQuantConv2d.apply(x, scale_in, scale_out, bias, weight, geo)
    if geo.groups == 1:
        w = _one_row_weight(x, scale_in, scale_out, weight, (1, -1, 1, 1))
        if w is not None:
            bias = None if bias is None else bias.to(x.dtype)
            return F.conv2d(x, w, bias, geo.stride, geo.padding, geo.dilation)
    xs = x if scale_in is None else x * _per_sample(scale_in, 4, 1, x.dtype)
    u, factor = _conv_u(xs, weight, geo, use_cache=True)
    scale = _per_sample(_divided(scale_out, factor), 4, 1, u.dtype)
    return _scale_and_bias(u, scale, bias, (1, -1, 1, 1), in_place=True)


class ScaledQuantLinear(torch.autograd.Function):
    """y = s_out * (W_u @ (s_in x) - z_u * sum(s_in x)) + bias, per-sample scales.

    x: (B, ..., in); scale_in: (B, in) or None (PEQA); scale_out: (B, out);
    bias: (out,) or None. Returns (B, ..., out).
    """

    @staticmethod
    def forward(ctx, x, scale_in, scale_out, bias, weight: PackedWeight):
        xs = x if scale_in is None else x * _per_sample(scale_in, x.dim(), -1, x.dtype)
        u, factor = _linear_u(xs, weight)  # (B, ..., out)
        del xs
        scale = _per_sample(_divided(scale_out, factor), u.dim(), -1, u.dtype)
        y = _scale_and_bias(u, scale, bias, (-1,))
        ctx.weight, ctx.factor = weight, factor
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, scale_in, scale_out, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, scale_in, scale_out, u = ctx.saved_tensors
        weight: PackedWeight = ctx.weight
        factor = ctx.factor
        sum_dims = tuple(range(1, grad_y.dim() - 1))  # token dims between B and channels
        grad_scale_out = _grad_scale_out(grad_y * u, sum_dims, factor, scale_out.dtype)
        grad_u = grad_y * _per_sample(_divided(scale_out, factor), grad_y.dim(), -1, grad_y.dtype)
        grad_scale_in = grad_x = None
        want_scale_in = scale_in is not None and ctx.needs_input_grad[1]
        if ctx.needs_input_grad[0] or want_scale_in:
            w, zero, _ = _expanded(weight, grad_u.dtype)
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
        u, factor = _conv_u(xs, weight, geo, use_cache=False)  # (B, Cout, H', W')
        del xs
        scale = _per_sample(_divided(scale_out, factor), 4, 1, u.dtype)
        y = _scale_and_bias(u, scale, bias, (1, -1, 1, 1))
        ctx.weight, ctx.geo, ctx.has_bias, ctx.factor = weight, geo, bias is not None, factor
        ctx.save_for_backward(x, scale_in, scale_out, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, scale_in, scale_out, u = ctx.saved_tensors
        weight: PackedWeight = ctx.weight
        geo: ConvGeometry = ctx.geo
        factor = ctx.factor
        grad_scale_out = _grad_scale_out(grad_y * u, (2, 3), factor, scale_out.dtype)
        grad_u = grad_y * _per_sample(_divided(scale_out, factor), 4, 1, grad_y.dtype)
        grad_scale_in = grad_x = None
        want_scale_in = scale_in is not None and ctx.needs_input_grad[1]
        if ctx.needs_input_grad[0] or want_scale_in:
            w, zero, _ = _expanded(weight, grad_u.dtype)
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


def _grad_scale_out(grad_y_u, dims, factor, dtype) -> torch.Tensor:
    """d loss / d s_out = sum over dims of grad_y * u, (B, out) in `dtype`. With a
    pre-scaled u (fp16) the sum runs in float32 and is divided by the factor."""
    if factor is None:
        return _reduce(grad_y_u, dims).to(dtype)
    summed = grad_y_u.sum(dim=dims, dtype=torch.float32) if dims else grad_y_u.float()
    return (summed / factor).to(dtype)


def _box_kernel(weight: PackedWeight, geo: ConvGeometry, like: torch.Tensor) -> torch.Tensor:
    """All-ones kernel (groups, Cin / groups, kh, kw): sums each group's window."""
    _, cin_per_group, kh, kw = weight.shape
    if torch.compiler.is_compiling():  # a constant in the graph; no Python-side cache
        return torch.ones(geo.groups, cin_per_group, kh, kw, dtype=like.dtype, device=like.device)
    return _ones(geo.groups, cin_per_group, kh, kw, like.dtype, like.device)


@functools.lru_cache(maxsize=256)
def _ones(groups, cin_per_group, kh, kw, dtype, device) -> torch.Tensor:
    """A cached all-ones kernel (a few KB each; the UNet has a few dozen shapes).
    A normal tensor even under inference_mode, so that backward may use it too."""
    with torch.inference_mode(False):
        return torch.ones(groups, cin_per_group, kh, kw, dtype=dtype, device=device)


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
