"""benchmarks/toyworld_train_step.py: the variants it times compute the same step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tuneqdm.testing import load_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "models" / "toyworld-base")
    ids = pipe.tokenizer(["a red star on a blue floor", "a dotted circle on a green floor"],
                         padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # (2, 24)
    return load_script(ROOT / "benchmarks" / "toyworld_train_step.py"), pipe, ids


def test_channels_last_and_bf16_steps_match_the_fp32_step(setup):
    bench, pipe, ids = setup
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    fp32 = bench.make_step(pipe, ids)()
    channels_last = bench.make_step(pipe, ids, channels_last=True)()
    bf16 = bench.make_step(pipe, ids, autocast=True)()
    # the same weights, inputs and loss: channels_last is a layout, bf16 a rounding
    assert channels_last == pytest.approx(fp32, rel=1e-5)
    assert bf16 == pytest.approx(fp32, rel=1e-2) and bf16 != fp32
    # each variant trains its own copy: the pipeline's weights are untouched
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_a_variant_trains_its_copy(setup):
    bench, pipe, ids = setup
    step = bench.make_step(pipe, ids)
    first = step()
    assert step() != first  # the second step sees updated weights
