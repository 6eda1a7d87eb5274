"""Bytes of the quantized SD v1.5 UNet, the size of a scale set, and weight SQNR.

1. Quantize (tuneqdm.quantize_) the SD v1.5 UNet at 2, 3, 4, 8 bits and count the
   tensor bytes of its state: packed integers + zero points + s0 + the tensors left in
   float (biases, norms); the trainable scales are a scale set, counted apart.
2. Scale-set size: s_out + s_in numbers per expert (docs/design.md §1: 612,744
   for SD v1), bytes in fp32 and fp16 for N = 1, 2, 4.
3. Weight SQNR of rounding="nearest" vs "mse" per layer, averaged over layers, on the
   default-initialised weights (uniform-ish) and on Gaussian weights of the same
   shapes (trained weights are bell-shaped). Per-channel quantization treats rows
   independently, so each layer is measured on `--sqnr-rows` evenly spaced rows.

    nice -n 10 .venv/bin/python benchmarks/quant_bytes.py --json outputs/quant_bytes.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    build_sd15_unet,
    machine_info,
    markdown_table,
    tensor_bytes,
    write_json,
)

from tuneqdm import QuantConfig, quantize_
from tuneqdm.quant import dequantize_weight, quantize_weight, sqnr_db

MB = 1e6
SD_V1_SCALE_NUMBERS = 612_744  # docs/design.md §1
SD_V1_PEQA_NUMBERS = 318_404


def float_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def scale_numbers(model: nn.Module) -> tuple[int, int]:
    """(sum of output channels, sum of input channels) over the quantized layers."""
    layers = float_layers(model).values()
    outs = sum(m.weight.shape[0] for m in layers)
    ins = sum(m.in_features if isinstance(m, nn.Linear) else m.in_channels for m in layers)
    return outs, ins


def quantized_state_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized state by kind; trainable scales counted apart."""
    kinds = {"packed": 0, "zero": 0, "scale0": 0, "float": 0, "scales": 0}
    for key, tensor in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        kind = leaf if leaf in ("packed", "zero", "scale0") else "float"
        if leaf in ("scale_out", "scale_in"):
            kind = "scales"
        kinds[kind] += tensor.numel() * tensor.element_size()
    kinds["total"] = sum(v for k, v in kinds.items() if k != "scales")
    return kinds


def measure_bytes(bits_list: list[int], fp32_bytes: int, weight_numel: int) -> list[dict]:
    rows = []
    for bits in bits_list:
        unet = build_sd15_unet(seed=0)
        start = time.perf_counter()
        quantize_(unet, QuantConfig(bits=bits, num_experts=1))
        seconds = time.perf_counter() - start
        kinds = quantized_state_bytes(unet)
        other = kinds["total"] - kinds["packed"]
        rows.append(
            {
                "bits": bits,
                "packed_bytes": kinds["packed"],
                "zero_bytes": kinds["zero"],
                "scale0_bytes": kinds["scale0"],
                "float_bytes": kinds["float"],
                "total_bytes": kinds["total"],
                "ratio": kinds["total"] / fp32_bytes,
                # the published implementation's storage: one int8 per weight, same extras
                "int8_unpacked_ratio": (weight_numel + other) / fp32_bytes,
                "quantize_s": seconds,
            }
        )
        del unet
        gc.collect()
    return rows


def sample_rows(weight: torch.Tensor, max_rows: int) -> torch.Tensor:
    """`max_rows` evenly spaced output channels of a weight, as (rows, K) float32."""
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    if rows.shape[0] <= max_rows:
        return rows
    index = torch.linspace(0, rows.shape[0] - 1, max_rows).round().long()
    return rows[index]


def measure_sqnr(model: nn.Module, bits_list: list[int], max_rows: int, mse_grid: int) -> list:
    generator = torch.Generator().manual_seed(0)
    layers = float_layers(model)
    samples = {"init": [sample_rows(m.weight, max_rows) for m in layers.values()]}
    samples["gaussian"] = [torch.randn(w.shape, generator=generator) for w in samples["init"]]
    results = []
    for distribution, weights in samples.items():
        for bits in bits_list:
            row = {"weights": distribution, "bits": bits, "layers": len(weights)}
            for rounding in ("nearest", "mse"):
                config = QuantConfig(bits=bits, rounding=rounding, mse_grid=mse_grid)
                start = time.perf_counter()
                values = []
                for w in weights:
                    q, zero, scale = quantize_weight(w, config)
                    values.append(sqnr_db(w, dequantize_weight(q, zero, scale)))
                row[f"{rounding}_db"] = sum(values) / len(values)
                row[f"{rounding}_min_db"] = min(values)
                row[f"{rounding}_s"] = time.perf_counter() - start
            row["gain_db"] = row["mse_db"] - row["nearest_db"]
            results.append(row)
            print(row, flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--sqnr-bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--sqnr-rows", type=int, default=32, help="rows per layer")
    parser.add_argument("--mse-grid", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def unet_facts(unet: nn.Module) -> dict[str, int]:
    """Bytes, layer and weight counts and scale-set numbers of the float UNet, printed."""
    fp32_bytes = tensor_bytes(unet.state_dict().values())
    layers = float_layers(unet)
    weight_numel = sum(m.weight.numel() for m in layers.values())
    outs, ins = scale_numbers(unet)
    per_expert = outs + ins
    print(
        f"{len(layers)} Linear/Conv2d layers, {weight_numel:,} weights; "
        f"UNet state fp32 {fp32_bytes / MB:.1f} MB"
    )
    print(
        f"scale set per expert: s_out {outs:,} + s_in {ins:,} = {per_expert:,} "
        f"(docs/design.md §1: {SD_V1_SCALE_NUMBERS:,}; PEQA {SD_V1_PEQA_NUMBERS:,})"
    )
    return {
        "fp32_bytes": fp32_bytes,
        "layers": len(layers),
        "weight_numel": weight_numel,
        "scale_out_numbers": outs,
        "scale_in_numbers": ins,
        "scale_numbers_per_expert": per_expert,
    }


def bytes_table(byte_rows: list[dict]) -> str:
    """Markdown table of the quantized UNet's state bytes, one row per bit width."""
    return markdown_table(
        [
            {
                "bits": r["bits"],
                "packed": f"{r['packed_bytes'] / MB:.1f}",
                "zs": f"{(r['zero_bytes'] + r['scale0_bytes']) / MB:.2f}",
                "float": f"{r['float_bytes'] / MB:.2f}",
                "total": f"{r['total_bytes'] / MB:.1f}",
                "ratio": f"{r['ratio']:.4f}",
                "int8": f"{r['int8_unpacked_ratio']:.4f}",
            }
            for r in byte_rows
        ],
        [
            ("bits", "bits"),
            ("packed", "packed ints MB"),
            ("zs", "zero + s0 MB"),
            ("float", "float tensors MB"),
            ("total", "total MB"),
            ("ratio", "ratio to fp32"),
            ("int8", "ratio, int8 unpacked (published)"),
        ],
    )


def scale_table(per_expert: int, outs: int) -> str:
    """Markdown table of scale-set sizes: TuneQDM for N = 1, 2, 4 and PEQA (s_out only)."""
    scale_rows = []
    for method, numbers in (("TuneQDM", per_expert), ("PEQA", outs)):
        for n in (1, 2, 4):
            if method == "PEQA" and n > 1:
                continue
            scale_rows.append(
                {
                    "method": method,
                    "n": n,
                    "numbers": f"{n * numbers:,}",
                    "fp32": f"{n * numbers * 4 / MB:.2f}",
                    "fp16": f"{n * numbers * 2 / MB:.2f}",
                }
            )
    return markdown_table(
        scale_rows,
        [
            ("method", "method"),
            ("n", "N"),
            ("numbers", "numbers"),
            ("fp32", "fp32 MB"),
            ("fp16", "fp16 MB"),
        ],
    )


def sqnr_table(sqnr: list[dict]) -> str:
    """Markdown table of mean and worst-layer weight SQNR, nearest vs mse rounding."""
    return markdown_table(
        [
            {
                "weights": r["weights"],
                "bits": r["bits"],
                "nearest": f"{r['nearest_db']:.2f}",
                "mse": f"{r['mse_db']:.2f}",
                "gain": f"{r['gain_db']:+.2f}",
                "min": f"{r['nearest_min_db']:.2f} / {r['mse_min_db']:.2f}",
            }
            for r in sqnr
        ],
        [
            ("weights", "weights"),
            ("bits", "bits"),
            ("nearest", "nearest dB (mean)"),
            ("mse", "mse dB (mean)"),
            ("gain", "gain dB"),
            ("min", "worst layer nearest / mse"),
        ],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    unet = build_sd15_unet(seed=0)
    facts = unet_facts(unet)
    sqnr = measure_sqnr(unet, args.sqnr_bits, args.sqnr_rows, args.mse_grid)
    del unet
    gc.collect()
    fp32_bytes = facts["fp32_bytes"]
    byte_rows = measure_bytes(args.bits, fp32_bytes, facts["weight_numel"])

    tables = {
        "bytes": bytes_table(byte_rows),
        "scales": scale_table(facts["scale_numbers_per_expert"], facts["scale_out_numbers"]),
        "sqnr": sqnr_table(sqnr),
    }
    print(f"\nUNet state bytes (fp32: {fp32_bytes / MB:.1f} MB)\n{tables['bytes']}")
    print(f"\nScale set size\n{tables['scales']}")
    print(
        f"\nWeight SQNR, mean over {facts['layers']} layers ({args.sqnr_rows} rows each)\n"
        f"{tables['sqnr']}"
    )
    ratio4 = next((r["ratio"] for r in byte_rows if r["bits"] == 4), None)
    if ratio4 is not None:
        print(f"\n4-bit ratio {ratio4:.4f} {'<=' if ratio4 <= 0.14 else '>'} 0.14")
    write_json(
        args.json,
        {
            **facts,
            "bytes": byte_rows,
            "sqnr": sqnr,
            "tables": tables,
            "machine": machine_info(),
            "command": sys.argv,
        },
    )

if __name__ == "__main__":
    main()
