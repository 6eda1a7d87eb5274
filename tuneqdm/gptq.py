"""GPTQ rounding: data-aware integers on the same per-channel grid (docs/design.md §1).

Round-to-nearest picks each integer alone. GPTQ (Frantar et al., ICLR 2023) rounds a
layer's input columns one at a time and moves each column's rounding error onto the
columns not yet rounded, weighted by how the layer's inputs correlate, so that the
layer's OUTPUT error on calibration inputs X is small rather than its weight error:

    H = X X^T / n + damp * mean(diag) * I             (K, K), K = in (* kh * kw)
    U = chol(H^-1) upper
    for column i:  q_i = clamp(round(w_i / s0 + z), qmin, qmax)
                   e_i = (w_i - s0 (q_i - z)) / U[i, i]
                   w_j -= e_i U[i, j]   for j > i

The grid (s0, z per output channel) is round-to-nearest's, so a GPTQ base has the
same format and the same trainable separable scales as any other: only the frozen
integers differ. With H diagonal no error moves and GPTQ is round-to-nearest.

`collect_hessians` gathers H for every Linear / Conv2d of a float model from forward
passes on calibration inputs; `quantize_(model, config, hessians=...)` with
`QuantConfig(rounding="gptq")` then uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DAMP = 0.01


def layer_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of its weight's columns: (n, K).

    Linear: x (..., in) -> (n, in). Conv2d: x (B, C, H, W) -> its im2col patches
    (B * L, C * kh * kw), in the order of weight.reshape(out, -1).
    """
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError(f"GPTQ handles Conv2d with groups=1 and zero padding; got "
                             f"groups={layer.groups}, padding_mode={layer.padding_mode!r}")
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    run_batches: Callable[[nn.Module], None],
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """H = X X^T / n, (K, K) float64, for every Linear / Conv2d of `model` (that
    `filter_fn(layer, name)` accepts), over the inputs the layer sees while
    `run_batches(model)` runs the model's forward on calibration data.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and (filter_fn is None or filter_fn(m, n))}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def accumulate(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = layer_columns(layer, inputs[0].detach()).to(torch.float64)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] += x.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        run_batches(model)
    finally:
        for handle in handles:
            handle.remove()
    unused = sorted(n for n, c in counts.items() if c == 0)
    if unused:
        raise ValueError(f"collect_hessians: run_batches never ran layer(s) {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''}")
    return {n: sums[n] / counts[n] for n in layers}


def gptq_round(
    rows: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    hessian: torch.Tensor,
    qmin: int,
    qmax: int,
    damp: float = DEFAULT_DAMP,
) -> torch.Tensor:
    """Integers (out, K) int8 for weight rows (out, K) on the grid scale, zero (out,),
    given the layer's input Hessian (K, K) (see the module docstring)."""
    if hessian.shape != (rows.shape[1], rows.shape[1]):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match the weight's "
                         f"{rows.shape[1]} input columns")
    w = rows.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: any integer will do
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    q = torch.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = torch.clamp(torch.round(w[:, i] / s + z), qmin, qmax)
        error = (w[:, i] - s * (q[:, i] - z)) / upper[i, i]
        w[:, i:] -= error[:, None] * upper[i, i:][None, :]
    return q.to(torch.int8)
