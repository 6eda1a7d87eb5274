"""The comparison's rows (`Method`) and the UNet each run starts from.

A row is one method at one bit width and recipe (toyworld/compare.py runs it);
`method_unet` builds its UNet from the float base (quantized with tuneqdm where the row
says), `cached_method_unet` quantizes that base once per process and copies it.
"""

from __future__ import annotations

import copy
import fnmatch
import weakref
from dataclasses import dataclass

import torch

SCALE_METHODS = ("peqa", "tuneqdm")
FLOAT_METHODS = ("full", "lora")
UNTUNED_METHODS = ("none", "words")  # nothing trained
RECIPES = ("fast", "paper")


@dataclass(frozen=True)
class Method:
    """name: "none", "words", "full", "lora", "peqa" or "tuneqdm"; bits None = float
    UNet. "words" is the untuned base (float, or quantized at `bits` with its s0
    scales) prompted with the subject in words.

    recipe: "fast" (CompareConfig.steps x batch_size, the base's recipe; full
    fine-tuning x full_batch_size) or "paper" (the paper's 400 steps of batch 1,
    CompareConfig.paper_steps x paper_batch_size, for every method).
    """

    name: str
    bits: int | None = None
    num_experts: int = 1
    recipe: str = "fast"

    def __post_init__(self) -> None:
        allowed = (*UNTUNED_METHODS, *FLOAT_METHODS, *SCALE_METHODS)
        if self.name not in allowed:
            raise ValueError(f"Method.name={self.name!r}; allowed: {', '.join(allowed)}")
        if self.name in SCALE_METHODS and self.bits is None:
            raise ValueError(f"method {self.name!r} needs bits")
        if self.name in FLOAT_METHODS and self.bits is not None:
            raise ValueError(f"method {self.name!r} trains a float UNet: bits must be None")
        if self.recipe not in RECIPES or (self.name in UNTUNED_METHODS and self.recipe != "fast"):
            raise ValueError(f"Method.recipe={self.recipe!r}; allowed: {', '.join(RECIPES)} "
                             "(fast only for no fine-tuning)")

    @property
    def label(self) -> str:
        return self._name_label + (" (paper: 400 x 1)" if self.recipe == "paper" else "")

    @property
    def _name_label(self) -> str:
        if self.name == "none":
            return "no fine-tuning" + ("" if self.bits is None else f" (W{self.bits})")
        if self.name == "words":
            return "no fine-tuning, subject in words" + ("" if self.bits is None
                                                         else f" (W{self.bits})")
        if self.name == "full":
            return "full-precision DreamBooth"
        if self.name == "lora":
            return "LoRA r=4"
        if self.name == "peqa":
            return f"PEQA W{self.bits}"
        return f"TuneQDM N={self.num_experts} W{self.bits}"

    @property
    def key(self) -> str:
        bits = "fp32" if self.bits is None else f"w{self.bits}"
        recipe = "" if self.recipe == "fast" else f"-{self.recipe}"
        return f"{self.name}-n{self.num_experts}-{bits}{recipe}"

    @classmethod
    def from_key(cls, key: str) -> Method:
        name, experts, bits, *recipe = key.split("-")
        return cls(name, None if bits == "fp32" else int(bits[1:]), int(experts[1:]),
                   *recipe)


def paper_methods(bits: tuple[int, ...] = (8, 4, 3), experts: tuple[int, ...] = (1, 4),
                  extended: bool = False) -> list[Method]:
    """The table's rows, in order: no fine-tuning (float; told the subject in words),
    the fast recipe, then the paper's recipe (400 steps of batch 1) for TuneQDM at 4
    bits with the most experts.

    extended: also the quantized bases told in words (each bit width) and full
    fine-tuning under the paper's recipe, the rows sessions 17-27's tables had; they
    are left out of the default table to keep it within an hour (docs/toyworld.md
    "Results").
    """
    words = [Method("words", b) for b in bits] if extended else []
    rows = [Method("none"), Method("words"), *words, Method("full"), Method("lora")]
    for b in bits:
        rows.append(Method("peqa", b))
        rows += [Method("tuneqdm", b, n) for n in experts]
    if extended:
        rows.append(Method("full", recipe="paper"))
    return [*rows, Method("tuneqdm", 4, max(experts), recipe="paper")]


def method_unet(float_unet: torch.nn.Module, method: Method, rounding: str = "nearest",
                keep_float: tuple[str, ...] = (), hessians: dict | None = None
                ) -> torch.nn.Module:
    """A fresh UNet for `method`: a copy of the float one, quantized where it says
    (`rounding`: tuneqdm.QuantConfig.rounding; "gptq" needs `hessians`, from
    calibrate.calibration_hessians), except the layers `keep_float` names (names or
    fnmatch patterns), which stay float and frozen."""
    from tuneqdm import QuantConfig, quantize_

    layers = [n for n, m in float_unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    unknown = [p for p in keep_float if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
    if unknown:
        raise ValueError(f"keep_float: {unknown} match no Linear/Conv2d layer of the UNet; "
                         f"allowed: layer names ({', '.join(layers[:3])}, ... "
                         f"{len(layers)} layers) or shell patterns of them")
    unet = copy.deepcopy(float_unet)
    if method.bits is None:
        return unet
    kind, experts = _quantized_as(method)
    return quantize_(unet, QuantConfig(bits=method.bits, method=kind, num_experts=experts,
                                       rounding=rounding),
                     filter_fn=lambda layer, name: not any(fnmatch.fnmatchcase(name, p)
                                                           for p in keep_float),
                     hessians=hessians)


def _quantized_as(method: Method) -> tuple[str, int]:
    """(QuantConfig.method, num_experts) of a quantized row: the untuned rows carry
    PEQA's s0 scales, one expert."""
    if method.name in ("peqa", *UNTUNED_METHODS):
        return "peqa", 1
    return "tuneqdm", method.num_experts


_QUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_method_unet(float_unet: torch.nn.Module, method: Method, rounding: str = "nearest",
                       keep_float: tuple[str, ...] = (), hessians: dict | None = None
                       ) -> torch.nn.Module:
    """method_unet's UNet, quantized once per process and copied for every call.

    A run must start from the untouched quantized base, and quantizing that base is
    the same work every time: GPTQ takes 2.75 s of a run on one thread, a copy 0.07 s
    (docs/benchmarks.md). The quantized UNet is kept per float UNet object and per (bits, method,
    experts, rounding, keep_float); copies are bit-identical to a fresh quantization
    (tests/toyworld/test_compare.py). Like calibrate.calibration_hessians' cache, this
    assumes the float UNet's weights do not change in place, and that `hessians` are
    always those of calibration_hessians(pipe) for that UNet.
    """
    if method.bits is None:
        return method_unet(float_unet, method, rounding, keep_float, hessians)
    key = (method.bits, *_quantized_as(method), rounding, tuple(keep_float))
    per_unet = _QUANTIZED.setdefault(float_unet, {})
    if key not in per_unet:
        per_unet[key] = method_unet(float_unet, method, rounding, keep_float, hessians)
    return copy.deepcopy(per_unet[key])


__all__ = ["FLOAT_METHODS", "RECIPES", "SCALE_METHODS", "UNTUNED_METHODS", "Method",
           "cached_method_unet", "method_unet", "paper_methods"]
