"""The sampler of the service and of `generate`: set once per engine from the serve
settings or the option, the same images as the library's generate with that sampler,
and unknown names refused before anything loads."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from deploy_testkit import STEPS, assert_close
from PIL import Image
from pydantic import ValidationError

from deploy.engine import Engine
from deploy.settings import ServeSettings
from tuneqdm_cli.main import main


def _generate(output, path, *extra):
    result = CliRunner().invoke(main, ["generate", str(output), "dog",
                                       "a photo of {token} {class_noun}", "--steps",
                                       str(STEPS), "--seed", "5", "-o", str(path), *extra])
    assert result.exit_code == 0, result.output
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_generate_with_a_scheduler_matches_the_library(trained_output, base_dir, scale_sets,
                                                       tmp_path):
    from tuneqdm.base import load_quantized_pipeline
    from tuneqdm.generate import generate

    own = _generate(trained_output, tmp_path / "own.png")
    dpm = _generate(trained_output, tmp_path / "dpm.png", "--scheduler", "DPM-Solver")
    assert np.abs(dpm - own).mean() > 0.5  # another sampler, another image
    pipe = load_quantized_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    (reference,) = generate(pipe, ["a photo of sks dog"], scale_sets["dog"], seed=5,
                            num_inference_steps=STEPS, scheduler="dpm-solver")
    assert_close(reference, dpm)
    refused = CliRunner().invoke(main, ["generate", str(trained_output), "dog", "x",
                                        "--scheduler", "lms"])
    assert refused.exit_code == 2 and "'lms' is not one of" in refused.output


def test_the_engine_sets_the_servers_scheduler_once(trained_output, base_dir):
    from deploy.store import SubjectStore

    store = SubjectStore(str(trained_output))
    engine = Engine(base_dir, store.base.fingerprint, capacity=1, scheduler="euler")
    assert type(engine.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    default = Engine(base_dir, store.base.fingerprint, capacity=1)
    assert type(default.pipe.scheduler).__name__ == "DDIMScheduler"  # the base's own
    assert ServeSettings(output=str(trained_output), scheduler="PNDM").scheduler == "pndm"
    assert ServeSettings(output=str(trained_output)).scheduler is None
    with pytest.raises(ValidationError, match="scheduler 'lms' is unknown: use one of ddim, "
                                              "pndm, euler, dpm-solver"):
        ServeSettings(output=str(trained_output), scheduler="lms")
    serve = CliRunner().invoke(main, ["serve", str(trained_output), "--scheduler", "lms"])
    assert serve.exit_code == 2 and "'lms' is not one of" in serve.output
