"""The training-step harness of benchmarks/train_memory.py: one method's model, its
batches and its steps, measured in one process (`run_child`) or interleaved with other
methods (`run_paired`). See train_memory.py for the harness and the methods.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

from _common import (
    add_lora,
    build_sd15_unet,
    markdown_table,
    peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
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


def setup_method(method: str, bits: int):
    """Build the UNet for `method`; return (unet, trainable parameters)."""
    unet = build_sd15_unet(seed=0)
    if method == "full":
        return unet, [p for p in unet.parameters() if p.requires_grad]
    if method == "lora":
        add_lora(unet)
        return unet, [p for p in unet.parameters() if p.requires_grad]
    from tuneqdm import QuantConfig, quantize_

    if method in ("peqa", "plain-peqa"):
        config = QuantConfig.peqa(bits=bits)
    else:
        config = QuantConfig(bits=bits, num_experts=4)
    if method.startswith("plain"):
        from plain_formula import plain_quantize_

        plain_quantize_(unet, config)
    else:
        quantize_(unet, config)  # experts follow the UNet's timestep argument by themselves
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
