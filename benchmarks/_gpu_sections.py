"""The measured sections of benchmarks/gpu_check.py (training, generation, mixed batch).

Each takes a `Settings` (device, dtype, sizes: full on a GPU, reduced on the CPU) and
returns JSON-ready rows. Peak GPU memory is torch.cuda.max_memory_allocated after a
reset at the start of the measured part (None on the CPU).
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import SD15_UNET_CONFIG, add_lora
from _speed import (
    REDUCED_SD_CONFIG,
    Variant,
    build_unet,
    cast_float_tensors,
    interleave,
    sd_unets,
    unet_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_METHODS = ("full", "lora", "peqa", "tuneqdm", "plain")
TRAIN_LABELS = {
    "full": "full fine-tuning (fp32 weights)",
    "lora": "LoRA r=4 (to_q, to_k, to_v, to_out.0)",
    "peqa": "PEQA 4-bit (ours)",
    "tuneqdm": "TuneQDM N=4 4-bit (ours)",
    "plain": "TuneQDM N=4 4-bit, plain dequantize-then-matmul formula",
}


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    reduced: bool
    latent: int  # training and generation latent size (64: 512 px)
    train_steps: int
    denoise_steps: int
    batches: tuple[int, ...]
    rounds: int


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- training


def training_model(method: str, s: Settings):
    """(unet, trainable parameters) on the device: frozen tensors in s.dtype, trainable
    ones float32 (full fine-tuning keeps fp32 weights, as mixed precision does)."""
    from tuneqdm import QuantConfig, enable_timestep_experts, quantize_

    unet = build_unet(s.reduced)
    config = QuantConfig.peqa(bits=4) if method == "peqa" else QuantConfig(bits=4, num_experts=4)
    if method == "lora":
        add_lora(unet)
    elif method in ("peqa", "tuneqdm"):
        quantize_(unet, config)
        enable_timestep_experts(unet)
    elif method == "plain":
        from plain_formula import plain_quantize_

        plain_quantize_(unet, config)
    unet.to(s.device)
    if method != "full":
        cast_float_tensors(unet, s.dtype)  # scales and the grid stay fp32
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return unet, [p for p in unet.parameters() if p.requires_grad]


def training_row(method: str, s: Settings) -> dict:
    """Seconds per step (median) and peak GPU memory of one method's training steps."""
    from diffusers import DDPMScheduler

    unet, trainable = training_model(method, s)
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5 if method in ("full", "lora") else 3e-6)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    resident = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else None
    reset_peak(s.device)
    generator = torch.Generator().manual_seed(1)
    config = REDUCED_SD_CONFIG if s.reduced else SD15_UNET_CONFIG
    times, losses = [], []
    for step in range(s.train_steps + 1):  # step 0 warms up
        latents = torch.randn(1, 4, s.latent, s.latent, generator=generator).to(s.device)
        noise = torch.randn(latents.shape, generator=generator).to(s.device)
        t = torch.randint(0, 1000, (1,), generator=generator).to(s.device)
        text = torch.randn(1, 77, config["cross_attention_dim"], generator=generator)
        start = time.perf_counter()
        with torch.autocast(s.device.type, dtype=s.dtype, enabled=s.dtype != torch.float32):
            noisy = scheduler.add_noise(latents, noise, t.cpu()).to(s.device)
            prediction = unet(noisy, t, encoder_hidden_states=text.to(s.device)).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises
        if step:
            times.append(time.perf_counter() - start)
    row = {
        "method": method,
        "label": TRAIN_LABELS[method],
        "trainable": sum(p.numel() for p in trainable),
        "median_step_s": statistics.median(times),
        "step_s": times,
        "peak_gpu_bytes": peak_bytes(s.device),
        "resident_gpu_bytes": resident,
        "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }
    del unet, trainable, optimizer
    free(s.device)
    return row


# ----------------------------------------------------------------------------- generation


def denoise_run(unet, batch: int, s: Settings):
    """A `run()` that denoises `batch` latents for s.denoise_steps DDIM steps with
    classifier-free guidance (UNet batch 2 x batch): the UNet's part of generation."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sample, _, text = unet_inputs(2 * batch, s.reduced, s.device, s.dtype, latent=s.latent)

    def run():
        scheduler.set_timesteps(s.denoise_steps)
        latents = sample[:batch]
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_input = torch.cat([latents, latents])
                eps = unet(model_input, t.to(s.device), encoder_hidden_states=text).sample
                uncond, cond = eps.chunk(2)
                latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
        return latents

    return run


def generation_rows(s: Settings) -> list[dict]:
    """float vs 4-bit vs 8-bit vs 4-bit cached, per batch size, interleaved."""
    from tuneqdm.inference import cache_expanded_weights

    models = sd_unets([4, 8], s.reduced, s.device, s.dtype)
    cached = sd_unets([4], s.reduced, s.device, s.dtype)["w4"]
    cache_bytes = cache_expanded_weights(cached, s.dtype)
    models["w4-cached"] = cached
    rows = []
    for batch in s.batches:
        variants = [Variant(name, denoise_run(m, batch, s)) for name, m in models.items()]
        for row in interleave(variants, s.rounds, s.device):
            row.update(batch=batch, steps=s.denoise_steps, px=8 * s.latent)
            if row["name"] == "w4-cached":
                row["cache_bytes"] = cache_bytes
            rows.append(row)
    del models, cached
    free(s.device)
    return rows


# ----------------------------------------------------------------------------- mixed batch


def synthetic_scale_sets(unet, count: int) -> list:
    """`count` scale sets drawn around the initial scales (x (1 + 0.05 eps)); the UNet's
    own scales are restored after."""
    from tuneqdm.model import quantized_layers
    from tuneqdm.scaleset import ScaleSet

    layers = quantized_layers(unet).values()
    params = [p for layer in layers for p in (layer.scale_out, layer.scale_in) if p is not None]
    saved = [(p, p.detach().clone()) for p in params]
    generator = torch.Generator().manual_seed(0)
    sets = []
    with torch.no_grad():
        for i in range(count):
            for param, initial in saved:
                eps = torch.randn(initial.shape, generator=generator).to(initial.device)
                param.copy_(initial * (1 + 0.05 * eps))
            subject = {"subject_id": f"subject-{i}", "token": "sks", "class_noun": "star"}
            sets.append(ScaleSet.from_model(unet, subjects=[subject]))
        for param, initial in saved:
            param.copy_(initial)
    return sets


def mixed_batch_rows(s: Settings, subjects: int) -> dict:
    """The toy base, 4-bit TuneQDM N=4, served: `subjects` prompts for as many subjects
    in one batch vs the same prompts for one subject (tuneqdm.generate)."""
    from tuneqdm import QuantConfig
    from tuneqdm.base import load_quantized_pipeline, quantize_pipeline
    from tuneqdm.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        quantize_pipeline(ROOT / "models" / "toyworld-base", tmp, QuantConfig(bits=4))
        pipe = load_quantized_pipeline(tmp, s.device, s.dtype)
    pipe.set_progress_bar_config(disable=True)
    sets = synthetic_scale_sets(pipe.unet, subjects)
    prompts = ["a sks star on a blue floor"] * subjects
    images = {}

    def run(name, scale_sets):
        def call():
            images[name] = generate(
                pipe, prompts, scale_sets=scale_sets, seed=0, num_inference_steps=s.denoise_steps
            )

        return call

    variants = [Variant("one subject", run("one", sets[0])), Variant("mixed", run("mixed", sets))]
    rows = interleave(variants, s.rounds, s.device)
    first = [
        torch.tensor(list(images[key][0].getdata()), dtype=torch.float32)
        for key in ("one", "mixed")
    ]
    last_differs = images["one"][-1].tobytes() != images["mixed"][-1].tobytes()
    return {
        "rows": rows,
        "subjects": subjects,
        "steps": s.denoise_steps,
        # prompt 0 uses subject 0 in both batches: the same image up to kernel order
        "prompt0_max_pixel_diff": float((first[0] - first[1]).abs().max()),
        "last_prompt_differs": last_differs,  # another subject: another image
    }
