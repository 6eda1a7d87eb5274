"""scripts/gpu_check.sh in its CPU-reduced mode, so that the GPU check cannot rot: the
same sections as on a GPU (benchmarks/gpu_check.py), at CI sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_reduced_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMEOUT_S="900")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--cpu-reduced"],
        capture_output=True, text=True, env=env, timeout=960,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["skipped"] == []
    assert results["settings"]["reduced"] and results["settings"]["device"] == "cpu"
    # the CUDA tests were collected and skipped here (no GPU)
    assert results["cuda_tests"]["exit_status"] == 0
    assert "11 skipped" in results["cuda_tests"]["summary"]
    training = {row["method"]: row for row in results["training"]}
    assert list(training) == ["full", "lora", "peqa", "tuneqdm", "plain"]
    for row in training.values():
        assert row["losses_finite"] and row["median_step_s"] > 0
        assert row["peak_gpu_bytes"] is None  # no GPU: not measured, not made up
    # the scale methods train far fewer numbers than full fine-tuning (5 % in this small
    # layout; 0.3 % in SD v1.5's), PEQA fewer than TuneQDM N=4
    assert training["tuneqdm"]["trainable"] < training["full"]["trainable"] / 10
    assert training["peqa"]["trainable"] < training["tuneqdm"]["trainable"]
    assert training["tuneqdm"]["trainable"] == training["plain"]["trainable"]
    generation = {(row["batch"], row["name"]) for row in results["generation"]}
    assert generation == {(b, m) for b in (1, 2) for m in ("float", "w4", "w8", "w4-cached")}
    cached = [row for row in results["generation"] if row["name"] == "w4-cached"]
    assert all(row["cache_bytes"] > 0 for row in cached)
    mixed = results["mixed_batch"]
    assert [row["name"] for row in mixed["rows"]] == ["one subject", "mixed"]
    # prompt 0 uses subject 0 in both batches: the same image
    assert mixed["prompt0_max_pixel_diff"] <= 2.0
    markdown = (tmp_path / "results.md").read_text()
    assert "## Training" in markdown and "## Generation" in markdown and "Mixed-subject" in markdown


@pytest.mark.slow
def test_generate_speed_quick_mode(tmp_path):
    """benchmarks/generate_speed.py --quick (the CI sizes) runs and reports every method."""
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "generate_speed.py"), "--quick",
         "--json", str(out)],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = {(row["part"], row["name"]) for row in rows}
    assert {("unet", n) for n in ("float", "w4", "w8", "w4-cached")} <= names
    assert {("toy", n) for n in ("float", "w4", "w8", "w4-cached", "w8-cached")} <= names
    for row in rows:
        assert row["median_s"] > 0 and row["ratio"] > 0
        assert (row.get("cache_bytes") or 0) > 0 or "cached" not in row["name"]
