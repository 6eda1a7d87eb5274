"""REFERENCE FOR COMPARISON, NOT PRODUCT CODE: the published implementation's way.

The released TuneQDM code (arXiv 2401.04339) trains its scales by rebuilding the
whole float weight in every forward,

    W = s_out[e][:, None] * (W_q - z) * s_in[e][None, :]        (docs/design.md §1)

and running an ordinary F.linear / F.conv2d on it, with plain autograd. Autograd then
keeps float copies of the weight alive until backward (the operands of both scale
products and the weight of the matmul: about three float weights per layer) and
computes a full float weight gradient in backward. The expert e comes from
`t.item()` of the FIRST sample, so every sample of a batch uses the same expert, and
the integers are stored one per int8 byte even at 4 bits (no packing).

benchmarks/train_memory.py measures it against tuneqdm's layers (tuneqdm/functional.py),
which never build W. The grid (tuneqdm.quant.quantize_weight) and the trainable
numbers are the same, so only the way the scales are applied differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm import QuantConfig
from tuneqdm.quant import quantize_weight


class PlainExpertState:
    """The expert of the current forward, set from the first sample's timestep."""

    def __init__(self, num_experts: int, num_train_timesteps: int) -> None:
        self.num_experts = num_experts
        self.num_train_timesteps = num_train_timesteps
        self.expert = 0

    def set_from_timestep(self, timestep) -> None:
        t = float(torch.as_tensor(timestep).reshape(-1)[0].item())  # first sample only
        self.expert = min(
            max(int(t * self.num_experts // self.num_train_timesteps), 0), self.num_experts - 1
        )


class _PlainQuantized(nn.Module):
    """Frozen int8 weight (one value per byte), zero point, bias; trainable scales."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
        state: PlainExpertState,
    ) -> None:
        super().__init__()
        q, zero, scale0 = quantize_weight(weight, config)
        self.register_buffer("weight_int", q)  # int8, weight's shape
        self.register_buffer("zero", zero)  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        n, out = config.num_experts, weight.shape[0]
        self.scale_out = nn.Parameter(scale0.expand(n, out).clone())  # (N, out)
        self.scale_in = (
            nn.Parameter(torch.ones(n, weight.shape[1]))  # (N, in)
            if config.train_scale_in
            else None
        )
        self.state = state

    def weight(self) -> torch.Tensor:
        """W = s_out[e] * (W_q - z) * s_in[e] as a float tensor, through autograd."""
        e = self.state.expert
        view = (-1,) + (1,) * (self.weight_int.dim() - 1)
        w = self.scale_out[e].view(view) * (self.weight_int.float() - self.zero.view(view))
        if self.scale_in is not None:
            in_view = (1, -1) + (1,) * (self.weight_int.dim() - 2)
            w = w * self.scale_in[e].view(in_view)
        return w


class PlainQuantLinear(_PlainQuantized):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class PlainQuantConv2d(_PlainQuantized):
    def __init__(self, conv: nn.Conv2d, config: QuantConfig, state: PlainExpertState) -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("the reference handles groups=1, zero padding (all of SD's convs)")
        super().__init__(conv.weight, conv.bias, config, state)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


def plain_quantize_(model: nn.Module, config: QuantConfig) -> PlainExpertState:
    """Swap every Linear / Conv2d of a UNet for the reference layers, freeze the rest,
    and set the expert from model(sample, timestep, ...) on every forward.
    """
    state = PlainExpertState(config.num_experts, config.num_train_timesteps)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name, child in targets:
        with torch.no_grad():
            if isinstance(child, nn.Linear):
                layer = PlainQuantLinear(child.weight, child.bias, config, state)
            else:
                layer = PlainQuantConv2d(child, config, state)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, _PlainQuantized):
            module.scale_out.requires_grad_(True)
            if module.scale_in is not None:
                module.scale_in.requires_grad_(True)

    def hook(module, args, kwargs):
        state.set_from_timestep(args[1] if len(args) > 1 else kwargs["timestep"])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return state
