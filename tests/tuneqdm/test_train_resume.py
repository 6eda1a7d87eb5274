"""Stop and go: a run checkpointed half way and resumed from its TrainState (through
its file form, as a preempted job would be) takes the same steps as an unbroken run,
bit for bit on the CPU: same losses, same scales. (20 steps = 10 + 10 keeps the test
quick; nothing in the loop depends on the count.)"""

from __future__ import annotations

import json

import pytest
import torch

from tuneqdm.base import load_quantized_pipeline
from tuneqdm.data import Subject
from tuneqdm.train import Resumption, TrainConfig, TrainingError, TrainState, finetune

CONFIG = TrainConfig(steps=20, batch_size=1, lr_scale_out=1e-3, resolution=16, seed=7)


@pytest.fixture
def dog(dog_images):
    return Subject("dog", dog_images, "dog")


def test_ten_then_resume_then_ten_equals_twenty_straight(tiny_base_dir, dog):
    straight = finetune(load_quantized_pipeline(tiny_base_dir), [dog], CONFIG)
    assert straight.extra["resumed_from_step"] == 0

    saved: list[TrainState] = []
    first_leg = finetune(load_quantized_pipeline(tiny_base_dir), [dog], CONFIG,
                         resumption=Resumption(save=saved.append, every=5))
    # saved after steps 5, 10, 15 (never after the last), each with its losses
    assert [s.step for s in saved] == [5, 10, 15]
    assert saved[1].losses == straight.losses[:10]
    assert first_leg.losses == straight.losses

    tensors, info = saved[1].to_files()  # what storage holds: bytes + JSON
    state = TrainState.from_files(tensors, json.loads(json.dumps(info)))
    resumed = finetune(load_quantized_pipeline(tiny_base_dir), [dog], CONFIG,
                       resumption=Resumption(state=state))
    assert resumed.extra["resumed_from_step"] == 10
    assert len(resumed.losses) == 20
    assert resumed.losses == straight.losses  # bit-identical, not merely close
    assert resumed.scale_set.to_bytes() == straight.scale_set.to_bytes()
    assert resumed.final_loss == straight.final_loss


def test_a_state_that_does_not_fit_is_refused(tiny_base_dir, dog):
    saved: list[TrainState] = []
    short = TrainConfig(steps=4, batch_size=1, lr_scale_out=1e-3, resolution=16)
    finetune(load_quantized_pipeline(tiny_base_dir), [dog], short,
             resumption=Resumption(save=saved.append, every=2))
    (state,) = saved
    state.params[0] = torch.zeros(3, 3)
    with pytest.raises(TrainingError, match="does not fit the model"):
        finetune(load_quantized_pipeline(tiny_base_dir), [dog], short,
                 resumption=Resumption(state=state))
    with pytest.raises(ValueError, match="format"):
        TrainState.from_files(b"", {"format": "other"})
