"""Quantization and scale-tuning configuration (TuneQDM, arXiv 2401.04339, section 3).

One frozen dataclass says how a model's weights are quantized (bits, grid, rounding)
and which quantization scales are trainable (PEQA: output channels only; TuneQDM:
output and input channels, one copy per timestep interval).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("tuneqdm", "peqa")
ROUNDINGS = ("nearest", "mse", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize weights and which scales to train.

    Attributes:
        bits: integer width of the frozen weights, one of 2, 3, 4, 8.
        symmetric: symmetric grid (z = 0, s0 = max|row| / qmax) instead of the
            asymmetric min/max grid of docs/design.md §1.
        method: "tuneqdm" (trainable s_out and s_in, N experts) or "peqa"
            (trainable s_out only, one copy).
        num_experts: N, copies of the scales, one per timestep interval. PEQA uses 1.
        num_train_timesteps: T, the diffusion schedule's length; expert of a sample
            at timestep t is floor(t * N / T), clamped to [0, N - 1].
        rounding: "nearest" (round-to-nearest over the full min/max range, the
            paper's) or "mse" (per-channel clipping search minimising the weight's
            squared error, Q-Diffusion's 'mse' scale method) or "gptq" (round-to-
            nearest's grid, integers chosen by GPTQ from calibration inputs: gptq.py;
            quantize_ then needs the layers' Hessians).
        mse_grid: number of clipping ratios tried by rounding="mse", evenly spaced in
            [mse_min_ratio, 1].
        mse_min_ratio: the smallest clipping ratio tried by rounding="mse".
    """

    bits: int = 4
    symmetric: bool = False
    method: str = "tuneqdm"
    num_experts: int = 4
    num_train_timesteps: int = 1000
    rounding: str = "nearest"
    mse_grid: int = 80
    mse_min_ratio: float = 0.2

    def __post_init__(self) -> None:
        _check(
            _is_int(self.bits) and self.bits in SUPPORTED_BITS,
            "bits",
            self.bits,
            f"one of {SUPPORTED_BITS}",
        )
        _check(isinstance(self.symmetric, bool), "symmetric", self.symmetric, "a bool")
        _check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _check(
            _is_int(self.num_experts) and self.num_experts >= 1,
            "num_experts",
            self.num_experts,
            "an integer >= 1",
        )
        if self.method == "peqa":
            _check(self.num_experts == 1, "num_experts", self.num_experts, "1 for method='peqa'")
        _check(
            _is_int(self.num_train_timesteps) and self.num_train_timesteps >= self.num_experts,
            "num_train_timesteps",
            self.num_train_timesteps,
            "an integer >= num_experts",
        )
        _check(self.rounding in ROUNDINGS, "rounding", self.rounding, f"one of {ROUNDINGS}")
        _check(
            _is_int(self.mse_grid) and self.mse_grid >= 2,
            "mse_grid",
            self.mse_grid,
            "an integer >= 2",
        )
        _check(
            _is_real(self.mse_min_ratio) and 0.0 < self.mse_min_ratio < 1.0,
            "mse_min_ratio",
            self.mse_min_ratio,
            "a number in (0, 1)",
        )

    @property
    def train_scale_in(self) -> bool:
        """Whether layers carry a trainable input-channel scale (TuneQDM part 1)."""
        return self.method == "tuneqdm"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @classmethod
    def peqa(cls, **kwargs: Any) -> QuantConfig:
        """The PEQA baseline: output-channel scales only, one copy."""
        return cls(method="peqa", num_experts=1, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuantConfig: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _is_int(value: Any) -> bool:
    """An integer, not a bool (4.0, "4" and True are refused)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number, not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"QuantConfig.{field}={value!r} is invalid: must be {allowed}")
