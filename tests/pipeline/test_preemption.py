"""Preemption: an actor that dies after a checkpoint (the test hook
TUNEQDM_TEST_EXIT_AT_STEP makes the worker process exit, as a preempted node's would)
is replaced, and the retry goes on from the last checkpoint, not from step 0:
meta.json and the log say so, the losses cover every step once, the checkpoint is
removed when the subject is finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pipeline_testkit import DREAMBOOTH, copy_photos, write_csv

from pipeline.worker import EXIT_AT_STEP_ENV


@pytest.mark.slow
def test_a_preempted_subject_resumes_from_its_last_checkpoint(tiny_base_model, tmp_path):
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"{DREAMBOOTH} is not available")
    csv = write_csv(tmp_path / "subjects.csv",
                    [{"subject_id": "dog", "images": str(copy_photos("dog", tmp_path / "dog", 2)),
                      "class": "dog"}])
    out = tmp_path / "out"
    # 6 steps, a checkpoint after steps 2 and 4, the process exits after step 5
    env = {**os.environ, EXIT_AT_STEP_ENV: "5", "PYTHONPATH": os.getcwd()}
    run = subprocess.run(
        [sys.executable, "-m", "tuneqdm_cli", "submit", str(csv), "--output", str(out),
         "--base-model", tiny_base_model, "--steps", "6", "--batch-size", "1",
         "--lr-scale-out", "1e-3", "--samples", "0", "--actors", "1",
         "--cpus-per-actor", "1", "--checkpoint-every", "2", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed  dog from its checkpoint at step 4" in run.stderr, run.stderr[-3000:]
    meta = json.loads((out / "subjects" / "dog" / "meta.json").read_text())
    assert meta["attempt"] == 2
    assert meta["resumed_from_step"] == 4
    assert meta["steps"] == 6 and len(meta["losses"]) == 6
    assert not (out / "subjects" / "dog" / "checkpoint").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 1} or summary["counts"].get("done") == 1
    assert summary["actors_replaced"]
