"""Preemption: an actor that dies after a checkpoint (the test hook
TUNEQDM_TEST_EXIT_AT_STEP makes the worker process exit, as a preempted node's would)
is replaced, and the retry goes on from the last checkpoint, not from step 0:
meta.json and the log say so, the losses cover every step once, the checkpoint is
removed when the subject is finished."""

from __future__ import annotations

import io
import json

import pytest
from pipeline_testkit import DREAMBOOTH, copy_photos, write_csv

from pipeline.actors import hook_runtime_env
from pipeline.run import SubmitConfig, submit
from pipeline.worker import EXIT_AT_STEP_ENV


def test_the_exit_hook_reaches_the_actors_unless_the_job_gives_it(monkeypatch):
    monkeypatch.delenv(EXIT_AT_STEP_ENV, raising=False)
    assert hook_runtime_env() == {}
    monkeypatch.setenv(EXIT_AT_STEP_ENV, "5")
    assert hook_runtime_env() == {"runtime_env": {"env_vars": {EXIT_AT_STEP_ENV: "5"}}}


def test_a_preempted_subject_resumes_from_its_last_checkpoint(ray_session, tiny_base_model,
                                                              tmp_path, monkeypatch):
    if not DREAMBOOTH.is_dir():
        pytest.skip(f"{DREAMBOOTH} is not available")
    csv = write_csv(tmp_path / "subjects.csv",
                    [{"subject_id": "dog", "images": str(copy_photos("dog", tmp_path / "dog", 2)),
                      "class": "dog"}])
    out = tmp_path / "out"
    # 6 steps, a checkpoint after steps 2 and 4, the actor's process exits after step 5
    monkeypatch.setenv(EXIT_AT_STEP_ENV, "5")
    config = SubmitConfig(manifest=str(csv), output=str(out), base_model=tiny_base_model,
                          steps=6, batch_size=1, lr_scale_out=1e-3, samples=0, actors=1,
                          cpus_per_actor=1, checkpoint_every=2, device="cpu")
    err = io.StringIO()
    report = submit(config, out=io.StringIO(), err=err, live_progress=False)
    assert report.exit_code == 0, err.getvalue()[-3000:]
    assert "resumed  dog from its checkpoint at step 4" in err.getvalue(), err.getvalue()
    meta = json.loads((out / "subjects" / "dog" / "meta.json").read_text())
    assert meta["attempt"] == 2
    assert meta["resumed_from_step"] == 4
    assert meta["steps"] == 6 and len(meta["losses"]) == 6
    assert not (out / "subjects" / "dog" / "checkpoint").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 1
    assert summary["actors_replaced"]
