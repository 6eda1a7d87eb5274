"""Fixtures for the serving tests: three subjects trained by the real pipeline
(`tuneqdm-pipeline submit`, tiny 16 px base, a few steps), plus a subject trained on
another base (409) and an unfinished one (404). Ray is started by the fixtures that
need it (num_cpus=2, small object store) and stopped by them (never `ray stop`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from deploy_testkit import DREAMBOOTH, SAMPLES, STEPS, SUBJECTS

# Before Ray starts: its workers inherit this environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def trained_output(tmp_path_factory) -> Path:
    """A submit's --output with subjects dog, cat, backpack (servable, SAMPLES sample
    images each), `alien` (its scale set names another base: 409; no samples) and
    `halfway` (no done.json: 404)."""
    from click.testing import CliRunner

    from tuneqdm.testing import save_tiny_pipeline
    from tuneqdm_cli.main import main

    if not DREAMBOOTH.is_dir():
        pytest.skip(f"{DREAMBOOTH} is not available")
    root = tmp_path_factory.mktemp("deploy")
    base_model = save_tiny_pipeline(root / "tiny-sd")
    lines = ["subject_id,images,class,token"]
    for subject_id, (photos, token) in SUBJECTS.items():
        folder = root / "photos" / subject_id
        folder.mkdir(parents=True)
        for photo in sorted((DREAMBOOTH / photos).glob("*.jpg"))[:2]:
            shutil.copy(photo, folder / photo.name)
        lines.append(f"{subject_id},{folder},{subject_id},{token}")
    csv = root / "subjects.csv"
    csv.write_text("\n".join(lines) + "\n")
    output = root / "out"
    result = CliRunner().invoke(main, [
        "submit", str(csv), "--output", str(output), "--base-model", str(base_model),
        "--steps", "4", "--lr-scale-out", "5e-3", "--actors", "1", "--cpus-per-actor", "1",
        "--samples", str(SAMPLES), "--sample-steps", "2"])
    assert result.exit_code == 0, result.output
    _forge_alien(output)
    halfway = output / "subjects" / "halfway"
    halfway.mkdir()
    (halfway / "meta.json").write_text(json.dumps({"subject_id": "halfway"}))
    return output


def _forge_alien(output: Path) -> None:
    """`alien`: dog's scales relabelled as trained on another base, written the way the
    pipeline writes subjects (so only the fingerprint is wrong)."""
    from pipeline.store import Storage, write_subject
    from tuneqdm.scaleset import ScaleSet

    dog = output / "subjects" / "dog"
    scale_set = ScaleSet.from_bytes((dog / "scales.safetensors").read_bytes())
    scale_set.base_fingerprint = "0" * 64
    scale_set.subjects = [{"subject_id": "alien", "token": "sks", "class_noun": "dog"}]
    meta = json.loads((dog / "meta.json").read_text())
    meta.update(subject_id="alien", base={**meta["base"], "fingerprint": "0" * 64})
    write_subject(Storage(str(output)), "alien", scale_set.to_bytes(), meta, [])


@pytest.fixture(scope="session")
def base_dir(trained_output) -> Path:
    (base,) = [p for p in (trained_output / "bases").iterdir() if not p.name.startswith(".")]
    return base


@pytest.fixture(scope="session")
def scale_sets(trained_output) -> dict:
    from tuneqdm.scaleset import ScaleSet

    return {s: ScaleSet.load(trained_output / "subjects" / s / "scales.safetensors")
            for s in SUBJECTS}


@pytest.fixture(scope="session")
def offline_images(base_dir, scale_sets):
    """reference(subject, prompt, seed, num_images=1, guidance=7.5) -> uint8 arrays made
    by tuneqdm.generate.generate alone (one subject per call, install_scale_sets)."""
    import numpy as np

    from tuneqdm.base import load_quantized_pipeline
    from tuneqdm.generate import generate

    pipe = load_quantized_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    cache: dict = {}

    def reference(subject: str, prompt: str, seed: int, num_images: int = 1,
                  guidance: float = 7.5, steps: int = STEPS):
        key = (subject, prompt, seed, num_images, guidance, steps)
        if key not in cache:
            images = generate(pipe, [prompt], scale_sets[subject], seed=seed,
                              num_inference_steps=steps, guidance_scale=guidance,
                              height=16, width=16, num_images_per_prompt=num_images)
            cache[key] = [np.asarray(image).astype(np.int16) for image in images]
        return cache[key]

    return reference
