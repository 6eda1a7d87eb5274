"""Generation speed: the quantized UNet against the float one (issue "Fast everywhere").

Two parts, each with its methods interleaved round by round (order rotated; round 0
warms up and is not counted), reporting medians and the median per-round ratio to
the float model, wall and CPU time:

  unet  one UNet forward at the SD v1.5 config (random weights, latents (2, 4, 64, 64),
        text (2, 77, 768), t = 500), no grad: float; 4-bit and 8-bit TuneQDM N=4
        quantized (scales at s0, 1); 4-bit with its centred weights cached
        (tuneqdm.inference.cache_expanded_weights, built untimed before each of its
        forwards and dropped after, so only one cache is alive at a time).
  toy   the toy base pipeline (models/toyworld-base): 8 images x 20 steps, guidance 7.5
        (UNet batch 16): float, 4/8-bit, 4/8-bit cached.

    nice .venv/bin/python benchmarks/generate_speed.py --json outputs/generate_speed.json
    .venv/bin/python benchmarks/generate_speed.py --quick   # CI sizes, about a minute

--compile adds torch.compile'd float and cached 4-bit variants (inductor; compile time
reported apart, or the reason it was refused); --profile N prints torch.profiler's top
N ops of one forward of each UNet variant; --device cuda --dtype bf16 runs the UNet part
on a GPU and reports peak GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import machine_info, markdown_table, write_json
from _speed import DTYPES, Variant, interleave, profile_table, sd_unets, unet_inputs

ROOT = Path(__file__).resolve().parents[1]
TOY_BASE = ROOT / "models" / "toyworld-base"
TOY_PROMPTS = (
    "a red star on a blue floor",
    "a green circle on a yellow floor",
    "a blue square on a red floor",
    "a yellow triangle on a green floor",
)


REFUSED: list[dict] = []  # torch.compile refusals: {"name", "reason"}


def compiled(name: str, model, make_run, info: dict) -> Variant | None:
    """A torch.compile'd variant, compiled now (time in info), or None (the reason is
    printed and kept in REFUSED)."""
    try:
        compiled_model = torch.compile(model)
        run = make_run(compiled_model)
        start = time.perf_counter()
        run()
        info.update(compile_s=round(time.perf_counter() - start, 1))
    except Exception as err:  # any compiler failure is reported, not fatal
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        REFUSED.append({"name": name, "reason": reason})
        print(f"{name}: torch.compile refused: {reason}", flush=True)
        return None
    return Variant(name, run, info=info)


def unet_part(args, device, dtype) -> tuple[list[dict], dict]:
    from tuneqdm.inference import cache_expanded_weights

    bits = [4, 8]
    models = sd_unets(bits, args.quick, device, dtype)
    inputs = unet_inputs(2, args.quick, device, dtype, latent=None if args.quick else 64)

    def forward(model):
        def run():
            with torch.no_grad():
                model(inputs[0], inputs[1], encoder_hidden_states=inputs[2])

        return run

    variants = [Variant("float", forward(models["float"]))]
    variants += [Variant(f"w{b}", forward(models[f"w{b}"])) for b in bits]
    cached = sd_unets([4], args.quick, device, dtype)["w4"]
    size = cache_expanded_weights(cached, dtype)
    variants.append(Variant("w4-cached", forward(cached), info={"cache_bytes": size}))
    extra = {}
    if args.compile:  # its own cached copy: compiled code keeps the dense cache
        cached_c = sd_unets([4], args.quick, device, dtype)["w4"]
        size_c = cache_expanded_weights(cached_c, dtype)
        float_c = compiled("float-compiled", models["float"], forward, {})
        w4_c = compiled("w4-cached-compiled", cached_c, forward, {"cache_bytes": size_c})
        variants += [v for v in (float_c, w4_c) if v is not None]
    if args.profile:
        extra["profiles"] = {}
        for variant in variants:
            variant.run()  # warm: first-call work (oneDNN layouts) is not profiled
            table = profile_table(variant.run, args.profile, device)
            print(f"--- profile: unet {variant.name}\n{table}", flush=True)
            extra["profiles"][variant.name] = table
    return interleave(variants, args.rounds, device), extra


def toy_pipe(bits: int | None, cached: bool):
    """The toy base pipeline, float or quantized (TuneQDM N=4, scales at s0, 1)."""
    from tuneqdm import QuantConfig, enable_timestep_experts, quantize_
    from tuneqdm.base import load_float_pipeline
    from tuneqdm.inference import cache_expanded_weights

    pipe = load_float_pipeline(TOY_BASE)
    pipe.set_progress_bar_config(disable=True)
    info = {}
    if bits is not None:
        quantize_(pipe.unet, QuantConfig(bits=bits, num_experts=4))
        enable_timestep_experts(pipe.unet)
        pipe.unet.eval()
        if cached:
            info["cache_bytes"] = cache_expanded_weights(pipe.unet, torch.float32)
    return pipe, info


def toy_part(args) -> list[dict]:
    from tuneqdm.generate import generate

    images, steps = (2, 2) if args.quick else (8, 20)
    prompts = [TOY_PROMPTS[i % len(TOY_PROMPTS)] for i in range(images)]

    def make_run(pipe):
        return lambda: generate(pipe, prompts, seed=0, num_inference_steps=steps)

    variants = []
    for name, bits, cached in (
        ("float", None, False),
        ("w4", 4, False),
        ("w8", 8, False),
        ("w4-cached", 4, True),
        ("w8-cached", 8, True),
    ):
        pipe, info = toy_pipe(bits, cached)
        variants.append(Variant(name, make_run(pipe), info=info))
    if args.compile:
        for name, bits in (("float-compiled", None), ("w4-cached-compiled", 4)):
            pipe, info = toy_pipe(bits, bits is not None)

            def make_compiled_run(unet, pipe=pipe):
                pipe.unet = unet
                return make_run(pipe)

            variant = compiled(name, pipe.unet, make_compiled_run, info)
            if variant is not None:
                variants.append(variant)
    return interleave(variants, args.rounds, torch.device("cpu"))


def table(rows: list[dict]) -> str:
    columns = [
        ("part", "part"),
        ("name", "method"),
        ("median", "median s"),
        ("ratio", "ratio to float (median per round)"),
        ("cpu", "median CPU s"),
        ("cpu_ratio", "CPU ratio"),
        ("cache", "weight cache MB"),
        ("gpu", "peak GPU MB"),
        ("rounds", "wall s per round"),
    ]
    formatted = [
        {
            "part": r["part"],
            "name": r["name"],
            "median": f"{r['median_s']:.3f}",
            "ratio": f"{r['ratio']:.3f}",
            "cpu": f"{r['median_cpu_s']:.3f}",
            "cpu_ratio": f"{r['cpu_ratio']:.3f}",
            "cache": f"{r['cache_bytes'] / 1e6:.1f}" if r.get("cache_bytes") else "",
            "gpu": f"{r['peak_gpu_bytes'] / 1e6:.0f}" if r.get("peak_gpu_bytes") else "",
            "rounds": " ".join(f"{s:.2f}" for s in r["wall_s"]),
        }
        for r in rows
    ]
    return markdown_table(formatted, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("unet", "toy"), default=["unet", "toy"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI sizes, 1 round")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="top N ops")
    parser.add_argument("--device", default="cpu", help="for the unet part: cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows, extra = [], {}
    if "unet" in args.parts:
        unet_rows, extra = unet_part(args, device, dtype)
        rows += [dict(r, part="unet") for r in unet_rows]
    if "toy" in args.parts:
        rows += [dict(r, part="toy") for r in toy_part(args)]
    result = {"rows": rows, **extra, "table": table(rows), "machine": machine_info()}
    result["compile_refused"] = REFUSED
    result.update(command=sys.argv, quick=args.quick, device=str(device), dtype=args.dtype)
    print()
    print(result["table"])
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
