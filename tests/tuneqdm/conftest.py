"""Fixtures for the library's tests: a tiny float pipeline and its quantized base,
built offline once per session and loaded back through `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneqdm import QuantConfig
from tuneqdm.base import quantize_pipeline
from tuneqdm.testing import save_tiny_pipeline

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "dreambooth"


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny StableDiffusionPipeline (float, random weights, seed 0)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline quantized to 4 bits, TuneQDM with N = 2 experts."""
    out = tmp_path_factory.mktemp("base") / "w4"
    quantize_pipeline(tiny_pipeline_dir, out, QuantConfig(bits=4, num_experts=2))
    return out


@pytest.fixture(scope="session")
def dog_images():
    """Five real DreamBooth photographs of one dog (CC-BY 4.0, see shared/dreambooth)."""
    from tuneqdm.data import load_image_folder

    folder = DREAMBOOTH / "dog"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not available")
    return load_image_folder(folder)
