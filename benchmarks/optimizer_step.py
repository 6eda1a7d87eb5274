"""Seconds per optimiser step (gradient clipping + AdamW) of each toy-table method,
per-tensor (torch's CPU default) against multi-tensor (foreach, tuneqdm.train's).

A scale method trains some 150-300 small tensors (s_out, s_in per layer and expert),
so on the CPU a per-tensor optimiser pays Python and dispatch overhead per tensor per
step. This times exactly what tuneqdm.train's loop does after backward,
`clip_grad_norm_(params, 1.0)` then `AdamW.step()`, on each method's real trainable
parameters (tuneqdm.train's groups at the table's learning rates, toyworld.compare.
`train_config`; the toy base's UNet quantized round-to-nearest),
with fixed random gradients, one thread, variants interleaved round by round
(benchmarks/_speed.py). It also steps both variants 50 times from the same start and
reports whether the parameters are bit-equal.

    .venv/bin/python benchmarks/optimizer_step.py --json outputs/optimizer_step.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, _speed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import machine_info, markdown_table, write_json
from _speed import Variant, interleave

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = ROOT / "models" / "toyworld-base"
METHODS = ["full-n1-fp32", "lora-n1-fp32", "peqa-n1-w4", "tuneqdm-n1-w4", "tuneqdm-n4-w4"]


def method_groups(float_unet: torch.nn.Module, key: str) -> list[dict]:
    """tuneqdm.train's AdamW groups for the toy-table method `key`, on a fresh UNet,
    with seeded random gradients attached (the same for every call)."""
    from toyworld.compare import CompareConfig, Method, method_unet, train_config
    from tuneqdm.train import _parameter_groups

    method = Method.from_key(key)
    unet = method_unet(float_unet, method)
    groups = _parameter_groups(unet, train_config(method, unet, CompareConfig(), seed=0))
    generator = torch.Generator().manual_seed(0)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
    return groups


def optimiser_step(groups: list[dict], foreach: bool | None):
    """A function doing one clip + AdamW step over `groups` (foreach None: torch's
    default for the device, per-tensor on the CPU)."""
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, foreach=foreach)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
        optimizer.step()

    return step


def clone_groups(groups: list[dict]) -> list[dict]:
    """A copy of `groups`: new parameters with the same values and gradients."""
    clones = []
    for group in groups:
        params = []
        for p in group["params"]:
            params.append(clone := torch.nn.Parameter(p.detach().clone()))
            clone.grad = p.grad.clone()
        clones.append({**group, "params": params})
    return clones


def bit_equal(groups: list[dict], steps: int = 50) -> bool:
    """Both variants stepped `steps` times from copies of the same parameters and
    gradients: are the parameters bit-equal?"""
    copies = [clone_groups(groups) for _ in range(2)]
    for variant, foreach in zip(copies, (None, True), strict=True):
        step = optimiser_step(variant, foreach)
        for _ in range(steps):
            step()
    return all(torch.equal(a, b) for ga, gb in zip(*copies, strict=True)
               for a, b in zip(ga["params"], gb["params"], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(TOY_BASE))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    float_unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    rows, results = [], {}
    for key in args.methods:
        groups = method_groups(float_unet, key)
        params = [p for g in groups for p in g["params"]]
        variants = [Variant("per-tensor", optimiser_step(clone_groups(groups), None)),
                    Variant("foreach", optimiser_step(clone_groups(groups), True))]
        timed = interleave(variants, args.rounds, torch.device("cpu"))
        results[key] = timed
        rows.append({"method": key, "tensors": len(params),
                     "numbers": f"{sum(p.numel() for p in params):,}",
                     "per_tensor_ms": f"{timed[0]['median_s'] * 1e3:.2f}",
                     "foreach_ms": f"{timed[1]['median_s'] * 1e3:.2f}",
                     "ratio": f"{timed[1]['ratio']:.2f}",
                     "bit_equal": bit_equal(groups)})
        print(rows[-1], flush=True)
    print(markdown_table(rows, [("method", "method"), ("tensors", "trained tensors"),
                                ("numbers", "numbers"),
                                ("per_tensor_ms", "per-tensor ms/step"),
                                ("foreach_ms", "foreach ms/step"),
                                ("ratio", "foreach / per-tensor"),
                                ("bit_equal", "bit-equal after 50 steps")]))
    write_json(args.json, {"config": vars(args), "machine": machine_info(), "table": rows,
                           "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
