"""Scheduler choice: each named sampler runs on the quantized base, changes the image,
leaves the pipeline's own scheduler in place, and unknown names are refused."""

from __future__ import annotations

import numpy as np
import pytest

from tuneqdm.base import load_quantized_pipeline
from tuneqdm.generate import generate
from tuneqdm.schedulers import SCHEDULERS, make_scheduler, scheduler_name

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_base_dir):
    return load_quantized_pipeline(tiny_base_dir)


def _image(pipe, scheduler=None) -> tuple[np.ndarray, set[str]]:
    """The image, and the schedulers the pipeline held while the UNet ran."""
    active: set[str] = set()
    hook = pipe.unet.register_forward_pre_hook(
        lambda *_: active.add(type(pipe.scheduler).__name__))
    try:
        (image,) = generate(pipe, ["a photo of sks dog"], seed=3, num_inference_steps=STEPS,
                            scheduler=scheduler)
    finally:
        hook.remove()
    return np.asarray(image, dtype=np.int16), active


def test_each_scheduler_samples_and_the_pipeline_keeps_its_own(pipe):
    own = pipe.scheduler
    assert type(own).__name__ == "DDIMScheduler"  # the tiny base's
    default, active = _image(pipe)
    assert active == {"DDIMScheduler"}
    by_name, _ = _image(pipe, "ddim")
    assert np.array_equal(by_name, default)  # the same sampler, by name
    for name in ("pndm", "euler", "dpm-solver"):
        image, active = _image(pipe, name)
        assert active == {SCHEDULERS[name]}
        assert pipe.scheduler is own  # restored after the call
        difference = np.abs(image - default)
        # deterministic Euler integrates the same ODE as DDIM: it differs by rounding
        assert difference.max() >= 1 if name == "euler" else difference.mean() > 0.5, name
    assert np.array_equal(_image(pipe)[0], default)


def test_schedulers_are_built_from_the_pipelines_config(pipe):
    for name, class_name in SCHEDULERS.items():
        scheduler = make_scheduler(name.upper(), pipe.scheduler.config)
        assert type(scheduler).__name__ == class_name
        assert scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
        assert scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert make_scheduler("pndm", pipe.scheduler.config).config.skip_prk_steps is True


def test_unknown_scheduler_names_are_refused(pipe):
    own = pipe.scheduler
    with pytest.raises(ValueError, match="scheduler 'lms' is unknown: use one of ddim, pndm, "
                                         "euler, dpm-solver"):
        generate(pipe, ["x"], num_inference_steps=STEPS, scheduler="lms")
    assert pipe.scheduler is own
    assert scheduler_name(" DPM-Solver ") == "dpm-solver"
