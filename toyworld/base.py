"""The toy world's pretrained text-to-image base: components, training and evaluation.

A small Stable-Diffusion-shaped pipeline (diffusers' StableDiffusionPipeline layout),
trained from scratch on the world's training split (split.py) on CPU:

1. tokenizer (text.py): a CLIP BPE tokenizer over world.VOCABULARY (every word one
   token; the rare subject tokens are in it but never in a training caption, so their
   embeddings keep their random initialisation: valid, untrained);
2. VAE: an AutoencoderKL with hand-set weights that is an exact per-pixel linear
   colour transform (no downsampling, 4 latent channels; vae.py says how and why);
   its scaling_factor makes the training latents unit RMS;
3. UNet2DConditionModel (four levels, 32 -> 4 px, cross-attention at 8x8 and 4x4) and
   CLIPTextModel trained jointly from scratch with the v-prediction loss on
   pre-encoded latents, with random caption dropout (10% empty captions, for
   classifier-free guidance) and an EMA of the weights, which is what gets saved;
4. scheduler: DDIM, cosine ("squaredcos_cap_v2") 1000-step schedule, v-prediction,
   "trailing" timesteps so sampling starts at t = 999 (near-zero SNR).
   Epsilon-prediction was tried first (linear betas): at high noise its loss barely
   depends on the image, so after 2000 steps the model had not learned colours from
   text and sampling from pure noise diverged (1% of held-out images right); with
   v-prediction the high-noise steps train the global layout from the caption.

`train_base(config, out)` runs all of it and saves with `save_pretrained`; a JSON report
(settings, timings, held-out accuracy) goes next to the components as toyworld.json.
With `config.resume_from` it continues a saved base instead (stage 2 of the committed
one: scripts/train_toyworld_base.sh, docs/toyworld.md "Training").
"""

from __future__ import annotations

import copy
import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .evaluate import colour_accuracy, generate, held_out_prompts
from .split import CaptionDropout, sample_training_scene, training_caption
from .text import build_text_encoder, build_tokenizer, tokenize
from .vae import build_vae
from .world import IMAGE_SIZE, Scene, render

LATENT_SIZE = IMAGE_SIZE  # the VAE does not downsample (vae.py)
REPORT_NAME = "toyworld.json"


@dataclass(frozen=True)
class BaseConfig:
    """Settings of `train_base`. Defaults are stage 1 of models/toyworld-base
    (scripts/train_toyworld_base.sh runs all three stages)."""

    seed: int = 0
    # A saved base to continue training (stage 2): its tokenizer, VAE, text encoder and
    # UNet are loaded instead of built; block_out_channels/attention_levels are ignored.
    resume_from: str = ""
    threads: int = 2  # torch threads; results are reproducible for a fixed value
    # UNet: channels per level (32 px first, halving), and how many of the coarsest
    # levels have cross-attention (build_unet)
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    attention_levels: int = 2
    # UNet + text encoder
    dataset_size: int = 20_000  # training-split images, encoded once
    steps: int = 8_000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    # Object pixels (grown by 1 px) weigh 1 + this in the loss: objects cover 10-15% of
    # an image, and with equal weights the background drowns them out.
    object_loss_weight: float = 4.0
    # Object pixels (grown by 1 px) of striped, dotted and checkered objects weigh this
    # much more again: tried as a third stage for patterns, which no stage learnt to
    # draw; it did not help (docs/toyworld_history.md, "Patterns: what a short extra stage...").
    pattern_loss_weight: float = 0.0
    # This fraction of each batch draws its timestep from [high_noise_from, 1000)
    # instead of uniformly (sample_timesteps says why).
    high_noise_fraction: float = 0.0
    high_noise_from: int = 900  # stage 2 and run B of docs/toyworld.md
    ema_decay: float = 0.999
    # held-out evaluation (progress_every: a quick 32-image check in the log)
    progress_every: int = 1000
    eval_images: int = 128
    eval_inference_steps: int = 25
    guidance_scale: float = 4.0
    log_every: int = 100


# -- components --------------------------------------------------------------------


def build_unet(block_out_channels: tuple[int, ...] = (16, 32, 64, 64), attention_levels: int = 2):
    """UNet2DConditionModel on (B, 4, 32, 32) latents: one level per entry of
    `block_out_channels` (32 px, 16 px, ...), cross-attention on the `attention_levels`
    coarsest ones (and the mid block)."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    if not 1 <= attention_levels <= levels or LATENT_SIZE % 2 ** (levels - 1):
        raise ValueError(f"block_out_channels={block_out_channels}, attention_levels="
                         f"{attention_levels}: need 1 <= attention_levels <= levels and "
                         f"{LATENT_SIZE} px divisible by 2 ** (levels - 1)")
    plain = levels - attention_levels
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels
    up = ("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=8,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=64, attention_head_dim=8,
        # The caption, attention-pooled, is also added to the time embedding, so every
        # resnet (also at 32 and 16 px, which have no cross-attention) is conditioned
        # on it. StableDiffusionPipeline needs nothing extra for this.
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         clip_sample=False, set_alpha_to_one=False,
                         timestep_spacing="trailing", prediction_type="v_prediction",
                         steps_offset=1)  # unused by "trailing"; 1 silences the SD pipeline


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


# -- data ---------------------------------------------------------------------------


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] from a list of (H, W, 3) uint8 arrays."""
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- training -----------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(vae, scenes: list[Scene], batch_size: int = 256):
    """Latent means and stds, (N, 4, 32, 32) float32, and masks, (N, 2, 32, 32) bool, of
    the scenes' renderings: channel 0 the object, channel 1 the object if it has a
    pattern (striped, dotted, checkered), else empty."""
    means, stds, masks = [], [], []
    for start in range(0, len(scenes), batch_size):
        renderings = [render(s) for s in scenes[start:start + batch_size]]
        posterior = vae.encode(images_to_tensor([r.image for r in renderings])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        masks.append(torch.from_numpy(np.stack(
            [np.stack([r.object_mask, r.object_mask & r.pattern_mask.any()])
             for r in renderings])))
    return torch.cat(means), torch.cat(stds), torch.cat(masks)


def object_weights(masks: torch.Tensor, weight: float,
                   pattern_weight: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights from `masks` (B, 2, H, W) as encode_dataset
    makes them: 1, plus `weight` on the object grown by 1 px, plus `pattern_weight` on
    a patterned object grown by 1 px. With pattern_weight 0 the weights are exactly
    those of the bases trained before it existed."""
    grown = torch.nn.functional.max_pool2d(masks.float(), 3, stride=1, padding=1)
    weights = 1.0 + weight * grown[:, :1]
    if pattern_weight:
        weights = weights + pattern_weight * grown[:, 1:]
    return weights


def sample_timesteps(config: BaseConfig, total: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) int64 training timesteps: uniform on [0, total), except that a
    `config.high_noise_fraction` of them is drawn from [config.high_noise_from, total).

    Why: a 10-14 px object is visible through the noise from about t = 950 on (its
    ~150 pixels add up), so with uniform timesteps only ~5% of the steps teach the
    UNet to place an object from the caption; the rest teach it to follow the noise,
    and sampling then places the object wherever the first noise draw leans.
    With fraction 0 no extra random numbers are drawn (older bases reproduce).
    """
    timesteps = torch.randint(0, total, (config.batch_size,), generator=generator)
    if config.high_noise_fraction > 0:
        high = torch.randint(config.high_noise_from, total, (config.batch_size,),
                             generator=generator)
        chosen = torch.rand(config.batch_size, generator=generator) < config.high_noise_fraction
        timesteps = torch.where(chosen, high, timesteps)
    return timesteps


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p, 1.0 - decay)


def train_denoiser(unet, text_encoder, tokenizer, scheduler, latents, latent_stds, masks,
                   scenes: list[Scene], config: BaseConfig, rng: np.random.Generator,
                   generator: torch.Generator, log=print, progress=None):
    """Train UNet and text encoder jointly (v-prediction loss); return (EMA unet, EMA text
    encoder, losses). `latents`/`latent_stds` are scaled (unit RMS), (N, 4, 32, 32);
    `masks` (N, 2, 32, 32) weight the loss on object pixels (object_weights).
    `progress(ema_unet, ema_text)`, if given, runs every config.progress_every steps
    (it must not touch `rng` or `generator`) and its result is logged."""
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    # No weight decay: rows of the rare tokens get zero gradients and must stay as drawn.
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    dropout = CaptionDropout()
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config.warmup_steps, config.steps)
        index = torch.from_numpy(rng.integers(len(scenes), size=config.batch_size))
        clean = latents[index] + latent_stds[index] * torch.randn(
            latents[index].shape, generator=generator)  # (B, 4, 32, 32)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = sample_timesteps(config, scheduler.config.num_train_timesteps, generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = scheduler.get_velocity(clean, noise, timesteps)  # v-prediction
        captions = [training_caption(scenes[int(i)], rng, dropout) for i in index]
        hidden = text_encoder(tokenize(tokenizer, captions))[0]  # (B, MAX_TOKENS, 64)
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        weights = object_weights(masks[index], config.object_loss_weight,
                                 config.pattern_loss_weight)  # (B, 1, 32, 32)
        loss = (weights * (prediction - target) ** 2).mean() / weights.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            log(f"unet step {step + 1}/{config.steps} loss {np.mean(losses[-100:]):.4f}")
        if progress is not None and (step + 1) % config.progress_every == 0:
            log(f"unet step {step + 1}: quick held-out check {progress(ema_unet, ema_text)}")
    return ema_unet, ema_text, losses


# -- the whole run ------------------------------------------------------------------


def train_base(config: BaseConfig, out: str | Path, log=print) -> dict:
    """Train every component from `config.seed`, save the pipeline to `out`, return
    the report (also written to out/toyworld.json)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    out = Path(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cpu_start = time.process_time()

    tokenizer, text_encoder, vae, unet, scheduler = _components(config)
    scenes = [sample_training_scene(rng) for _ in range(config.dataset_size)]
    means, stds, masks = encode_dataset(vae, scenes)
    if config.resume_from:
        scaling = float(vae.config.scaling_factor)  # the latents the UNet was trained on
    else:
        scaling = float(1.0 / means.pow(2).mean().sqrt())
        vae.register_to_config(scaling_factor=scaling)
    timings["encode_s"] = time.perf_counter() - start
    log(f"encoded {len(scenes)} images; latent scaling_factor {scaling:.4f}")

    progress = _quick_check(vae, tokenizer, scheduler, config)
    ema_unet, ema_text, losses = train_denoiser(
        unet, text_encoder, tokenizer, scheduler, means * scaling, stds * scaling, masks,
        scenes, config, rng, generator, log, progress)
    timings["denoiser_s"] = time.perf_counter() - start - timings["encode_s"]
    timings["train_s"] = time.perf_counter() - start
    timings["train_cpu_s"] = time.process_time() - cpu_start

    pipe = assemble_pipeline(ema_unet, vae, ema_text, tokenizer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    accuracy = _held_out_accuracy(pipe, config, timings)
    log(f"held-out accuracy {accuracy}")
    pipe.save_pretrained(out, safe_serialization=True)
    report = _report(config, pipe, timings, accuracy, losses)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def resume_folder(config: BaseConfig) -> Path:
    """config.resume_from as a Path; ValueError naming the flag if train_base did not
    save a base there."""
    folder = Path(config.resume_from)
    if not (folder / REPORT_NAME).is_file():
        raise ValueError(f"--resume-from {folder}: not a toy-world base "
                         f"(no {REPORT_NAME} in it; train_base saves one)")
    return folder


def _components(config: BaseConfig):
    """(tokenizer, text_encoder, vae, unet, scheduler): built fresh, or loaded from
    config.resume_from (a folder train_base saved)."""
    if config.resume_from:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(resume_folder(config)))
        return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, build_scheduler()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(folder)
    # this order draws the random initialisations as the committed stage 1 did
    text_encoder, vae = build_text_encoder(tokenizer), build_vae()
    unet = build_unet(config.block_out_channels, config.attention_levels)
    return tokenizer, text_encoder, vae, unet, build_scheduler()


def _quick_check(vae, tokenizer, scheduler, config: BaseConfig):
    """progress(ema_unet, ema_text) for train_denoiser: colour accuracy on 32 held-out
    prompts at 10 steps (its own seeds: it touches no training random state)."""

    def progress(ema_unet, ema_text) -> dict:
        pipe = assemble_pipeline(ema_unet, vae, ema_text, tokenizer, scheduler)
        pipe.set_progress_bar_config(disable=True)
        prompts = held_out_prompts(32, seed=2)
        images = generate(pipe, prompts, seed=1, num_inference_steps=10,
                          guidance_scale=config.guidance_scale)
        return {k: round(v, 3) for k, v in colour_accuracy(images, prompts).items()}

    return progress


def _held_out_accuracy(pipe, config: BaseConfig, timings: dict[str, float]) -> dict:
    """colour_accuracy on config.eval_images held-out prompts; adds timings["eval_s"]."""
    prompts = held_out_prompts(config.eval_images)
    eval_start = time.perf_counter()
    images = generate(pipe, prompts, seed=config.seed,
                      num_inference_steps=config.eval_inference_steps,
                      guidance_scale=config.guidance_scale)
    accuracy = colour_accuracy(images, prompts)
    timings["eval_s"] = time.perf_counter() - eval_start
    return accuracy


def _report(config: BaseConfig, pipe, timings: dict[str, float], accuracy: dict,
            losses: list[float]) -> dict:
    """The toyworld.json report: settings, sizes, timings, accuracy, loss, versions."""
    import diffusers
    import transformers

    parameters = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                  for name in ("unet", "vae", "text_encoder")}
    return {
        "config": asdict(config),
        "parameters": parameters,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "held_out_accuracy": accuracy,
        "final_loss": float(np.mean(losses[-200:])),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
