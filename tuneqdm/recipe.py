"""A base's recommended fine-tuning settings: `tuneqdm_recipe.json` in its model folder.

The library's defaults (TrainConfig) are the paper's, for Stable Diffusion v1.x. A
model that wants others ships them beside its weights (docs/design.md §5):

    {
      "about": "free text",
      "train": {"steps": 120, "batch_size": 4, "lr_scale_out_relative": 0.01},
      "samples": {"guidance_scale": 4.0, "sample_steps": 20}
    }

- "train": TrainConfig fields (any but "method"), and `lr_scale_out_relative`: the
  rate of s_out as a fraction of the base's mean s0, so one recipe holds at every bit
  width (s0 doubles with each bit removed). It is resolved against the quantized UNet
  (`resolve_train_config`) to 3 significant digits, so the same base always trains at
  the same rate; give either it or "lr_scale_out".
- "samples": `guidance_scale` and `sample_steps` of the sample images made after
  training.

Precedence, lowest first: TrainConfig's defaults, the recipe, the caller's explicit
values (`train_settings`), and per-subject overrides on top of those.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .train import TrainConfig, mean_scale0

RECIPE_FILE = "tuneqdm_recipe.json"
RELATIVE_LR = "lr_scale_out_relative"
SAMPLE_KEYS = ("guidance_scale", "sample_steps")
SECTIONS = ("about", "train", "samples")


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Recipe:
    """train: TrainConfig keyword arguments (plus lr_scale_out_relative);
    samples: guidance_scale / sample_steps of the sample images."""

    train: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def describe(self) -> str:
        """'steps 120, batch_size 4, lr_scale_out 0.01 x mean s0, guidance_scale 4.0'"""
        parts = [f"lr_scale_out {v:g} x mean s0" if k == RELATIVE_LR else f"{k} {v}"
                 for k, v in {**self.train, **self.samples}.items()]
        return ", ".join(parts)


def train_keys() -> tuple[str, ...]:
    """The "train" keys a recipe may set."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "method"]
    return (*names, RELATIVE_LR)


def read_recipe(model_dir: str | Path) -> Recipe | None:
    """The recipe of a local model folder, or None if it has none (or is not a folder)."""
    path = Path(model_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"{path}: not readable JSON ({err})") from None
    return parse_recipe(data, str(path))


def parse_recipe(data: Any, path: str = RECIPE_FILE) -> Recipe:
    """A checked Recipe from the file's JSON object; RecipeError names the bad key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a JSON object with keys {list(SECTIONS)}")
    _known(path, "", data, SECTIONS)
    train, samples = data.get("train", {}), data.get("samples", {})
    for name, section in (("train", train), ("samples", samples)):
        if not isinstance(section, dict):
            raise RecipeError(f"{path}: '{name}' must be an object")
    _known(path, "train.", train, train_keys())
    _known(path, "samples.", samples, SAMPLE_KEYS)
    if RELATIVE_LR in train and "lr_scale_out" in train:
        raise RecipeError(f"{path}: give train.lr_scale_out or train.{RELATIVE_LR}, not both")
    if RELATIVE_LR in train and not _positive(train[RELATIVE_LR]):
        raise RecipeError(f"{path}: train.{RELATIVE_LR}={train[RELATIVE_LR]!r} is invalid: "
                          "must be a positive number")
    try:
        TrainConfig(**{k: v for k, v in train.items() if k != RELATIVE_LR})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{path}: {err}") from None
    steps, guidance = samples.get("sample_steps", 1), samples.get("guidance_scale", 0)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise RecipeError(f"{path}: samples.sample_steps={steps!r} is invalid: must be an "
                          "integer >= 1")
    if not (_positive(guidance) or guidance == 0):
        raise RecipeError(f"{path}: samples.guidance_scale={guidance!r} is invalid: must be "
                          "a number >= 0")
    return Recipe(dict(train), dict(samples), path)


def train_settings(recipe: Recipe | None, given: dict[str, Any],
                   keys: tuple[str, ...]) -> dict[str, Any]:
    """TrainConfig keyword arguments: `keys` at TrainConfig's defaults, overlaid by the
    recipe's train settings, overlaid by `given` (the caller's explicit values).

    The result holds either "lr_scale_out" or RELATIVE_LR (resolve it with
    `resolve_train_config`): an lr_scale_out given explicitly beats a recipe's
    relative rate.
    """
    defaults = TrainConfig()
    settings = {name: getattr(defaults, name) for name in keys}
    settings.update(recipe.train if recipe else {})
    settings.update(given)
    if RELATIVE_LR in settings:
        settings.pop(RELATIVE_LR if "lr_scale_out" in given else "lr_scale_out", None)
    return settings


def relative_lr(relative: float, unet: nn.Module) -> float:
    """relative x mean s0 of `unet`'s quantized layers, to 3 significant digits."""
    return float(f"{relative * mean_scale0(unet):.3g}")


def resolve_train_config(settings: dict[str, Any], unet: nn.Module | None) -> TrainConfig:
    """A TrainConfig from `settings`, whose RELATIVE_LR (if any, and no lr_scale_out
    beside it) becomes lr_scale_out for the quantized `unet`."""
    values = dict(settings)
    relative = values.pop(RELATIVE_LR, None)
    if relative is not None and values.get("lr_scale_out") is None:
        if unet is None:
            raise ValueError(f"{RELATIVE_LR} needs the quantized UNet to resolve against")
        values["lr_scale_out"] = relative_lr(relative, unet)
    return TrainConfig(**values)


def _known(path: str, prefix: str, data: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {[prefix + k for k in unknown]}; allowed: "
                          f"{[prefix + k for k in allowed]}")


def _positive(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
