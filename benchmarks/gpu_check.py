"""One prepared GPU check (issue "Fast everywhere"): writes results.json and results.md.

    bash scripts/gpu_check.sh OUTDIR                 # on one CUDA GPU, about 5 minutes
    bash scripts/gpu_check.sh OUTDIR --cpu-reduced   # CPU, tiny sizes, about a minute (CI)

Sections, each timed against a total budget (a section that would start past it is
recorded as skipped):

1. cuda_tests: `pytest -m cuda tests/tuneqdm/test_cuda.py` (skipped without CUDA).
2. training: the SD v1.5 UNet config (random weights), latents (1, 4, 64, 64) = 512 px,
   bf16: full fine-tuning (fp32 weights, bf16 autocast), LoRA r=4, PEQA 4-bit,
   TuneQDM N=4 4-bit (ours) and the plain dequantize-then-matmul formula; frozen
   tensors bf16, trainable ones fp32; median seconds per step and peak GPU memory.
3. generation: the UNet's part of generating at 512 px (20 DDIM steps, guidance 7.5)
   for batch 1 and 8: float vs 4-bit vs 8-bit vs 4-bit with cached weights, bf16,
   interleaved; latency and peak GPU memory. (VAE and text encoder excluded: they do
   not change with quantization.)
4. mixed_batch: the toy base served 4-bit: 8 prompts for 8 subjects in one batch vs 8
   prompts for one subject.

--cpu-reduced (or GPU_CHECK_CPU_REDUCED=1): the same code on the CPU in fp32 at CI
sizes (the SD v1.5 layout with 32-64 channels, 16 x 16 latents, 2 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import markdown_table
from _gpu_sections import (
    TRAIN_METHODS,
    Settings,
    generation_rows,
    mixed_batch_rows,
    training_row,
)

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def settings(reduced: bool) -> Settings:
    if reduced:
        return Settings(torch.device("cpu"), torch.float32, True, 16, 1, 2, (1, 2), 1)
    return Settings(torch.device("cuda", 0), torch.bfloat16, False, 64, 5, 20, (1, 8), 2)


def cuda_tests(timeout_s: float) -> dict:
    """The `cuda`-marked tests, in a subprocess; their summary line and exit status."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "tuneqdm" / "test_cuda.py"),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout_s}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "exit_status": done.returncode,
        "summary": lines[-1] if lines else "",
        "output_tail": done.stdout[-4000:] + done.stderr[-2000:],
    }


def run_sections(s: Settings, budget_s: float, save) -> dict:
    """Every section in turn, within `budget_s`; `save(results)` after each, so that a
    run stopped from outside still leaves what it measured."""
    start = time.perf_counter()
    results: dict = {"skipped": [], "training": []}

    def left() -> float:
        return budget_s - (time.perf_counter() - start)

    def done(what: str) -> None:
        results["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{what}: done at {results['seconds']:.0f} s", flush=True)
        save(results)

    results["cuda_tests"] = cuda_tests(max(30.0, min(120.0, left() / 4)))
    done("cuda tests")
    for method in TRAIN_METHODS:
        if left() < budget_s * 0.45:  # keep time for generation and the mixed batch
            results["skipped"].append(f"training {method}: time budget")
            continue
        results["training"].append(training_row(method, s))
        done(f"training {method}")
    if left() > budget_s * 0.15:
        results["generation"] = generation_rows(s)
        done("generation")
    else:
        results["skipped"].append("generation: time budget")
    if left() > 0:
        results["mixed_batch"] = mixed_batch_rows(s, subjects=8 if not s.reduced else 2)
        done("mixed batch")
    else:
        results["skipped"].append("mixed batch: time budget")
    return results


def mb(value) -> str:
    return "" if value is None else f"{value / MB:,.0f}"


def markdown(results: dict) -> str:
    """results.md: the machine, the CUDA tests, then one table per section."""
    s = results["settings"]
    lines = [f"# GPU check ({'CPU, reduced sizes' if s['reduced'] else s['device']})\n",
             f"Machine: {results['machine']}\n"]
    tests = results["cuda_tests"]
    lines.append(f"CUDA tests: {tests.get('summary') or tests.get('status')}\n")
    lines += _training_md(results["training"], s)
    if "generation" in results:
        lines += _generation_md(results["generation"], s)
    if "mixed_batch" in results:
        lines += _mixed_md(results["mixed_batch"])
    if results["skipped"]:
        lines.append("\nSkipped: " + "; ".join(results["skipped"]))
    return "\n".join(lines) + "\n"


def _training_md(training: list[dict], s: dict) -> list[str]:
    full = next((r for r in training if r["method"] == "full"), None)
    rows = [{"method": r["label"], "trainable": f"{r['trainable']:,}",
             "step": f"{r['median_step_s']:.3f}", "peak": mb(r["peak_gpu_bytes"]),
             "resident": mb(r["resident_gpu_bytes"]),
             "vs_full": f"{r['median_step_s'] / full['median_step_s']:.2f}" if full else "",
             "mem_vs_full": (f"{r['peak_gpu_bytes'] / full['peak_gpu_bytes']:.3f}"
                             if full and r["peak_gpu_bytes"] else "")}
            for r in training]
    precision = ("float32 throughout" if s["dtype"] == "float32" else
                 f"frozen tensors {s['dtype']}, trainable ones float32, forward under "
                 f"{s['dtype']} autocast")
    return [f"## Training, latents {s['latent']} x {s['latent']}, {s['dtype']}\n",
            f"{precision}; {s['train_steps']} steps after 1 warm-up, batch 1.\n",
            markdown_table(rows, [("method", "method"), ("trainable", "trainable numbers"),
                                  ("step", "median s/step"), ("vs_full", "step vs full"),
                                  ("peak", "peak GPU MB"), ("mem_vs_full", "memory vs full"),
                                  ("resident", "model resident MB")])]


def _generation_md(generation: list[dict], s: dict) -> list[str]:
    rows = [{"batch": r["batch"], "method": r["name"], "median": f"{r['median_s']:.3f}",
             "ratio": f"{r['ratio']:.3f}", "peak": mb(r.get("peak_gpu_bytes")),
             "cache": mb(r.get("cache_bytes"))} for r in generation]
    return [f"\n## Generation, {8 * s['latent']} px, {s['denoise_steps']} steps\n",
            markdown_table(rows, [("batch", "images"), ("method", "UNet"),
                                  ("median", "median s"), ("ratio", "ratio to float"),
                                  ("peak", "peak GPU MB"), ("cache", "cache MB")])]


def _mixed_md(mixed: dict) -> list[str]:
    rows = [{"case": r["name"], "median": f"{r['median_s']:.3f}", "ratio": f"{r['ratio']:.3f}"}
            for r in mixed["rows"]]
    return [f"\n## Mixed-subject batch ({mixed['subjects']} subjects, toy base)\n",
            markdown_table(rows, [("case", "batch"), ("median", "median s"),
                                  ("ratio", "ratio to one subject")]),
            f"\nprompt 0 max pixel difference: {mixed['prompt0_max_pixel_diff']}"]


def machine() -> str:
    text = f"torch {torch.__version__}, Python {platform.python_version()}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        text += f", {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return text + f", {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument(
        "--cpu-reduced", action="store_true", default=os.environ.get("GPU_CHECK_CPU_REDUCED") == "1"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="default 420 (GPU), 360")
    args = parser.parse_args(argv)
    if not args.cpu_reduced and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-reduced for the CPU run", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.cpu_reduced:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    s = settings(args.cpu_reduced)
    header = {
        "settings": {
            "device": str(s.device),
            "dtype": str(s.dtype).replace("torch.", ""),
            "reduced": s.reduced,
            "latent": s.latent,
            "denoise_steps": s.denoise_steps,
            "train_steps": s.train_steps,
        },
        "machine": machine(),
        "command": sys.argv,
    }
    args.outdir.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        results.update(header)
        (args.outdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (args.outdir / "results.md").write_text(markdown(results))

    budget = args.budget_s or (360.0 if args.cpu_reduced else 420.0)
    results = run_sections(s, budget, save)
    save(results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
