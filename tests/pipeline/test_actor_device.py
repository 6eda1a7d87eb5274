"""`submit --device`: what each choice resolves to on an actor with and without a GPU
from Ray, and the errors that name the option."""

from __future__ import annotations

import pytest

from pipeline.device import DeviceError, resolve_device
from pipeline.settings import SubmitConfig, SubmitError


def test_cpu_is_the_cpu_even_on_an_actor_holding_a_gpu():
    assert resolve_device("cpu", [0], cuda_available=True) == "cpu"
    assert resolve_device("cpu", [], cuda_available=False) == "cpu"


def test_auto_uses_the_gpu_only_when_ray_gave_one_and_torch_sees_it():
    assert resolve_device("auto", [0], cuda_available=True) == "cuda"
    assert resolve_device("auto", [], cuda_available=True) == "cpu"   # no GPU assigned
    assert resolve_device("auto", [0], cuda_available=False) == "cpu"  # logical GPU only
    assert resolve_device("auto", None, cuda_available=True) == "cuda"  # outside Ray


def test_cuda_without_a_gpu_is_a_clear_error():
    assert resolve_device("cuda", [1], cuda_available=True) == "cuda"
    with pytest.raises(DeviceError, match="--device cuda: this actor has no GPU assigned"):
        resolve_device("cuda", [], cuda_available=True)
    with pytest.raises(DeviceError, match="--device cuda: torch sees no CUDA device"):
        resolve_device("cuda", [0], cuda_available=False)
    with pytest.raises(ValueError, match="device 'tpu' is invalid: one of auto, cpu, cuda"):
        resolve_device("tpu", [], cuda_available=False)


def test_submit_options_are_checked_before_anything_starts():
    with pytest.raises(SubmitError, match="--device gpu is invalid"):
        SubmitConfig(manifest="x.csv", device="gpu").check()
    with pytest.raises(SubmitError, match="--checkpoint-every -1 is invalid: must be >= 0"):
        SubmitConfig(manifest="x.csv", checkpoint_every=-1).check()
    SubmitConfig(manifest="x.csv", device="cpu", checkpoint_every=0).check()
