"""Sampling schedulers by name, built from a pipeline's own scheduler config.

A base folder holds one scheduler (DDIM for the toy-world base, PNDM for SD v1.5).
Every diffusers scheduler below reads the same config (beta schedule, number of
training timesteps, prediction type, timestep spacing), so any of them can sample the
same model; the quantized UNet's experts route from whatever t they pass
(docs/design.md §1), integer or float.

    make_scheduler("euler", pipe.scheduler.config)   a new scheduler, pipe untouched
    with use_scheduler(pipe, "dpm-solver"): ...       swapped for the block, then restored
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# name -> diffusers class name (imported lazily: naming the choices costs no import)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
}
# Settings a scheduler needs that another scheduler's config does not carry: PNDM
# without Runge-Kutta warm-up steps is the PLMS sampler Stable Diffusion ships with.
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {"pndm": {"skip_prk_steps": True}}


def scheduler_name(name: str) -> str:
    """The canonical name ("DDIM" -> "ddim"); ValueError naming the allowed ones."""
    key = str(name).strip().lower()
    if key not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is unknown: use one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, config: Any):
    """A new diffusers scheduler `name` built from `config` (a scheduler's `.config`)."""
    import diffusers

    key = scheduler_name(name)
    extra = {k: v for k, v in _CONFIG_DEFAULTS.get(key, {}).items() if k not in config}
    return getattr(diffusers, SCHEDULERS[key]).from_config(config, **extra)


@contextmanager
def use_scheduler(pipe, name: str | None) -> Iterator[None]:
    """Sample with scheduler `name` inside the block (None: keep the pipeline's own);
    the pipeline's scheduler is restored afterwards."""
    if name is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original.config)
    try:
        yield
    finally:
        pipe.scheduler = original
