"""Training-step memory and speed on the SD v1.5 UNet (results: docs/benchmarks.md).

Each method runs in its own subprocess (so peaks do not mix), one after another:

    full       full-precision fine-tuning, every UNet parameter trainable
    lora       LoRA r=4 (peft) on to_q, to_k, to_v, to_out.0, float base frozen
    peqa       ours: tuneqdm.quantize_ with QuantConfig.peqa (s_out only)
    tuneqdm    ours: tuneqdm.quantize_, N=4 experts (s_out and s_in), timestep routing
    plain      TuneQDM N=4 the published implementation's way (plain_formula.py)
    plain-peqa PEQA the published implementation's way (plain_formula.py)

Harness: random weights, latents (1, 4, 32, 32), random timestep, random
encoder_hidden_states (1, 77, 768), epsilon MSE, backward, AdamW step, fp32 on CPU.
Memory: peak RSS during the training steps (VmHWM, reset after setup: the
benchmark builds a float UNet first, which production never does for quantized
training, since it loads the quantized base); the setup peak is reported apart.
Speed: median wall and CPU seconds per step after the warm-up steps; the machine's
load average is recorded, since a shared machine's other jobs inflate wall time.

    nice -n 10 .venv/bin/python benchmarks/train_memory.py --json outputs/train_memory.json

--paired runs several methods' steps interleaved in one process instead (timing only),
the robust way to compare speeds on a shared machine:

    nice -n 10 .venv/bin/python benchmarks/train_memory.py --paired peqa@8 tuneqdm@8 \
        peqa@4 tuneqdm@4 --rounds 6 --json outputs/train_paired.json

The harness itself (models, batches, steps) is train_harness.py; this file is the
command line, the subprocess per method and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import GIB, machine_info, markdown_table, write_json
from train_harness import LABELS, METHODS, QUANTIZED, paired_table, run_child, run_paired

DEFAULT_RUNS = (
    "full",
    "lora",
    "peqa@8",
    "tuneqdm@8",
    "plain@8",
    "plain-peqa@8",
    "peqa@4",
    "tuneqdm@4",
)


def parse_run(spec: str) -> tuple[str, int]:
    method, _, bits = spec.partition("@")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {method!r}; one of {METHODS}")
    if method in QUANTIZED:
        if bits not in ("2", "3", "4", "8"):
            raise argparse.ArgumentTypeError(f"{spec!r}: write {method}@BITS, BITS in 2,3,4,8")
        return method, int(bits)
    if bits:
        raise argparse.ArgumentTypeError(f"{spec!r}: {method} takes no @BITS")
    return method, 0


def run_in_subprocess(method: str, bits: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            method,
            "--child-bits",
            str(bits),
            "--child-result",
            str(result_path),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            return {"method": method, "bits": bits, "error": f"exit {completed.returncode}"}
        return json.loads(result_path.read_text())


def gib(value) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


def summarise(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"method": LABELS[r["method"]], "bits": r["bits"], "peak": r["error"]})
            continue
        rows.append(
            {
                "method": LABELS[r["method"]],
                "bits": r["bits"] or "fp32",
                "trainable": f"{r['trainable']:,}",
                "setup": gib(r["rss_after_setup_bytes"]),
                "peak": gib(r["peak_train_bytes"]),
                "process": gib(r["peak_setup_bytes"]),
                "step": f"{r['median_step_s']:.2f}",
                "cpu": f"{r['median_step_cpu_s']:.2f}",
                "steps": " ".join(f"{s:.1f}" for s in r["step_s"]),
                "load": " / ".join(f"{x:.1f}" for x in r["load_average"]),
            }
        )
    columns = [
        ("method", "method"),
        ("bits", "bits"),
        ("trainable", "trainable numbers"),
        ("setup", "RSS after setup GiB"),
        ("peak", "peak during training GiB"),
        ("process", "setup peak GiB"),
        ("step", "median s/step"),
        ("cpu", "median CPU s/step"),
        ("steps", "measured steps s"),
        ("load", "load avg before / after"),
    ]
    return markdown_table(rows, columns)


def check_targets(results: list[dict]) -> list[dict]:
    """The issue's targets, for every bit width that has the runs they compare."""
    by_key = {(r["method"], r["bits"]): r for r in results if "error" not in r}
    full = by_key.get(("full", None))
    checks = []
    for bits in sorted({b for m, b in by_key if m == "tuneqdm"}):
        ours = by_key[("tuneqdm", bits)]
        plain = by_key.get(("plain", bits)) or by_key.get(("plain", 8))
        peqa = by_key.get(("peqa", bits))
        if plain:
            ratio = ours["peak_train_bytes"] / plain["peak_train_bytes"]
            checks.append(
                {
                    "target": f"TuneQDM@{bits} peak <= 0.6 x plain@{plain['bits']}",
                    "value": round(ratio, 3),
                    "met": ratio <= 0.6,
                }
            )
        if full:
            ratio = ours["peak_train_bytes"] / full["peak_train_bytes"]
            checks.append(
                {
                    "target": f"TuneQDM@{bits} peak <= 0.35 x full FT",
                    "value": round(ratio, 3),
                    "met": ratio <= 0.35,
                }
            )
        if peqa:
            ratio = ours["median_step_s"] / peqa["median_step_s"]
            checks.append(
                {
                    "target": f"TuneQDM@{bits} s/step <= 1.3 x PEQA@{bits}",
                    "value": round(ratio, 3),
                    "met": ratio <= 1.3,
                }
            )
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        type=parse_run,
        default=None,
        help=f"METHOD or METHOD@BITS; default: {' '.join(DEFAULT_RUNS)}",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 1 measured step")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--paired",
        nargs="+",
        type=parse_run,
        default=None,
        help="instead: interleaved step timing of these runs in one process (no memory)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --paired")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-bits", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        result = run_child(args.child, args.child_bits, args.warmup, args.steps, args.threads)
        args.child_result.write_text(json.dumps(result))
        return
    if args.quick:
        args.warmup, args.steps, args.rounds = 1, 1, 1
    if args.paired:
        report_paired(args)
    else:
        report_separate(args)


def report_paired(args) -> None:
    """--paired: interleaved step times in this process; print and save the table."""
    paired = run_paired(args.paired, args.rounds, args.threads)
    table = paired_table(paired)
    print()
    print(table)
    paired.update(table=table, machine=machine_info(), command=sys.argv)
    write_json(args.json, paired)


def report_separate(args) -> None:
    """Each run in its own subprocess; print and save the table and the targets."""
    runs = args.runs or [parse_run(spec) for spec in DEFAULT_RUNS]
    results = []
    for method, bits in runs:
        print(f"--- {LABELS[method]}" + (f" @ {bits} bits" if bits else ""), flush=True)
        result = run_in_subprocess(method, bits, args)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    table = summarise(results)
    checks = check_targets(results)
    print()
    print(table)
    for check in checks:
        print(f"{'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['value']}")
    write_json(
        args.json,
        {
            "results": results,
            "targets": checks,
            "table": table,
            "warmup": args.warmup,
            "steps": args.steps,
            "machine": machine_info(),
            "command": sys.argv,
        },
    )


if __name__ == "__main__":
    main()
