"""The state of a training run between two steps, so a run can stop and go on later.

A `TrainState` after `step` steps holds what the next step depends on: the trained
parameters (for the scales method, every layer's (N, out) and (N, in) scale rows), the
optimiser's state (AdamW: `step`, `exp_avg`, `exp_avg_sq` per parameter), the data
generator's state and the losses so far. Going on from it gives the same steps, bit
for bit on the CPU, as never having stopped (tests/tuneqdm/test_train_resume.py).

It travels as two files: tensors as safetensors bytes, everything else as a JSON
object. Where they are stored is not this package's business (pipeline/checkpoint.py
writes them to the artefact store).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "tuneqdm-train-state-1"


@dataclass
class TrainState:
    """step: steps taken; params: one tensor per trainable parameter, in the order of
    the optimiser's groups; optimizer: the optimiser's state_dict; generator: the
    torch.Generator state (uint8); losses: one per step taken."""

    step: int
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor
    losses: list[float]

    @classmethod
    def capture(cls, step: int, params: list[torch.nn.Parameter], optimizer,
                generator: torch.Generator, losses: list[float]) -> TrainState:
        """A detached CPU copy of the run's state after `step` steps."""
        state = optimizer.state_dict()
        copied = {index: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                          for k, v in values.items()}
                  for index, values in state["state"].items()}
        return cls(step, [p.detach().cpu().clone() for p in params],
                   {"state": copied, "param_groups": state["param_groups"]},
                   generator.get_state().clone(), list(losses))

    def restore(self, params: list[torch.nn.Parameter], optimizer,
                generator: torch.Generator) -> None:
        """Put this state into a freshly built run (same parameters, same groups)."""
        if len(params) != len(self.params) or any(
                p.shape != t.shape for p, t in zip(params, self.params, strict=True)):
            raise ValueError("train state does not fit the model: its parameters have "
                             f"shapes {[tuple(t.shape) for t in self.params][:4]}..., the "
                             f"model's {[tuple(p.shape) for p in params][:4]}...")
        with torch.no_grad():
            for param, saved in zip(params, self.params, strict=True):
                param.copy_(saved.to(param.device, param.dtype))
        optimizer.load_state_dict(self.optimizer)
        generator.set_state(self.generator)

    def to_files(self) -> tuple[bytes, dict[str, Any]]:
        """(safetensors bytes of every tensor, a JSON-ready object of the rest)."""
        tensors = {f"param.{i}": t.contiguous() for i, t in enumerate(self.params)}
        tensors["generator"] = self.generator.contiguous()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in self.optimizer["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{name}"] = value.contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        info = {"format": FORMAT, "step": self.step, "losses": list(self.losses),
                "num_params": len(self.params), "optim_scalars": scalars,
                "param_groups": self.optimizer["param_groups"]}
        return st_save(tensors), info

    @classmethod
    def from_files(cls, tensor_bytes: bytes, info: dict[str, Any]) -> TrainState:
        """Inverse of to_files; ValueError for another format or missing tensors."""
        if info.get("format") != FORMAT:
            raise ValueError(f"train state format {info.get('format')!r} is not {FORMAT!r}")
        tensors = st_load(tensor_bytes)
        try:
            params = [tensors[f"param.{i}"] for i in range(int(info["num_params"]))]
            generator = tensors["generator"]
        except KeyError as err:
            raise ValueError(f"train state lacks tensor {err}") from None
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in info.get("optim_scalars", {}).items():
            state.setdefault(int(index), {}).update(values)
        optimizer = {"state": state, "param_groups": info["param_groups"]}
        return cls(int(info["step"]), params, optimizer, generator,
                   [float(x) for x in info["losses"]])
