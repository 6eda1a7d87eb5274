"""`tuneqdm-pipeline serve` and `generate`: option checks and errors without Ray,
and the blocking `serve` in a process of its own, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from deploy_testkit import STEPS, free_port
from PIL import Image

from tuneqdm_cli.main import main


@pytest.mark.parametrize(("args", "expected"), [
    (["--replicas", "2", "--min-replicas", "1", "--max-replicas", "3"], "not both"),
    (["--min-replicas", "1"], "needs both --min-replicas and --max-replicas"),
    (["--max-images", "9"], "max_images 9 > max_batch_images 8"),
    (["--default-steps", "200"], "default_steps=200 is invalid"),
    (["--max-subjects-per-replica", "0"], "0 is not in the range 1<=x<=4096"),
    (["--port", "70000"], "70000 is not in the range"),
    (["--detach"], "--detach needs --address"),
    (["--base", "nope"], "no complete quantized base 'nope'"),
    (["--storage-option", "novalue"], "use key=value"),
    (["--num-cpus", "2", "--replicas", "2", "--num-cpus-per-replica", "1"],
     "2 replica(s) x 1 CPU + ingress 0.1 CPU = 2.1 CPUs, the cluster has 2"),
])
def test_serve_refuses_bad_options_before_starting_anything(trained_output, args, expected):
    result = CliRunner().invoke(main, ["serve", str(trained_output), *args])
    assert result.exit_code != 0
    assert expected in " ".join(result.output.split()), result.output


def test_serve_and_generate_refuse_a_missing_output(tmp_path):
    for command in (["serve"], ["generate"]):
        args = [*command, str(tmp_path / "missing")] + (["dog", "x"] if command == [
            "generate"] else [])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize(("subject", "code", "expected"), [
    ("nobody", 1, "subject 'nobody' not found"),
    ("alien", 1, "trained on base 000000000000"),
    ("Bad_Id", 2, "subject id 'Bad_Id' is invalid"),
])
def test_generate_errors(trained_output, tmp_path, subject, code, expected):
    result = CliRunner().invoke(main, ["generate", str(trained_output), subject, "x",
                                       "-o", str(tmp_path / "x.png")])
    assert result.exit_code == code, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_generate_writes_numbered_images(trained_output, tmp_path):
    result = CliRunner().invoke(main, [
        "generate", str(trained_output), "dog", "a photo of {token} {class_noun}",
        "-o", str(tmp_path / "dog.png"), "--num-images", "2", "--steps", "2",
        "--seed", "3", "--height", "24", "--width", "16"])
    assert result.exit_code == 0, result.output
    for j in (0, 1):
        with Image.open(tmp_path / f"dog-{j}.png") as image:
            assert image.size == (16, 24)
        assert f"dog-{j}.png  (seed {3 + j}, 16x24, 2 steps)" in result.output
    bad = CliRunner().invoke(main, ["generate", str(trained_output), "dog", "x",
                                    "-o", str(tmp_path / "odd.png"), "--height", "20"])
    assert bad.exit_code == 2 and "multiple of 8" in bad.output


@pytest.mark.parametrize(("value", "expected"), [
    ("1.6", "strength: Input should be less than or equal to 1.5"),
    ("-0.1", "strength: Input should be greater than or equal to 0"),
    ("nan", "strength: Input should be a finite number"),
    ("strong", "'strong' is not a valid float"),
])
def test_generate_refuses_a_strength_out_of_bounds(tmp_path, value, expected):
    """Checked before storage is opened (the output does not even exist), in the words
    of the HTTP API's 422."""
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "missing"), "dog", "x",
                                       "-o", str(tmp_path / "x.png"), "--strength", value])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "x.png").exists()


def test_generate_strength_zero_is_the_untuned_base(trained_output, base_dir, tmp_path):
    """--strength 0 gives exactly the image of the quantized base with its own scales
    s0 (tuneqdm.generate, no scale set), whichever subject; 1 is the subject (the
    default), 0.5 neither."""
    import numpy as np

    from tuneqdm.base import load_quantized_pipeline
    from tuneqdm.generate import generate

    def cli(subject: str, *strength: str) -> bytes:
        path = tmp_path / f"{subject}-{'-'.join(strength) or 'default'}.png"
        result = CliRunner().invoke(main, [
            "generate", str(trained_output), subject, "a photo", "-o", str(path),
            "--steps", str(STEPS), "--seed", "5", *(("--strength", *strength) if strength
                                                      else ())])
        assert result.exit_code == 0, result.output
        return path.read_bytes()

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)

    pipe = load_quantized_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    (base,) = generate(pipe, ["a photo"], None, seed=5, num_inference_steps=STEPS,
                       height=16, width=16)
    base = np.asarray(base).astype(np.int16)
    assert np.array_equal(pixels(cli("dog", "0")), base)
    assert np.array_equal(pixels(cli("cat", "0")), base)
    subject = cli("dog")
    assert cli("dog", "1") == subject and np.abs(pixels(subject) - base).mean() > 0.5
    half = pixels(cli("dog", "0.5"))
    for other in (base, pixels(subject)):
        assert np.abs(half - other).mean() > 0.2


def test_serve_command_runs_until_interrupted(trained_output, tmp_path):
    """The command a user types: a local Ray of its own, HTTP on 127.0.0.1, Ctrl-C stops
    Serve and that Ray."""
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is running in this process")
    port = free_port()
    log = tmp_path / "serve.log"
    cli = Path(sys.executable).with_name("tuneqdm-pipeline")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(cli), "serve", str(trained_output), "--port", str(port), "--num-cpus", "2",
             "--num-cpus-per-replica", "1", "--default-steps", str(STEPS)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 150
        health = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert health is not None and health.status_code == 200, log.read_text()[-3000:]
        image = httpx.post(f"http://127.0.0.1:{port}/v1/subjects/dog/images",
                           json={"prompt": "x", "seed": 1}, timeout=60)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        while "serving at" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # the app answers before serve.run has returned
        assert f"serving at http://127.0.0.1:{port}/" in log.read_text()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "stopping" in log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        if process.poll() is None:  # only the process this test started
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_proxy_location_is_checked():
    from deploy.serve_runner import ServeRunner
    from deploy.settings import ServeSettings

    settings = ServeSettings(output="/nowhere")
    assert ServeRunner(settings, "127.0.0.1", 8000, local=False,
                       proxy_location="HeadOnly").proxy_location == "HeadOnly"
    with pytest.raises(ValueError, match="proxy_location 'Nowhere' is not one of EveryNode"):
        ServeRunner(settings, "127.0.0.1", 8000, local=False, proxy_location="Nowhere")
