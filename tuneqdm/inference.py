"""Keep a quantized model's centred integer weights expanded (serving, or fast training).

The scales act on activations (docs/design.md §2), so a layer's centred integer weight
W_q - z is the same for every subject and every expert. A serving replica that does
not train may therefore expand it once, in the compute dtype, instead of once per
forward: the quantized layer then costs one matmul or conv like the float layer, plus
the two per-sample scalings. The price is memory: the dtype's bytes per weight
(bf16: 2, holding the integers in [-255, 255] exactly; fp32: 4, as much as the float
model), on top of the packed integers, which stay. docs/benchmarks.md measures both.

Nothing here changes numbers beyond float rounding: the cache holds exactly the
integers the kernels would expand per call (fp32 without a cache folds the zero point
out, which rounds differently; tests/tuneqdm/test_inference.py). Training reads the
cache too, when one is there: a small model, or a device with memory to spare, trades
the weight's bytes for two expansions per layer and step (the toy world's table
does: 6.3 MiB for a quarter of its scale methods' training time, docs/benchmarks.md).
A cache made before the weights change (a new base loaded in place) is detected and
not used.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import quantized_layers
from .packed import EXPANDED_WEIGHT, ExpandedWeight

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@torch.no_grad()
def cache_expanded_weights(module: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Keep every quantized layer's centred weight expanded in `dtype`; returns the
    bytes the caches hold.

    Call it after moving the model to its device; it replaces earlier caches. `dtype`
    is the compute dtype of the forward (the dtype of the activations): a forward in
    another dtype or on another device does not use the cache (it expands per call).
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype} is not a float dtype; allowed: {FLOAT_DTYPES}")
    layers = quantized_layers(module)
    if not layers:
        raise ValueError("module has no quantized layers (tuneqdm.quantize_)")
    total = 0
    for layer in layers.values():
        layer.__dict__.pop(EXPANDED_WEIGHT, None)
        weight, _ = layer._packed_weight().centred(dtype)
        weight = weight.clone()  # the transient buffer is shared: copy it out
        cache = ExpandedWeight(weight, layer.packed, layer.packed._version)
        layer.__dict__[EXPANDED_WEIGHT] = cache
        total += weight.numel() * weight.element_size()
    return total


def clear_expanded_weights(module: nn.Module) -> int:
    """Drop every quantized layer's cached weight; returns the bytes released."""
    total = 0
    for layer in quantized_layers(module).values():
        cached = layer.__dict__.pop(EXPANDED_WEIGHT, None)
        if cached is not None:
            total += cached.nbytes()
    return total


def expanded_weight_bytes(module: nn.Module) -> int:
    """Bytes held by the quantized layers' cached weights (0 when none are cached)."""
    total = 0
    for layer in quantized_layers(module).values():
        cached = layer.__dict__.get(EXPANDED_WEIGHT)
        if cached is not None:
            total += cached.nbytes()
    return total
