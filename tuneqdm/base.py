"""The quantized base: quantize a diffusers pipeline's UNet once, save it, load it.

Layout of a quantized base folder (docs/design.md §4):

    model_index.json, tokenizer/, text_encoder/, vae/, scheduler/   float, diffusers layout
    unet/config.json                 the UNet's diffusers config
    unet/quantized.safetensors       packed integers, zero points, s0, float tensors
    quant.json                       source, revision, QuantConfig, quantized layer names,
                                     format version, fingerprint, tensor bytes

The fingerprint is a SHA-256 over the quantized UNet's frozen tensors (names, dtypes,
shapes, bytes); scale sets record it and refuse other bases. Trainable scales are not
part of the base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import load_file
from torch import nn

from .config import QuantConfig
from .model import (
    FilterFn,
    build_quantized_skeleton,
    quantize_,
    quantized_layers,
    reset_scales,
)
from .st_io import save_bytes

BASE_FORMAT_VERSION = 1
QUANT_JSON = "quant.json"
UNET_WEIGHTS = "unet/quantized.safetensors"
_SCALE_SUFFIXES = (".scale_out", ".scale_in")


class BaseModelError(ValueError):
    """A quantized base that cannot be read or does not match what was asked."""


def frozen_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The base's tensors: everything but the trainable scales, contiguous, on CPU."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in unet.state_dict().items()
        if not k.endswith(_SCALE_SUFFIXES)
    }


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 hex over sorted (name, dtype, shape, bytes) of `state`."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).reshape(-1).numpy().tobytes())
    return digest.hexdigest()


def load_float_pipeline(
    source: str | Path, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """`StableDiffusionPipeline.from_pretrained` on a hub id or local path, checked."""
    return _from_pretrained(source, revision, dtype)


def _from_pretrained(source, revision, dtype, **components):
    """from_pretrained without a safety checker; asserts the tokenizer really loaded."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(source),
        revision=revision,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        **components,
    )
    _check_tokenizer(pipe.tokenizer, source)
    return pipe


def quantize_pipeline(
    source: str | Path,
    output_dir: str | Path,
    config: QuantConfig,
    revision: str | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, Any]:
    """Quantize the UNet of the pipeline at `source` and write a quantized base.

    Returns the base info written to quant.json (with "fingerprint").
    """
    pipe = load_float_pipeline(source, revision)
    quantize_(pipe.unet, config, filter_fn)
    return save_quantized_pipeline(pipe, output_dir, source=str(source), revision=revision)


def save_quantized_pipeline(
    pipe, output_dir: str | Path, source: str = "", revision: str | None = None
) -> dict[str, Any]:
    """Write `pipe` (whose UNet is quantized) as a quantized base folder."""
    output_dir = Path(output_dir)
    unet = pipe.unet
    config: QuantConfig = unet.tuneqdm_config
    state = frozen_state_dict(unet)
    fingerprint = fingerprint_state(state)
    (output_dir / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_config(output_dir / "unet")
    weights = save_bytes(
        state, {"format_version": str(BASE_FORMAT_VERSION), "fingerprint": fingerprint}
    )
    (output_dir / UNET_WEIGHTS).write_bytes(weights)
    for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
        getattr(pipe, name).save_pretrained(output_dir / name)
    model_index = {k: v for k, v in dict(pipe.config).items() if not k.startswith("_")}
    model_index["_class_name"] = "StableDiffusionPipeline"
    model_index["_diffusers_version"] = diffusers.__version__
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        model_index[optional] = [None, None]
    model_index["unet"] = [None, None]  # the quantized UNet is loaded by this library
    (output_dir / "model_index.json").write_text(json.dumps(model_index, indent=2))
    info = {
        "format_version": BASE_FORMAT_VERSION,
        "source": source,
        "revision": revision,
        "quant_config": config.to_dict(),
        "layers": list(quantized_layers(unet)),
        "fingerprint": fingerprint,
        "unet_tensor_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }
    (output_dir / QUANT_JSON).write_text(json.dumps(info, indent=2))
    unet.tuneqdm_base_fingerprint = fingerprint
    return info


def read_base_info(path: str | Path) -> dict[str, Any]:
    """quant.json of a quantized base folder, checked for its format version."""
    file = Path(path) / QUANT_JSON
    if not file.is_file():
        raise BaseModelError(f"{path} is not a quantized base: {QUANT_JSON} is missing")
    info = json.loads(file.read_text())
    if info.get("format_version") != BASE_FORMAT_VERSION:
        raise BaseModelError(
            f"{file}: unknown base format_version {info.get('format_version')!r}; "
            f"this library reads {BASE_FORMAT_VERSION}"
        )
    return info


def load_quantized_unet(
    path: str | Path, device: str | torch.device = "cpu", config_override: QuantConfig | None = None
) -> nn.Module:
    """The quantized UNet of a base folder, built on the meta device then loaded.

    No float copy of the UNet's weights is ever made. `config_override` may change
    the trainable part (method, num_experts) but not the integers (bits, symmetric).
    """
    from diffusers import UNet2DConditionModel

    path = Path(path)
    info = read_base_info(path)
    config = QuantConfig.from_dict(info["quant_config"])
    if config_override is not None:
        if (config_override.bits, config_override.symmetric) != (config.bits, config.symmetric):
            raise BaseModelError(
                f"base {path} is {config.bits}-bit symmetric={config.symmetric}; it cannot be "
                f"used as {config_override.bits}-bit symmetric={config_override.symmetric}"
            )
        config = config_override
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
    build_quantized_skeleton(unet, config, info["layers"])
    state = load_file(path / UNET_WEIGHTS, device=str(device))
    if fingerprint_state({k: v.cpu() for k, v in state.items()}) != info["fingerprint"]:
        raise BaseModelError(
            f"{path / UNET_WEIGHTS} does not match the fingerprint in "
            f"{QUANT_JSON}: the file is corrupt or was replaced"
        )
    result = unet.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith(_SCALE_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise BaseModelError(
            f"{path}: UNet tensors do not match its config: missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    reset_scales(unet)
    still_meta = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if still_meta:
        raise BaseModelError(f"{path}: tensors left unloaded: {still_meta[:3]}")
    unet.tuneqdm_base_fingerprint = info["fingerprint"]
    unet.eval()  # experts follow the timestep: build_quantized_skeleton routes them
    return unet


def load_quantized_pipeline(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config_override: QuantConfig | None = None,
):
    """A StableDiffusionPipeline whose UNet is the base's quantized UNet.

    Text encoder and VAE are loaded in `dtype`; the quantized layers compute in the
    dtype of their input and keep fp32 scales.
    """
    unet = load_quantized_unet(path, device, config_override)
    pipe = _from_pretrained(path, None, dtype, unet=unet, feature_extractor=None)
    pipe.to(device)
    _float_non_quantized(unet, dtype)
    return pipe


def _float_non_quantized(unet: nn.Module, dtype: torch.dtype) -> None:
    """Cast the UNet's float tensors (norms, biases, s0, z) to `dtype`; scales stay fp32."""
    if dtype == torch.float32:
        return
    scale_ids = {
        id(p)
        for layer in quantized_layers(unet).values()
        for p in (layer.scale_out, layer.scale_in)
        if p is not None
    }
    for module in unet.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in scale_ids and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and name not in ("zero", "scale0"):
                module._buffers[name] = buf.to(dtype)


def _check_tokenizer(tokenizer, source) -> None:
    if tokenizer is None or len(tokenizer) < 2 or not tokenizer("a").input_ids:
        raise BaseModelError(f"{source}: the tokenizer loaded empty or is missing")
