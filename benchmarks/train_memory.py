"""Training-step memory and speed on the SD v1.5 UNet (DESIGN section 6's harness).

Each method runs in its own subprocess (so peaks do not mix), one after another:

    full       full-precision fine-tuning, every UNet parameter trainable
    lora       LoRA r=4 (peft) on to_q, to_k, to_v, to_out.0, float base frozen
    peqa       ours: tuneqdm.quantize_ with QuantConfig.peqa (s_out only)
    tuneqdm    ours: tuneqdm.quantize_, N=4 experts (s_out and s_in), timestep routing
    plain      TuneQDM N=4 the published implementation's way (plain_formula.py)
    plain-peqa PEQA the published implementation's way (plain_formula.py)

Harness: random weights, latents (1, 4, 32, 32), random timestep, random
encoder_hidden_states (1, 77, 768), epsilon MSE, backward, AdamW step, fp32 on CPU.
Memory: peak RSS during the training steps (VmHWM, reset after setup: the
benchmark builds a float UNet first, which production never does for quantized
training, since it loads the quantized base); the setup peak is reported apart.
Speed: median wall and CPU seconds per step after the warm-up steps; the machine's
load average is recorded, since a shared machine's other jobs inflate wall time.

    nice -n 10 .venv/bin/python benchmarks/train_memory.py --json outputs/train_memory.json

--paired runs several methods' steps interleaved in one process instead (timing only),
the robust way to compare speeds on a shared machine:

    nice -n 10 .venv/bin/python benchmarks/train_memory.py --paired peqa@8 tuneqdm@8 \
        peqa@4 tuneqdm@4 --rounds 6 --json outputs/train_paired.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    GIB,
    build_sd15_unet,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
    write_json,
)

METHODS = ("full", "lora", "peqa", "tuneqdm", "plain", "plain-peqa")
QUANTIZED = ("peqa", "tuneqdm", "plain", "plain-peqa")
LABELS = {
    "full": "full-precision fine-tuning",
    "lora": "LoRA r=4 (to_q, to_k, to_v, to_out.0)",
    "peqa": "PEQA (ours)",
    "tuneqdm": "TuneQDM N=4 (ours)",
    "plain": "TuneQDM N=4, plain formula (published way)",
    "plain-peqa": "PEQA, plain formula (published way)",
}
LEARNING_RATES = {"full": 5e-6, "lora": 1e-4}  # scales: 3e-6 (the paper's recipe)
DEFAULT_RUNS = (
    "full",
    "lora",
    "peqa@8",
    "tuneqdm@8",
    "plain@8",
    "plain-peqa@8",
    "peqa@4",
    "tuneqdm@4",
)


# ----------------------------------------------------------------------------- child


def setup_method(method: str, bits: int):
    """Build the UNet for `method`; return (unet, trainable parameters)."""
    unet = build_sd15_unet(seed=0)
    if method == "full":
        return unet, [p for p in unet.parameters() if p.requires_grad]
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        return unet, [p for p in unet.parameters() if p.requires_grad]
    from tuneqdm import QuantConfig, enable_timestep_experts, quantize_

    if method in ("peqa", "plain-peqa"):
        config = QuantConfig.peqa(bits=bits)
    else:
        config = QuantConfig(bits=bits, num_experts=4)
    if method.startswith("plain"):
        from plain_formula import plain_quantize_

        plain_quantize_(unet, config)
    else:
        quantize_(unet, config)
        if config.num_experts > 1:
            enable_timestep_experts(unet)
    return unet, [p for p in unet.parameters() if p.requires_grad]


def make_batch(generator):
    """One training batch of the harness: latents, noise, timestep, text embeddings."""
    import torch

    return (
        torch.randn(1, 4, 32, 32, generator=generator),  # latents (B, 4, h, w)
        torch.randn(1, 4, 32, 32, generator=generator),  # noise
        torch.randint(0, 1000, (1,), generator=generator),  # timestep (B,)
        torch.randn(1, 77, 768, generator=generator),  # encoder_hidden_states (B, 77, 768)
    )


def train_step(unet, optimizer, scheduler, batch) -> float:
    """Noise, predict, epsilon MSE, backward, AdamW step; returns the loss."""
    import torch.nn.functional as F

    latents, noise, timesteps, text = batch
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
    loss = F.mse_loss(prediction, noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def prepare(method: str, bits: int):
    """(unet, trainable parameters, optimizer, noise scheduler) for one method."""
    import torch
    from diffusers import DDPMScheduler

    unet, trainable = setup_method(method, bits)
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATES.get(method, 3e-6))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return unet, trainable, optimizer, scheduler


def run_child(method: str, bits: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    unet, trainable, optimizer, scheduler = prepare(method, bits)
    generator = torch.Generator().manual_seed(1)
    setup_s = time.perf_counter() - t0
    gc.collect()
    release_free_memory()
    rss_setup = rss_bytes()
    peak_setup = peak_rss_bytes()  # includes building the float UNet
    peak_reset = reset_peak_rss()

    times, cpu_times, losses = [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(warmup + steps):
        batch = make_batch(generator)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_step(unet, optimizer, scheduler, batch))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    measured = times[warmup:]
    return {
        "method": method,
        "bits": bits if method in QUANTIZED else None,
        "trainable": sum(p.numel() for p in trainable),
        "lr": optimizer.param_groups[0]["lr"],
        "setup_s": setup_s,
        "rss_after_setup_bytes": rss_setup,
        "peak_train_bytes": peak_rss_bytes() if peak_reset else None,
        "peak_setup_bytes": peak_setup,
        "step_s": measured,
        "median_step_s": statistics.median(measured),
        "step_cpu_s": cpu_times[warmup:],
        "median_step_cpu_s": statistics.median(cpu_times[warmup:]),
        "warmup_s": times[:warmup],
        "load_average": [load_before, os.getloadavg()[0]],
        "losses": losses,
        "threads": threads,
    }


def run_paired(runs: list[tuple[str, int]], rounds: int, threads: int) -> dict:
    """Step times of several methods held in ONE process, steps interleaved.

    On a shared machine other jobs come and go within minutes, so methods measured
    one after another see different loads. Here every round runs one step of each
    method (order rotated each round), so all see the same load, and the per-round
    ratios to the first method are robust. Memory is not measured (models coexist);
    meant for the quantized methods and LoRA (a few GiB each).
    """
    import torch

    torch.set_num_threads(threads)
    prepared = [prepare(method, bits) for method, bits in runs]
    gc.collect()
    release_free_memory()
    generator = torch.Generator().manual_seed(1)
    times: list[list[float]] = [[] for _ in runs]
    cpu_times: list[list[float]] = [[] for _ in runs]
    for round_index in range(rounds + 1):  # round 0 is the warm-up
        batch = make_batch(generator)
        shift = round_index % len(runs)
        for i in list(range(len(runs)))[shift:] + list(range(len(runs)))[:shift]:
            unet, _, optimizer, scheduler = prepared[i]
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(unet, optimizer, scheduler, batch)
            if round_index:
                times[i].append(time.perf_counter() - start)
                cpu_times[i].append(time.process_time() - cpu_start)
        print(f"round {round_index}: load {os.getloadavg()[0]:.1f}", flush=True)

    def median_ratios(measure: list[list[float]]) -> list[float]:
        return [
            statistics.median(t / base for t, base in zip(series, measure[0], strict=True))
            for series in measure
        ]

    ratios, cpu_ratios = median_ratios(times), median_ratios(cpu_times)
    return {
        "runs": [
            {
                "method": method,
                "bits": bits if method in QUANTIZED else None,
                "step_s": series,
                "median_step_s": statistics.median(series),
                "median_ratio_to_first": ratio,
                "step_cpu_s": cpu_series,
                "median_step_cpu_s": statistics.median(cpu_series),
                "median_cpu_ratio_to_first": cpu_ratio,
            }
            for (method, bits), series, ratio, cpu_series, cpu_ratio in zip(
                runs, times, ratios, cpu_times, cpu_ratios, strict=True
            )
        ],
        "rounds": rounds,
        "threads": threads,
    }


def paired_table(paired: dict) -> str:
    first = paired["runs"][0]
    rows = [
        {
            "method": LABELS[r["method"]],
            "bits": r["bits"] or "fp32",
            "step": f"{r['median_step_s']:.2f}",
            "ratio": f"{r['median_ratio_to_first']:.3f}",
            "cpu": f"{r['median_step_cpu_s']:.2f}",
            "cpu_ratio": f"{r['median_cpu_ratio_to_first']:.3f}",
            "steps": " ".join(f"{s:.1f}" for s in r["step_s"]),
        }
        for r in paired["runs"]
    ]
    columns = [
        ("method", "method"),
        ("bits", "bits"),
        ("step", "median s/step"),
        ("ratio", f"median per-round ratio to {LABELS[first['method']]}@{first['bits']}"),
        ("cpu", "median CPU s/step"),
        ("cpu_ratio", "median per-round CPU ratio"),
        ("steps", "steps s"),
    ]
    return markdown_table(rows, columns)


# ----------------------------------------------------------------------------- parent


def parse_run(spec: str) -> tuple[str, int]:
    method, _, bits = spec.partition("@")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {method!r}; one of {METHODS}")
    if method in QUANTIZED:
        if bits not in ("2", "3", "4", "8"):
            raise argparse.ArgumentTypeError(f"{spec!r}: write {method}@BITS, BITS in 2,3,4,8")
        return method, int(bits)
    if bits:
        raise argparse.ArgumentTypeError(f"{spec!r}: {method} takes no @BITS")
    return method, 0


def run_in_subprocess(method: str, bits: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            method,
            "--child-bits",
            str(bits),
            "--child-result",
            str(result_path),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            return {"method": method, "bits": bits, "error": f"exit {completed.returncode}"}
        return json.loads(result_path.read_text())


def gib(value) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


def summarise(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"method": LABELS[r["method"]], "bits": r["bits"], "peak": r["error"]})
            continue
        rows.append(
            {
                "method": LABELS[r["method"]],
                "bits": r["bits"] or "fp32",
                "trainable": f"{r['trainable']:,}",
                "setup": gib(r["rss_after_setup_bytes"]),
                "peak": gib(r["peak_train_bytes"]),
                "process": gib(r["peak_setup_bytes"]),
                "step": f"{r['median_step_s']:.2f}",
                "cpu": f"{r['median_step_cpu_s']:.2f}",
                "steps": " ".join(f"{s:.1f}" for s in r["step_s"]),
                "load": " / ".join(f"{x:.1f}" for x in r["load_average"]),
            }
        )
    columns = [
        ("method", "method"),
        ("bits", "bits"),
        ("trainable", "trainable numbers"),
        ("setup", "RSS after setup GiB"),
        ("peak", "peak during training GiB"),
        ("process", "setup peak GiB"),
        ("step", "median s/step"),
        ("cpu", "median CPU s/step"),
        ("steps", "measured steps s"),
        ("load", "load avg before / after"),
    ]
    return markdown_table(rows, columns)


def check_targets(results: list[dict]) -> list[dict]:
    """The issue's targets, for every bit width that has the runs they compare."""
    by_key = {(r["method"], r["bits"]): r for r in results if "error" not in r}
    full = by_key.get(("full", None))
    checks = []
    for bits in sorted({b for m, b in by_key if m == "tuneqdm"}):
        ours = by_key[("tuneqdm", bits)]
        plain = by_key.get(("plain", bits)) or by_key.get(("plain", 8))
        peqa = by_key.get(("peqa", bits))
        if plain:
            ratio = ours["peak_train_bytes"] / plain["peak_train_bytes"]
            checks.append(
                {
                    "target": f"TuneQDM@{bits} peak <= 0.6 x plain@{plain['bits']}",
                    "value": round(ratio, 3),
                    "met": ratio <= 0.6,
                }
            )
        if full:
            ratio = ours["peak_train_bytes"] / full["peak_train_bytes"]
            checks.append(
                {
                    "target": f"TuneQDM@{bits} peak <= 0.35 x full FT",
                    "value": round(ratio, 3),
                    "met": ratio <= 0.35,
                }
            )
        if peqa:
            ratio = ours["median_step_s"] / peqa["median_step_s"]
            checks.append(
                {
                    "target": f"TuneQDM@{bits} s/step <= 1.3 x PEQA@{bits}",
                    "value": round(ratio, 3),
                    "met": ratio <= 1.3,
                }
            )
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        type=parse_run,
        default=None,
        help=f"METHOD or METHOD@BITS; default: {' '.join(DEFAULT_RUNS)}",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 1 measured step")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--paired",
        nargs="+",
        type=parse_run,
        default=None,
        help="instead: interleaved step timing of these runs in one process (no memory)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --paired")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-bits", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_child(args.child, args.child_bits, args.warmup, args.steps, args.threads)
        args.child_result.write_text(json.dumps(result))
        return
    if args.quick:
        args.warmup, args.steps, args.rounds = 1, 1, 1
    if args.paired:
        paired = run_paired(args.paired, args.rounds, args.threads)
        table = paired_table(paired)
        print()
        print(table)
        paired.update(table=table, machine=machine_info(), command=sys.argv)
        write_json(args.json, paired)
        return
    runs = args.runs or [parse_run(spec) for spec in DEFAULT_RUNS]
    results = []
    for method, bits in runs:
        print(f"--- {LABELS[method]}" + (f" @ {bits} bits" if bits else ""), flush=True)
        result = run_in_subprocess(method, bits, args)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    table = summarise(results)
    checks = check_targets(results)
    print()
    print(table)
    for check in checks:
        print(f"{'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['value']}")
    write_json(
        args.json,
        {
            "results": results,
            "targets": checks,
            "table": table,
            "warmup": args.warmup,
            "steps": args.steps,
            "machine": machine_info(),
            "command": sys.argv,
        },
    )


if __name__ == "__main__":
    main()
