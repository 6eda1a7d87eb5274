"""Held-out evaluation of the toy-world base: generate images from captions and read
back what they show (background, object colour, position, shape, pattern) against the
prompt, by the renderer's ground truth (metrics.py).

`generate` and `held_out_prompts` are also what the base's tests and the probes in
docs/toyworld.md use; toyworld.base re-exports all three names.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import analyse, classify_pattern, prompt_fidelity, subject_fidelity
from .split import held_out_scenes
from .subjects import Subject
from .world import caption, parse_caption


def generate(pipe, prompts: list[str], seed: int = 0, num_inference_steps: int = 25,
             guidance_scale: float = 4.0, batch_size: int = 64) -> list[np.ndarray]:
    """(32, 32, 3) uint8 images, one per prompt; image i depends only on (seed, i)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i)
                      for i in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=generators, output_type="np")
        images += [(np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8) for img in out.images]
    return images


def held_out_prompts(count: int, seed: int = 1) -> list[str]:
    """Full captions of `count` scenes with colour pairs held out of training."""
    return [caption(scene) for scene in held_out_scenes(count, seed)]


def colour_accuracy(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    """Fractions of images showing the prompted background, object colour, both,
    position, shape (metrics.prompt_fidelity) and pattern (metrics.classify_pattern;
    "pattern" counts only prompts that name a colour, which fixes the pattern, plain
    included). Images are (32, 32, 3) uint8."""
    checks, patterns = [], []
    for image, prompt in zip(images, prompts, strict=True):
        analysis = analyse(image)
        checks.append(prompt_fidelity(image, prompt, analysis=analysis))
        wanted = parse_caption(prompt).pattern
        if wanted is not None:
            patterns.append(classify_pattern(analysis.object_mask, analysis.shade) == wanted)
    return {
        "background": float(np.mean([c.background_ok for c in checks])),
        "object_colour": float(np.mean([c.colour_ok for c in checks])),
        "both_colours": float(np.mean([c.colours_ok for c in checks])),
        "position": float(np.mean([c.position_ok for c in checks])),
        "shape": float(np.mean([c.shape_ok for c in checks])),
        "pattern": float(np.mean(patterns)) if patterns else float("nan"),
        "images": len(checks),
    }


def score_images(images: list, prompts: list[str], subject: Subject) -> dict:
    """Means over `images` (one per entry of `prompts`) of subject fidelity, its colour,
    shape and pattern parts, the same read on the objects' interiors (metrics.interior:
    a diagnostic of soft edges, docs/toyworld.md "Edges"), and prompt fidelity with its
    background and position parts."""
    scores = [subject_fidelity(image, subject) for image in images]
    checks = [prompt_fidelity(image, prompt, subject)
              for image, prompt in zip(images, prompts, strict=True)]

    def mean(values) -> float:
        return float(np.mean(list(values)))

    return {
        "subject_fidelity": mean(s.score for s in scores),
        "subject_colour": mean(s.colour for s in scores),
        "subject_shape": mean(s.shape for s in scores),
        "subject_pattern": mean(s.pattern for s in scores),
        "subject_fidelity_interior": mean(s.interior_score for s in scores),
        "subject_colour_interior": mean(s.interior_colour for s in scores),
        "subject_pattern_interior": mean(s.interior_pattern for s in scores),
        "prompt_fidelity": mean((c.background_ok + c.position_ok) / 2 for c in checks),
        "background": mean(c.background_ok for c in checks),
        "position": mean(c.position_ok for c in checks),
    }


def evaluate_base(path: str, images: int = 128, seed: int = 0, num_inference_steps: int = 25,
                  guidance_scale: float = 4.0) -> dict[str, float]:
    """colour_accuracy of the pipeline saved at `path` on `images` held-out prompts
    (the same prompts, seeds and sampler settings as train_base's report)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(images)
    return colour_accuracy(generate(pipe, prompts, seed=seed,
                                    num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale), prompts)


def main(argv: list[str] | None = None) -> int:
    """python -m toyworld.evaluate PATH [PATH ...]: one JSON line of held-out accuracy
    per saved base."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m toyworld.evaluate",
                                     description="Held-out accuracy of saved toy-world bases.")
    parser.add_argument("paths", nargs="+", help="folders written by toyworld.train_base")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.images < 1:
        raise SystemExit(f"--images must be at least 1, got {args.images}")
    torch.set_num_threads(args.threads)
    for path in args.paths:
        accuracy = evaluate_base(path, images=args.images)
        print(json.dumps({"base": path, **{k: round(v, 4) for k, v in accuracy.items()}}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
