"""Why a toy-world base does or does not draw patterns and positions: three probes.

    HF_HUB_OFFLINE=1 python benchmarks/toyworld_base_probe.py models/toyworld-base

1. text: relative L2 change of the text encoder's hidden states, (24, 64), when one
   word of a caption changes (position, colour, pattern, shape, background). A word
   the UNet never used stays close to its neighbours.
2. position: the x0 the UNet predicts from pure noise at t = 999 for "a red circle on
   a blue background, <position>" (8 noise draws per position word): the centroid of
   its red-ish pixels, and its mean distance to the word's true centre. A base that
   reads position words moves the centroid; chance-level bases give ~9 px.
3. pattern: held-out renderings of patterned objects are noised to a DDIM timestep t0
   and denoised from there with their caption (guidance 4, the 25-step grid): the
   fraction whose pattern (metrics.classify_pattern) survives, per t0. The VAE is
   exact (also printed), so a loss here is the UNet's.
4. pattern word: the same, from t0 = 399 and 599, with the caption's pattern word
   kept, swapped (striped -> dotted -> checkered -> striped) or dropped: how often the
   image's own pattern, the caption's and plain are read back.

--period 4 --anchor box renders the probes' scenes as the first world did (2-px bands
at each object's corner), for bases trained there (toyworld_pattern_probe.py).

docs/toyworld_history.md ("Why patterns and positions failed", "Patterns: what a short
extra stage can and cannot teach") has the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from toyworld_pattern_probe import use_anchor, use_period

import toyworld.world as world
from toyworld.base import colour_accuracy, images_to_tensor
from toyworld.metrics import analyse, classify_pattern
from toyworld.split import held_out_scenes
from toyworld.text import tokenize
from toyworld.world import COLOURS, POSITIONS, caption, render

CAPTION = "a red striped circle on a blue background, top left"
CHANGED = {"position": "a red striped circle on a blue background, bottom right",
           "colour": "a green striped circle on a blue background, top left",
           "pattern": "a red dotted circle on a blue background, top left",
           "shape": "a red striped star on a blue background, top left",
           "background": "a red striped circle on a yellow background, top left"}


@torch.no_grad()
def text_sensitivity(pipe) -> dict[str, float]:
    """Relative L2 change of the (24, 64) hidden states per changed word."""
    def encode(text: str) -> torch.Tensor:
        return pipe.text_encoder(tokenize(pipe.tokenizer, [text]))[0][0]

    reference = encode(CAPTION)
    return {word: round(float((encode(text) - reference).norm() / reference.norm()), 3)
            for word, text in CHANGED.items()}


@torch.no_grad()
def position_sensitivity(pipe, draws: int = 8) -> dict:
    """Centroid (x, y) of the red-ish pixels of the t = 999 x0 prediction per position
    word, and the mean distance (px) of those centroids to the words' true centres."""
    scaling = pipe.vae.config.scaling_factor
    alpha_bar = pipe.scheduler.alphas_cumprod[999]
    red, blue = (np.array(COLOURS[c][0], dtype=np.float64) for c in ("red", "blue"))
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    centroids, distances = {}, []
    for word, (true_x, true_y) in POSITIONS.items():
        hidden = pipe.text_encoder(tokenize(pipe.tokenizer, [
            f"a red circle on a blue background, {word}"] * draws))[0]
        noisy = torch.randn(draws, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        v = pipe.unet(noisy, torch.full((draws,), 999), encoder_hidden_states=hidden).sample
        x0 = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * v  # (draws, 4, 32, 32)
        rgb = ((pipe.vae.decode(x0 / scaling).sample.clamp(-1, 1) + 1) * 127.5)
        rgb = rgb.permute(0, 2, 3, 1).double().numpy()  # (draws, 32, 32, 3)
        weight = np.clip(((rgb - blue) ** 2).sum(-1) - ((rgb - red) ** 2).sum(-1), 0, None)
        weight = weight.mean(0) + 1e-9
        x, y = (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()
        centroids[word] = (round(float(x), 1), round(float(y), 1))
        distances.append(float(np.hypot(x - true_x, y - true_y)))
    return {"centroids": centroids, "mean_distance_px": round(float(np.mean(distances)), 2)}


@torch.no_grad()
def _patterned_scenes(count: int):
    return [s for s in held_out_scenes(4 * count, seed=11) if s.pattern != "plain"][:count]


@torch.no_grad()
def _denoise_from(pipe, clean: torch.Tensor, captions: list[str], start: int):
    """(images (N, 32, 32, 3) uint8, first timestep): `clean` latents (N, 4, 32, 32)
    noised to the 25-step DDIM grid's last timestep <= start, then denoised with
    `captions` (guidance 4)."""
    count, scaling = len(captions), pipe.vae.config.scaling_factor
    hidden = pipe.text_encoder(tokenize(pipe.tokenizer, captions))[0]
    empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""] * count))[0]
    pipe.scheduler.set_timesteps(25)
    steps = [t for t in pipe.scheduler.timesteps.tolist() if t <= start]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    x = pipe.scheduler.add_noise(clean * scaling, noise, torch.full((count,), steps[0]))
    for t in steps:
        v = pipe.unet(torch.cat([x, x]), torch.full((2 * count,), t),
                      encoder_hidden_states=torch.cat([empty, hidden])).sample
        v_uncond, v_cond = v.chunk(2)
        x = pipe.scheduler.step(v_uncond + 4.0 * (v_cond - v_uncond), t, x).prev_sample
    images = ((pipe.vae.decode(x / scaling).sample.clamp(-1, 1) + 1) * 127.5).round()
    return images.permute(0, 2, 3, 1).numpy().astype(np.uint8), steps[0]


@torch.no_grad()
def pattern_recovery(pipe, starts=(100, 250, 400, 600, 800), count: int = 48) -> dict:
    """Per start timestep: colour_accuracy (pattern, position, shape, both colours) of
    patterned held-out renderings noised to it and denoised with their captions."""
    scenes = _patterned_scenes(count)
    captions = [caption(s) for s in scenes]
    clean = pipe.vae.encode(images_to_tensor([render(s).image for s in scenes])).latent_dist.mean
    decoded = pipe.vae.decode(clean).sample
    exact = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    vae_ok = np.mean([classify_pattern(*_masks(im)) == s.pattern
                      for im, s in zip(exact.astype(np.uint8), scenes, strict=True)])
    results = {"vae_reconstruction_pattern": float(vae_ok)}
    for start in starts:
        images, first = _denoise_from(pipe, clean, captions, start)
        accuracy = colour_accuracy(list(images), captions)
        results[f"from_t{first}"] = {k: round(accuracy[k], 3) for k in
                                     ("pattern", "position", "shape", "both_colours")}
    return results


SWAPPED = {"striped": "dotted", "dotted": "checkered", "checkered": "striped"}


@torch.no_grad()
def pattern_word(pipe, starts=(400, 600), count: int = 48) -> dict:
    """Does the UNet draw the pattern a caption names? Patterned held-out renderings
    noised to each start and denoised with their own caption ("own"), with the
    pattern word swapped (SWAPPED) or with no pattern word ("plain"): the fractions
    read back as the image's own pattern, as the caption's, and as plain."""
    scenes = _patterned_scenes(count)
    clean = pipe.vae.encode(images_to_tensor([render(s).image for s in scenes])).latent_dist.mean
    results = {}
    for label, patterns in (("own", [s.pattern for s in scenes]),
                            ("swapped", [SWAPPED[s.pattern] for s in scenes]),
                            ("plain", ["plain"] * count)):
        captions = [caption(replace(s, pattern=p)) for s, p in zip(scenes, patterns, strict=True)]
        for start in starts:
            images, first = _denoise_from(pipe, clean, captions, start)
            read = [classify_pattern(*_masks(image)) for image in images]
            results[f"{label}_t{first}"] = {
                "image_pattern": round(float(np.mean(
                    [r == s.pattern for r, s in zip(read, scenes, strict=True)])), 3),
                "caption_pattern": round(float(np.mean(
                    [r == p for r, p in zip(read, patterns, strict=True)])), 3),
                "plain": round(float(np.mean([r == "plain" for r in read])), 3)}
    return results


def _masks(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    analysis = analyse(image)
    return analysis.object_mask, analysis.shade


def main() -> int:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="saved toy-world bases")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anchor", choices=("box", "image"), default="image",
                        help="box: anchor patterns at the object's corner, as the "
                             "first world did")
    parser.add_argument("--period", type=int, choices=(4, 8), default=world.PATTERN_PERIOD)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_period(args.period)  # the variant worlds of toyworld_pattern_probe.py
    use_anchor(args.anchor)
    for path in args.paths:
        pipe = StableDiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        report = {"base": path, "text": text_sensitivity(pipe),
                  "position": position_sensitivity(pipe), "pattern": pattern_recovery(pipe),
                  "pattern_word": pattern_word(pipe)}
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
