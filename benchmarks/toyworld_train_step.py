"""Seconds per training step of the toy-world base: can the 100-minute script go faster?

One step of `toyworld.base.train_denoiser`'s work (text encoder and UNet forward, a
squared-error loss against a fixed target in place of its weighted v-prediction loss,
backward, gradient clip, AdamW) at the script's size (batch 32, 32 x 32 latents, 24
tokens), starting from the committed base's weights, in ways the CPU might run it
faster:

  fp32           eager float32, what the script does
  bf16-autocast  torch.autocast("cpu", bfloat16) around the forwards
  channels-last  the UNet and its input in channels_last
  compile        torch.compile'd UNet (--compile; its compile time reported apart)

Each variant trains its own copy (its own optimizer state); variants run round by
round, order rotated (benchmarks/_speed.py `interleave`), round 0 not counted.

    nice .venv/bin/python benchmarks/toyworld_train_step.py --json outputs/train_step.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _speed

import torch
from _common import machine_info, markdown_table, write_json
from _speed import Variant, interleave

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = ROOT / "models" / "toyworld-base"


def make_step(pipe, ids: torch.Tensor, *, autocast: bool = False,
              channels_last: bool = False, compile_unet: bool = False) -> Callable[[], float]:
    """A function running one training step on its own copy of pipe's UNet and text
    encoder and returning its loss. `ids` (B, 24) token ids; latents (B, 4, 32, 32),
    targets and timesteps are drawn once (seed 0), so every variant sees the same."""
    unet, text = copy.deepcopy(pipe.unet).train(), copy.deepcopy(pipe.text_encoder).train()
    parameters = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(ids.shape[0], 4, 32, 32, generator=generator)
    target = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (ids.shape[0],), generator=generator)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(unet) if compile_unet else unet

    def run() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = text(ids)[0]  # (B, 24, 64)
            prediction = forward(latents, timesteps, encoder_hidden_states=hidden).sample
        loss = (prediction.float() - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        return loss.item()

    return run


def step_variant(name: str, pipe, ids: torch.Tensor, **options) -> Variant:
    """`make_step` as a timed Variant; a compiled one is compiled (one step) untimed."""
    run, info = make_step(pipe, ids, **options), {}
    if options.get("compile_unet"):
        start = time.perf_counter()
        run()
        info["compile_s"] = round(time.perf_counter() - start, 1)
    return Variant(name, run, info=info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(TOY_BASE))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd UNet")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.base)
    ids = pipe.tokenizer(["a red star on a blue floor"] * args.batch_size, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    variants = [step_variant("fp32", pipe, ids),
                step_variant("bf16-autocast", pipe, ids, autocast=True),
                step_variant("channels-last", pipe, ids, channels_last=True)]
    if args.compile:
        variants.append(step_variant("compile", pipe, ids, compile_unet=True))
    results = interleave(variants, args.rounds, torch.device("cpu"))
    rows = []
    for variant, result in zip(variants, results, strict=True):
        rows.append({"variant": variant.name, "s_per_step": f"{result['median_s']:.3f}",
                     "ratio": f"{result['ratio']:.2f}",
                     "compile_s": variant.info.get("compile_s", "-")})
    print(markdown_table(rows, [("variant", "variant"), ("s_per_step", "s per step (median)"),
                                ("ratio", "x fp32 (median per round)"),
                                ("compile_s", "compile s")]))
    write_json(args.json, {"config": vars(args), "machine": machine_info(), "table": rows,
                           "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
