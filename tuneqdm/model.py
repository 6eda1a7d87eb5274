"""Swap a model's nn.Linear / nn.Conv2d for quantized layers, in place.

`quantize_(module, config, filter_fn)` follows torchao's `quantize_`: one call on any
torch module, a frozen config, an optional filter; nothing here is UNet-specific.
All quantized layers of one model share one `ScaleRouter` (experts.py). The module
stays callable as before: a forward(sample, timestep, ...) (a diffusers UNet) routes
each sample to its timestep expert by itself, and with one expert any module needs no
routing; other modules with N > 1 experts route with tuneqdm.get_router(module).
The scale tables themselves belong to scaletable.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import QuantConfig
from .experts import ScaleRouter, attach_timestep_router, takes_timestep
from .layers import QuantConv2d, QuantizedLayer, QuantLinear
from .scaletable import ScaleTable

FilterFn = Callable[[nn.Module, str], bool]


def quantize_(
    module: nn.Module,
    config: QuantConfig,
    filter_fn: FilterFn | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of `module` (that `filter_fn(layer, name)`
    accepts) by a quantized layer; freeze every other parameter. Returns `module`.

    hessians: layer name -> input Hessian (gptq.collect_hessians on the float
    module), required by and only used for config.rounding="gptq".

    The float weights of replaced layers are released as they are quantized. If
    module's forward is forward(sample, timestep, ...), each sample's timestep picks
    its expert on every call (enable_timestep_experts is then already done).
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError("quantize_ replaces children: wrap a lone layer in nn.Sequential")
    if quantized_layers(module):
        raise ValueError("module is already quantized")
    # names only: holding the float layers in a list would keep every float weight
    # alive until the end, on top of the quantized copies
    names = [
        name
        for name, child in module.named_modules()
        if isinstance(child, (nn.Linear, nn.Conv2d))
        and (filter_fn is None or filter_fn(child, name))
    ]
    _check_hessians(names, config, hessians)
    for name in names:
        child = module.get_submodule(name)
        hessian = None if hessians is None else hessians[name]
        with torch.no_grad():
            if isinstance(child, nn.Linear):
                quantized = QuantLinear.from_float(child, config, hessian)
            else:
                quantized = QuantConv2d.from_float(child, config, hessian)
        _set_submodule(module, name, quantized)
        del child, quantized
    return _freeze_and_route(module, config)


def _check_hessians(
    names: list[str], config: QuantConfig, hessians: dict[str, torch.Tensor] | None
) -> None:
    """hessians go with rounding="gptq", one for every layer to quantize."""
    if config.rounding != "gptq":
        if hessians is not None:
            raise ValueError(f"quantize_: hessians are for rounding='gptq' only "
                             f"(rounding={config.rounding!r})")
        return
    if hessians is None:
        raise ValueError("quantize_: rounding='gptq' needs hessians "
                         "(tuneqdm.gptq.collect_hessians on the float module)")
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ValueError(f"quantize_: rounding='gptq' has no hessian for layer(s) "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")


def build_quantized_skeleton(
    module: nn.Module, config: QuantConfig, layer_names: list[str]
) -> nn.Module:
    """Swap the named layers for empty quantized layers (weights to be loaded later)."""
    for name in layer_names:
        child = module.get_submodule(name)
        if isinstance(child, nn.Linear):
            layer = QuantLinear(
                child.in_features, child.out_features, child.bias is not None, config
            )
        elif isinstance(child, nn.Conv2d):
            layer = QuantConv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                child.groups,
                child.bias is not None,
                child.padding_mode,
                config,
            )
        else:
            raise ValueError(f"layer {name!r} is {type(child).__name__}, not Linear or Conv2d")
        _set_submodule(module, name, layer)
    return _freeze_and_route(module, config)


def _freeze_and_route(module: nn.Module, config: QuantConfig) -> nn.Module:
    """Freeze everything but the scales; give all quantized layers one shared router,
    routed from the timestep when module's forward takes (sample, timestep, ...)."""
    for param in module.parameters():
        param.requires_grad_(False)
    router = ScaleRouter(config.num_experts, config.num_train_timesteps)
    for layer in quantized_layers(module).values():
        layer.router = router
        for param in (layer.scale_out, layer.scale_in):
            if param is not None:
                param.requires_grad_(True)
    module.tuneqdm_config = config
    module.tuneqdm_router = router
    if takes_timestep(module):
        attach_timestep_router(module, router)
    return module


def quantized_layers(module: nn.Module) -> dict[str, QuantizedLayer]:
    """Name -> quantized layer, in module order."""
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLayer)}


def scale_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(all scale_out parameters, all scale_in parameters) of a quantized model."""
    layers = quantized_layers(module).values()
    outs = [layer.scale_out for layer in layers]
    ins = [layer.scale_in for layer in layers if layer.scale_in is not None]
    return outs, ins


def enable_timestep_experts(unet: nn.Module) -> ScaleRouter:
    """Make experts follow the timestep argument of unet(sample, timestep, ...).

    quantize_ and the base loaders do this already for such a forward; calling it again
    is harmless (the hook is replaced, not doubled).
    """
    router = get_router(unet)
    attach_timestep_router(unet, router)
    return router


def get_router(module: nn.Module) -> ScaleRouter:
    router = getattr(module, "tuneqdm_router", None)
    if router is None:
        raise ValueError("module is not quantized with tuneqdm.quantize_")
    return router


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def reset_scales(module: nn.Module) -> None:
    """Give every quantized layer trainable (N, ...) scales: s_out <- s0, s_in <- 1.

    Also undoes a multi-subject table (install_scale_sets, a serving bank) and
    materialises scales of a model built on the meta device (ScaleTable.allocate).
    """
    ScaleTable(module).allocate(slots=1, trainable=True)
