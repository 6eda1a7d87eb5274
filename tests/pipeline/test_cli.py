"""The click CLI without Ray: input errors exit with status 2 before anything starts,
with messages naming file, line and column; `status` reads storage alone; the
progress line and the summary table render what they should."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from pipeline_testkit import copy_photos, write_csv

from pipeline.manifest import Job, SubjectSpec
from pipeline.progress import ProgressDisplay
from pipeline.store import Storage, write_subject
from pipeline.summary import format_table, row, write_summary
from tuneqdm_cli.main import main


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if a command tries to reach Ray."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init must not be called for invalid input")

    monkeypatch.setattr(ray, "init", refuse)


def _submit(args):
    return CliRunner().invoke(main, ["submit", *args])


def test_bad_csv_exits_2_and_names_file_line_and_column(tmp_path, no_ray):
    photos = copy_photos("dog", tmp_path / "dog", 1)
    csv = write_csv(tmp_path / "subjects.csv", [
        {"subject_id": "dog", "images": str(photos), "class": "dog"},
        {"subject_id": "../escape", "images": str(photos), "class": "dog"},
        {"subject_id": "Upper Case", "images": str(tmp_path / "nowhere"), "class": "dog"},
    ])
    result = _submit([str(csv), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"Error: 3 problem(s) in {csv}; nothing was launched:" in result.output
    assert f"{csv}:3: column subject_id: '../escape' is not a valid id" in result.output
    assert f"{csv}:4: column subject_id: 'Upper Case' is not a valid id" in result.output
    assert f"{csv}:4: column images: cannot list" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_column_and_missing_file(tmp_path, no_ray):
    csv = tmp_path / "s.csv"
    csv.write_text("subject_id,images,class,colour\n")
    result = _submit([str(csv)])
    assert result.exit_code == 2
    assert f"{csv}:1: column colour: unknown column; allowed:" in result.output
    missing = _submit([str(tmp_path / "missing.csv")])
    assert missing.exit_code == 2 and "missing.csv:0: file not found" in missing.output


@pytest.mark.parametrize("option, message", [
    (["--bits", "5"], "QuantConfig.bits=5 is invalid"),
    (["--method", "peqa", "--experts", "4"], "QuantConfig.num_experts=4 is invalid"),
    (["--steps", "0"], "TrainConfig.steps=0 is invalid"),
    (["--resolution", "30"], "TrainConfig.resolution=30 is invalid"),
    (["--max-retries", "-1"], "--max-retries -1 is invalid"),
    (["--actors", "0"], "--actors 0 is invalid: must be >= 1"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor 0.0 is invalid"),
    (["--storage-option", "novalue"], "use key=value"),
    (["--method", "lora"], "Invalid value for '--method'"),
    (["--base-model", "./not/here"], "no such folder"),
])
def test_bad_options_exit_2(tmp_path, no_ray, option, message):
    photos = copy_photos("dog", tmp_path / "dog", 1)
    csv = write_csv(tmp_path / "s.csv", [{"subject_id": "dog", "images": str(photos),
                                          "class": "dog"}])
    result = _submit([str(csv), "--output", str(tmp_path / "out"), *option])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_status_from_storage_alone(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["status", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output

    storage = Storage(str(tmp_path / "out"))
    meta = {"status": "done", "base": {"fingerprint": "f" * 64}, "spec_hash": "h",
            "final_loss": 0.25, "seconds": 3.5, "steps": 10, "group": None}
    write_subject(storage, "dog", b"scales", meta, [])
    storage.write_bytes("subjects/cat/scales.safetensors", b"partial")  # no done.json
    write_summary(storage, {"run_id": "r1", "subjects": [
        row("dog", status="done", final_loss=0.25, seconds=3.5),
        row("cat", status="failed", reason="bad image: x.jpg: too small"),
        row("bird", status="failed", reason="training failed: loss became nan"),
    ]})
    result = runner.invoke(main, ["status", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["subject", "status", "final", "loss", "seconds", "output", "/",
                                "reason"]
    assert any(line.startswith("dog") and "done" in line and "0.2500" in line for line in lines)
    assert any(line.startswith("cat") and "too small" in line for line in lines)
    assert any(line.startswith("bird") and "loss became nan" in line for line in lines)
    assert "3 subject(s): 1 done, 2 failed; last run r1" in result.output
    as_json = json.loads(runner.invoke(main, ["status", str(tmp_path / "out"), "--json"]).output)
    assert [r["subject_id"] for r in as_json] == ["bird", "cat", "dog"]


def test_progress_line_and_events():
    stream = io.StringIO()
    display = ProgressDisplay(total_subjects=4, stream=stream, live=True)
    pair = Job("pair", (SubjectSpec("a", (), "dog"), SubjectSpec("b", (), "dog")))
    solo = Job("solo", (SubjectSpec("solo", (), "cat"),))
    display.event({"event": "started", "job": pair, "actor": "x-0", "attempt": 1})
    display.event({"event": "started", "job": solo, "actor": "x-1", "attempt": 1})
    display.update_steps({"pair": {"step": 12, "total": 40, "loss": 0.1234}})
    assert display.line() == ("[--------------------] 0/4 done · 0 failed · 3 running | "
                              "pair 12/40 0.123 | solo loading")
    display.event({"event": "finished", "job": pair, "actor": "x-0", "attempt": 1,
                   "result": {"status": "done", "final_loss": 0.5, "seconds": 2.0}})
    display.event({"event": "finished", "job": solo, "actor": "x-1", "attempt": 1,
                   "result": {"status": "failed", "reason": "bad image"}})
    assert display.line().startswith("[###############-----] 2/4 done · 1 failed · 0 running")
    display.close()
    text = stream.getvalue()
    assert "done     pair (loss 0.5000, 2.0 s)  [2/4]" in text
    assert "FAILED   solo: bad image" in text
    assert "\r\x1b[2K" in text  # redrawn in place on a terminal

    plain = io.StringIO()
    quiet = ProgressDisplay(total_subjects=1, stream=plain, live=False)
    quiet.event({"event": "started", "job": solo, "actor": "x-1", "attempt": 2})
    assert plain.getvalue() == "started  solo on x-1 (attempt 2)\n"


def test_summary_table_truncates_reasons():
    table = format_table([row("dog", status="failed", reason="x" * 200),
                          row("cat", group="pets", status="done", final_loss=0.1, seconds=1,
                              output="/o/cat")])
    lines = table.splitlines()
    assert lines[2].rstrip().endswith("x" * 57 + "...")
    assert lines[3].startswith("cat (pets)") and "/o/cat" in lines[3]
