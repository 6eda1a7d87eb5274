"""`submit --device`: what each choice resolves to on an actor with and without a GPU
from Ray, and the errors that name the option."""

from __future__ import annotations

import pytest
import torch

from pipeline.device import actor_device
from pipeline.settings import SubmitConfig, SubmitError
from tuneqdm.device import DeviceError


def test_cpu_is_the_cpu_and_auto_follows_what_torch_sees():
    assert actor_device("cpu") == "cpu"
    assert actor_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_cuda_without_a_gpu_is_a_clear_error_and_bad_names_are_refused():
    if not torch.cuda.is_available():
        # outside Ray torch is asked; in a process connected to Ray (an earlier test's
        # session) Ray's assignment is, and it assigned no GPU
        with pytest.raises(DeviceError,
                           match=r"torch sees no CUDA device|Ray assigned no GPU"):
            actor_device("cuda")
    with pytest.raises(ValueError, match="device 'tpu' is invalid: one of auto, cpu, cuda"):
        actor_device("tpu")


def test_submit_options_are_checked_before_anything_starts():
    with pytest.raises(SubmitError, match="--device gpu is invalid"):
        SubmitConfig(manifest="x.csv", device="gpu").check()
    with pytest.raises(SubmitError, match="--checkpoint-every -1 is invalid: must be >= 0"):
        SubmitConfig(manifest="x.csv", checkpoint_every=-1).check()
    SubmitConfig(manifest="x.csv", device="cpu", checkpoint_every=0).check()
