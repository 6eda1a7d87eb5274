"""Import a checkpoint written by the TuneQDM authors' released implementation.

Its layout (a `torch.save` dict, read here with `torch.load(weights_only=True)`):

    {"delta_state": {
        "<module>.weight_int":        int8, the weight's shape
        "<module>.zero_point":        broadcastable per output channel, e.g. (out, 1)
        "<module>.delta_out_experts": (N, out, 1) linear, (N, out, 1, 1, 1) conv
        "<module>.delta_in_experts":  (N, 1, in) linear, (N, 1, in, 1, 1) conv
        "<module>.bias":              optional, (out,)
     },
     "config": {"n_bits", "symmetric", "num_experts", "total_denoising_steps",
                "train_delta_in", "train_bias"}}

with module names being the UNet's own and forward W = (weight_int - zero_point) *
delta_out[i] * delta_in[i]. It holds only the quantized layers, so the float pipeline
it was made from supplies everything else (norms, text encoder, VAE). The result is
one quantized base and one scale set in this library's formats.

s0 is not stored in that format. It is recomputed from the float weights with the
same min/max grid and kept when it reproduces the checkpoint's integers exactly;
otherwise the mean of delta_out over experts stands in (recorded in quant.json as
"scale0_source"). s0 only initialises new fine-tunes.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from .base import load_float_pipeline, save_quantized_pipeline
from .config import QuantConfig
from .model import build_quantized_skeleton, quantized_layers, reset_scales
from .quant import pack_int, quantize_weight
from .scaleset import ScaleSet

REQUIRED_CONFIG = ("n_bits", "symmetric", "num_experts", "total_denoising_steps")
_FIELDS = ("weight_int", "zero_point", "delta_out_experts", "delta_in_experts")


class ReferenceCheckpointError(ValueError):
    """The file is not a readable checkpoint of the released implementation."""


def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True, then a check of the layout."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ReferenceCheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({str(err)[:200]}); "
            "files holding code or arbitrary objects are refused"
        ) from None
    if not isinstance(checkpoint, dict) or not {"delta_state", "config"} <= set(checkpoint):
        raise ReferenceCheckpointError(f"{path}: expected a dict with 'delta_state' and 'config'")
    missing = [k for k in REQUIRED_CONFIG if k not in checkpoint["config"]]
    if missing:
        raise ReferenceCheckpointError(f"{path}: config lacks {missing}")
    return checkpoint


def import_reference_checkpoint(
    checkpoint_path: str | Path,
    float_pipeline: str | Path,
    output_dir: str | Path,
    subjects: list[dict[str, str]] | None = None,
) -> tuple[dict[str, Any], ScaleSet]:
    """Convert the released format into a quantized base (written to `output_dir`)
    and a scale set (returned; save it where you like).

    float_pipeline: the diffusers pipeline (hub id or path) the checkpoint was made from.
    """
    checkpoint = read_reference_checkpoint(checkpoint_path)
    state, cfg = checkpoint["delta_state"], checkpoint["config"]
    config = QuantConfig(
        bits=int(cfg["n_bits"]),
        symmetric=bool(cfg["symmetric"]),
        method="tuneqdm",
        num_experts=int(cfg["num_experts"]),
        num_train_timesteps=int(cfg["total_denoising_steps"]),
    )
    names = sorted(k[: -len(".weight_int")] for k in state if k.endswith(".weight_int"))
    if not names:
        raise ReferenceCheckpointError(f"{checkpoint_path}: no '<module>.weight_int' tensors")
    pipe = load_float_pipeline(float_pipeline)
    unet = pipe.unet
    floats = {name: unet.get_submodule(name) for name in _checked_names(unet, names, state)}
    build_quantized_skeleton(unet, config, names)
    reset_scales(unet)
    sources = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quantized_layers(unet).items():
        sources[name] = _fill_layer(layer, floats[name], state, name, config)
        n, out, inp = config.num_experts, layer.out_features, layer.in_features
        tensors[f"{name}.scale_out"] = _reshape(state, name, "delta_out_experts", (n, out))
        tensors[f"{name}.scale_in"] = _reshape(state, name, "delta_in_experts", (n, inp))
    reset_scales(unet)
    info = save_quantized_pipeline(pipe, output_dir, source=f"{float_pipeline} + {checkpoint_path}")
    counts = {s: list(sources.values()).count(s) for s in set(sources.values())}
    info["scale0_source"] = counts
    (Path(output_dir) / "quant.json").write_text(json.dumps(info, indent=2))
    scale_set = ScaleSet(
        tensors=tensors,
        method=config.method,
        num_experts=config.num_experts,
        num_train_timesteps=config.num_train_timesteps,
        base_fingerprint=info["fingerprint"],
        subjects=subjects or [],
        training={"imported_from": str(checkpoint_path), "reference_config": dict(cfg)},
    )
    scale_set.check_fits(unet)
    return info, scale_set


def _checked_names(unet, names: list[str], state: dict) -> list[str]:
    modules = dict(unet.named_modules())
    for name in names:
        if name not in modules:
            raise ReferenceCheckpointError(f"module {name!r} is not in the UNet")
        for field in _FIELDS:
            if f"{name}.{field}" not in state:
                raise ReferenceCheckpointError(f"{name}.{field} is missing")
        weight = modules[name].weight
        if tuple(state[f"{name}.weight_int"].shape) != tuple(weight.shape):
            raise ReferenceCheckpointError(
                f"{name}.weight_int has shape {tuple(state[f'{name}.weight_int'].shape)}, "
                f"the UNet's weight is {tuple(weight.shape)}"
            )
    return names


def _fill_layer(layer, float_layer, state: dict, name: str, config: QuantConfig) -> str:
    """Load integers, zero point, s0 and bias into an empty quantized layer."""
    q = state[f"{name}.weight_int"].to(torch.int16)
    zero = state[f"{name}.zero_point"].double().reshape(-1)
    if zero.numel() == 1:
        zero = zero.expand(q.shape[0])
    if q.min() >= 0 and q.max() > config.qmax:  # an unsigned grid [0, 2^b): shift it
        q, zero = q + config.qmin, zero + config.qmin
    if q.min() < config.qmin or q.max() > config.qmax:
        raise ReferenceCheckpointError(
            f"{name}.weight_int spans [{int(q.min())}, {int(q.max())}], outside "
            f"{config.bits}-bit [{config.qmin}, {config.qmax}]"
        )
    q = q.to(torch.int8)
    q_ref, zero_ref, scale_ref = quantize_weight(float_layer.weight, config)
    if torch.equal(q_ref, q) and torch.allclose(zero_ref.double(), zero):
        scale0, source = scale_ref, "recomputed"
    else:
        scale0 = _reshape(state, name, "delta_out_experts", (-1, q.shape[0])).mean(0)
        source = "delta_out_mean"
    layer.packed = pack_int(q, config.bits)
    layer.zero = zero.float()
    layer.scale0 = scale0.float()
    bias = state.get(f"{name}.bias", float_layer.bias)
    if bias is not None:
        layer.bias = bias.detach().float().reshape(-1).clone()
    return source


def _reshape(state: dict, name: str, field: str, shape: tuple[int, int]) -> torch.Tensor:
    tensor = state[f"{name}.{field}"].float()
    try:
        return tensor.reshape(shape).clone()
    except RuntimeError:
        raise ReferenceCheckpointError(
            f"{name}.{field} has shape {tuple(tensor.shape)}; expected {shape[1]} channels "
            f"per expert"
        ) from None
