"""Can a short extra training stage teach the toy-world base to draw patterns?

    HF_HUB_OFFLINE=1 python benchmarks/toyworld_pattern_probe.py models/toyworld-base \
        --out /tmp/stage3 --steps 2000 --pattern-loss-weight 8
    HF_HUB_OFFLINE=1 python benchmarks/toyworld_pattern_probe.py models/toyworld-base \
        --out /tmp/first --from-scratch --period 4 --anchor box

Continues BASE (toyworld.train_base --resume-from) for --steps at lr 3e-4 (100 warm-up
steps, cosine to 5%), 30% of each batch at t >= 900 so position is kept, or with
`--from-scratch` trains a new base with the first two stages of scripts/train_toyworld_base.sh
(83 minutes; BASE is then only compared with), in the committed world (patterns of
8-px period on the image's grid, world.py) or a VARIANT of it for this run only:

- `--period 4`: patterns of period 4 px (2-px bands, 2x2 dots and checks), read back
  by the metrics at that period;
- `--anchor box`: each pattern anchored at its object's box corner (the first world
  was `--period 4 --anchor box`), so the UNet must work out the phase from the
  object's outline; `--anchor random`: a random phase per image, which a denoiser can
  only take from the noisy image itself;
- `--pattern-loss-weight W`: the object pixels of patterned objects weigh W more in
  the loss (BaseConfig.pattern_loss_weight);
- `--attention-levels K`: cross-attention on K levels instead of the base's (3: also
  at 16 px, so pattern words reach a level that can draw them by place); the base's
  weights are kept and each new attention block starts as the identity (its output
  projection zeroed).

The metrics read patterns at their best phase, so the same held-out check scores
every world.

Prints the quick checks during training, the held-out accuracy (128 prompts, 25 DDIM
steps, guidance 4) of BASE and of the result, and which pattern each prompted pattern
was read as; --json writes it all. docs/toyworld_history.md ("Patterns: what a short
extra stage can and cannot teach") has the numbers. The continued base is saved to
--out; nothing is committed from it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import toyworld.metrics as metrics
import toyworld.world as world
from toyworld.base import REPORT_NAME, BaseConfig, build_unet, train_base
from toyworld.evaluate import colour_accuracy, generate, held_out_prompts
from toyworld.metrics import analyse, classify_pattern


def pattern_confusion(path: str, images: int = 128) -> dict[str, dict[str, int]]:
    """{prompted pattern: {pattern read back: count}} on the held-out prompts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(images)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    generated = generate(pipe, prompts)
    for image, prompt in zip(generated, prompts, strict=True):
        analysis = analyse(image)
        wanted = world.parse_caption(prompt).pattern
        counts[wanted][str(classify_pattern(analysis.object_mask, analysis.shade))] += 1
    accuracy = colour_accuracy(generated, prompts)
    return {"accuracy": accuracy, "confusion": {k: dict(v) for k, v in sorted(counts.items())}}


def use_period(period: int) -> None:
    """Make render() draw, and the metrics read, patterns of `period` px (half of it
    shade: bands, square dots, checks), for this process only."""
    world.PATTERN_PERIOD = metrics.PATTERN_PERIOD = period


def use_anchor(anchor: str) -> None:
    """Make render() anchor patterns at the image's (0, 0) ("image", the committed
    world), at each object's box corner ("box") or at a random phase per rendering
    ("random"), for this process only (render looks world.pattern_origin up per call)."""
    if anchor == "box":
        world.pattern_origin = lambda scene: (int(np.floor(scene.centre_x - scene.size / 2)),
                                              int(np.floor(scene.centre_y - scene.size / 2)))
    elif anchor == "random":
        # one uniform phase per rendering, from a generator of its own (the scenes and
        # the training draws are those of the other runs)
        phases = np.random.default_rng(12345)
        world.pattern_origin = lambda scene: tuple(
            int(v) for v in phases.integers(world.PATTERN_PERIOD, size=2))


def with_attention_levels(base: str, levels: int, folder: str) -> str:
    """Save `base` with its UNet rebuilt to have cross-attention on `levels` levels into
    `folder` (returned): every weight of the base kept, the new attention blocks
    initialised so that they pass their input through unchanged."""
    import shutil

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    old = pipe.unet
    current = sum(kind.startswith("CrossAttn") for kind in old.config.down_block_types)
    if levels <= current:
        raise SystemExit(f"--attention-levels {levels}: the base already has {current}")
    torch.manual_seed(0)
    new = build_unet(tuple(old.config.block_out_channels), levels)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    if unexpected or not all(".attentions." in key for key in missing):
        raise RuntimeError(f"unexpected layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    added = sorted({key.split(".attentions.")[0] + ".attentions." + key.split(".")[3]
                    for key in missing})
    with torch.no_grad():
        for name in added:  # Transformer2DModel: out = proj_out(...) + input
            block = new.get_submodule(name)
            block.proj_out.weight.zero_()
            block.proj_out.bias.zero_()
    sample = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = (new(sample, 500, hidden).sample - old(sample, 500, hidden).sample).abs().max()
    if gap > 1e-5:
        raise RuntimeError(f"the rebuilt UNet is not the base's: max difference {gap}")
    pipe.unet = new
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.copy(Path(base) / REPORT_NAME, Path(folder) / REPORT_NAME)
    print(f"added cross-attention: {', '.join(added)}", flush=True)
    return folder


def train_stage1(args: argparse.Namespace, log) -> BaseConfig:
    """--from-scratch: train stage 1 of scripts/train_toyworld_base.sh into OUT.stage1
    and return the script's stage-2 config that continues it."""
    if args.attention_levels:
        raise SystemExit("--from-scratch trains the committed architecture; "
                         "--attention-levels only applies when continuing BASE")
    stage1 = args.out.rstrip("/") + ".stage1"
    common = {"threads": args.threads, "pattern_loss_weight": args.pattern_loss_weight}
    train_base(replace(BaseConfig(), **common), stage1, log=log)
    return replace(BaseConfig(), **common, resume_from=stage1, steps=5000, lr=5e-4,
                   high_noise_fraction=0.5, high_noise_from=900)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", help="a saved toy-world base to continue")
    parser.add_argument("--out", required=True, help="folder for the continued base")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--from-scratch", action="store_true",
                        help="train a new base in the (variant) world with the first two stages of "
                             "scripts/train_toyworld_base.sh instead of continuing BASE, "
                             "which is then only the row it is compared with")
    parser.add_argument("--pattern-loss-weight", type=float, default=0.0)
    parser.add_argument("--anchor", choices=("box", "image", "random"), default="image")
    parser.add_argument("--attention-levels", type=int, default=0,
                        help="rebuild the base's UNet with cross-attention on this many "
                             "levels first (0: keep it)")
    parser.add_argument("--period", type=int, default=world.PATTERN_PERIOD, choices=(4, 8))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    use_period(args.period)
    use_anchor(args.anchor)
    start = args.base
    if args.attention_levels:
        start = with_attention_levels(args.base, args.attention_levels, args.out + ".init")
    config = replace(BaseConfig(), resume_from=start, steps=args.steps, lr=3e-4,
                     warmup_steps=100, high_noise_fraction=0.3, high_noise_from=900,
                     pattern_loss_weight=args.pattern_loss_weight, threads=args.threads,
                     progress_every=500, log_every=250)
    checks = []

    def log(message: str) -> None:
        print(message, flush=True)
        if "quick held-out check" in message:
            checks.append(message)

    if args.from_scratch:
        config = train_stage1(args, log)
    report = train_base(config, args.out, log=log)
    torch.set_num_threads(args.threads)
    rows = {"before": pattern_confusion(args.base), "after": pattern_confusion(args.out)}
    print(f"\n{'base':8} {'colours':>8} {'shape':>6} {'pattern':>8} {'position':>9}  "
          "prompted pattern -> read as")
    for name, row in rows.items():
        acc = row["accuracy"]
        print(f"{name:8} {acc['both_colours']:8.3f} {acc['shape']:6.3f} {acc['pattern']:8.3f} "
              f"{acc['position']:9.3f}  {row['confusion']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": sys.argv, "anchor": args.anchor, "from_scratch": args.from_scratch,
            "steps": "8000 + 5000" if args.from_scratch else args.steps,
            "pattern_loss_weight": args.pattern_loss_weight,
            "attention_levels": args.attention_levels, "period": args.period,
            "quick_checks": checks,
            "train_s": report["timings"]["train_s"], **rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
