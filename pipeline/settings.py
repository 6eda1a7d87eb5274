"""`SubmitConfig`: what `submit` takes, and how each setting is decided.

Each default is declared once, by the component that uses it (docs/design.md §5):

    quantization      QuantConfig (tuneqdm/config.py)
    training          TrainConfig (tuneqdm/train.py), under the base's recipe
    samples, photos   WorkSettings (pipeline/worker.py), under the base's recipe
    retries           ActorPool (pipeline/scheduler.py)
    the run itself    SubmitConfig below (output, resume, shared_output)

A field left None takes, in order: the base model folder's recipe
(`tuneqdm_recipe.json`, tuneqdm/recipe.py) where it has one, else that default.
Per-subject CSV columns override the result (pipeline/worker.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .device import DEVICES
from .scheduler import ActorPool
from .store import default_cache_dir
from .worker import WorkSettings

DEFAULT_OUTPUT = "outputs/tuneqdm"
TOY_BASE = Path(__file__).resolve().parents[1] / "models" / "toyworld-base"
# the TrainConfig fields that submit exposes as options (and CSV overrides refine)
TRAIN_OPTIONS = ("steps", "lr_scale_out", "lr_scale_in", "batch_size", "resolution", "seed")
SAMPLE_OPTIONS = ("sample_steps", "guidance_scale")


def field_default(cls: type, name: str) -> Any:
    """The declared default of dataclass field `name` of `cls`."""
    (match,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return match.default


def _pool_default(name: str) -> Any:
    return inspect.signature(ActorPool.__init__).parameters[name].default


class SubmitError(ValueError):
    """A problem with the submit's options (not with a subject); nothing was launched."""


@dataclass(frozen=True)
class SubmitConfig:
    """Everything `tuneqdm-pipeline submit` takes. None means "decide from the cluster"
    (actors, GPUs), "the base's recipe, else the library's default" (training and
    sample settings) or "the library's default" (quantization); see the module doc."""

    manifest: str
    output: str = DEFAULT_OUTPUT
    base_model: str | None = None
    revision: str | None = None
    bits: int | None = None
    method: str | None = None
    experts: int | None = None
    steps: int | None = None
    lr_scale_out: float | None = None
    lr_scale_in: float | None = None
    batch_size: int | None = None
    resolution: int | None = None
    seed: int | None = None
    address: str | None = None
    actors: int | None = None
    num_gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    resume: bool = True
    max_retries: int = _pool_default("max_retries")
    schedule_timeout: float = _pool_default("schedule_timeout_s")
    subject_timeout: float | None = None  # None: derived (pipeline/deadline.py)
    samples: int = field_default(WorkSettings, "samples")
    sample_steps: int | None = None
    guidance_scale: float | None = None
    scales_dtype: str = field_default(WorkSettings, "scales_dtype")
    min_image_side: int = field_default(WorkSettings, "min_image_side")
    device: str = field_default(WorkSettings, "device")
    checkpoint_every: int = field_default(WorkSettings, "checkpoint_every")
    shared_output: bool = False

    def check(self) -> None:
        """Raise SubmitError for an option outside its range (before anything starts)."""
        checks = [
            (self.max_retries >= 0, "--max-retries", self.max_retries, ">= 0"),
            (self.schedule_timeout > 0, "--schedule-timeout", self.schedule_timeout,
             "> 0 seconds"),
            (self.subject_timeout is None or self.subject_timeout > 0,
             "--subject-timeout", self.subject_timeout, "> 0 seconds"),
            (self.actors is None or self.actors >= 1, "--actors", self.actors, ">= 1"),
            (self.num_gpus_per_actor is None or self.num_gpus_per_actor >= 0,
             "--num-gpus-per-actor", self.num_gpus_per_actor, ">= 0"),
            (self.cpus_per_actor is None or self.cpus_per_actor > 0, "--cpus-per-actor",
             self.cpus_per_actor, "> 0"),
            (self.samples >= 0, "--samples", self.samples, ">= 0"),
            (self.sample_steps is None or self.sample_steps >= 1, "--sample-steps",
             self.sample_steps, ">= 1"),
            (self.min_image_side >= 1, "--min-image-side", self.min_image_side, ">= 1"),
            (self.scales_dtype in ("float32", "float16"), "--scales-dtype",
             self.scales_dtype, "float32 or float16"),
            (self.device in DEVICES, "--device", self.device, " or ".join(DEVICES)),
            (self.checkpoint_every >= 0, "--checkpoint-every", self.checkpoint_every,
             ">= 0 (0: no checkpoints)"),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise SubmitError(f"{name} {value} is invalid: must be {allowed}")

    def quant_config(self) -> dict[str, Any]:
        """QuantConfig as a dict: the options given, QuantConfig's defaults for the rest
        (PEQA has one expert by definition)."""
        from tuneqdm import QuantConfig

        given = {"bits": self.bits, "method": self.method, "num_experts": self.experts}
        if self.experts is None and self.method == "peqa":
            given["num_experts"] = 1
        try:
            return QuantConfig(**{k: v for k, v in given.items() if v is not None}).to_dict()
        except ValueError as err:
            raise SubmitError(str(err)) from None

    def train_settings(self, recipe=None) -> dict[str, Any]:
        """TrainConfig keyword arguments: options > the recipe > TrainConfig's defaults.
        May hold lr_scale_out_relative (resolved per base by the worker)."""
        from tuneqdm.recipe import RELATIVE_LR, train_settings
        from tuneqdm.train import TrainConfig

        given = {k: getattr(self, k) for k in TRAIN_OPTIONS if getattr(self, k) is not None}
        settings = train_settings(recipe, given, TRAIN_OPTIONS)
        check = {k: v for k, v in settings.items() if k != RELATIVE_LR}
        # a relative rate was checked with its recipe; the default stands in for it here
        check.setdefault("lr_scale_out", field_default(TrainConfig, "lr_scale_out"))
        try:
            TrainConfig(**check)
        except (TypeError, ValueError) as err:
            raise SubmitError(str(err)) from None
        return settings

    def sample_settings(self, recipe=None) -> dict[str, Any]:
        """sample_steps and guidance_scale: options > the recipe > WorkSettings'."""
        settings = {k: field_default(WorkSettings, k) for k in SAMPLE_OPTIONS}
        settings.update(recipe.samples if recipe else {})
        settings.update({k: getattr(self, k) for k in SAMPLE_OPTIONS
                         if getattr(self, k) is not None})
        return settings


def resolve_base_model(value: str | None, say: Callable[[str], None]) -> str:
    """A hub id or absolute local path. None: the bundled toy-world base, or (until it
    exists) a tiny random pipeline generated once into the cache folder."""
    if value:
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
        if value.startswith((".", "/", "~")) or value.count("/") != 1:
            raise SubmitError(f"--base-model {value!r}: no such folder, and not a hub id "
                              "of the form owner/name")
        return value
    if (TOY_BASE / "model_index.json").is_file():
        return str(TOY_BASE)
    tiny = default_cache_dir() / "tiny-sd-pipeline"
    if not (tiny / "model_index.json").is_file():
        from tuneqdm.testing import save_tiny_pipeline

        staging = tiny.parent / f".tiny-{uuid.uuid4().hex[:8]}"
        save_tiny_pipeline(staging)
        try:
            os.replace(staging, tiny)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"note: {TOY_BASE} not found; using a tiny random pipeline ({tiny}) as the base "
        "-- fine for smoke tests, useless for real images; pass --base-model")
    return str(tiny)


def base_recipe(source: str):
    """The recipe in a local base model folder (tuneqdm/recipe.py), or None; a hub id
    has none here. SubmitError if the folder's recipe is unusable."""
    from tuneqdm.recipe import RecipeError, read_recipe

    try:
        return read_recipe(source) if Path(source).is_dir() else None
    except RecipeError as err:
        raise SubmitError(str(err)) from None
