"""Run a toyworld command in a variant of the world: larger objects on a tighter grid.

    HF_HUB_OFFLINE=1 python benchmarks/toyworld_world_variant.py --sizes 16 17 18 \
        --centres 10 16 22 -- train_base --out /tmp/large.stage1 --seed 0
    HF_HUB_OFFLINE=1 python benchmarks/toyworld_world_variant.py --sizes 16 17 18 \
        --centres 10 16 22 -- evaluate /tmp/large
    HF_HUB_OFFLINE=1 python benchmarks/toyworld_world_variant.py --sizes 16 17 18 \
        --centres 10 16 22 -- compare /tmp/large --methods words-n1-fp32 full-n1-fp32

For this process only, render() draws objects whose box side is one of --sizes, centred
on the 3x3 grid whose columns (and rows) are at --centres, and the metrics read a
centroid's cell with boundaries halfway between those centres; everything else (the
palette, the 8-px patterns, captions, the held-out split, the recipe) is the committed
world's. Then the command after `--` runs with its arguments: `train_base` (python -m
toyworld.train_base), `evaluate` (python -m toyworld.evaluate) or `compare BASE` (rows of
toyworld/compare.py, in this one process, on the subjects' photos rendered again in the
variant; prints each run's subject fidelity and the means; --json writes the rows).
Stages chained with --resume-from must all run in the same variant.

The committed world is --sizes 16 17 18 --centres 10 16 22 (toyworld/world.py); the
worlds before it, --sizes 10 11 12 13 14 --centres 8 16 24.
docs/toyworld_history.md ("Larger objects") has what a base trained in a variant draws.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import toyworld.metrics as metrics
import toyworld.world as world

COMMANDS = ("train_base", "evaluate", "compare")


def use_variant(sizes: tuple[int, ...], centres: tuple[int, int, int]) -> None:
    """Make render() and the metrics use `sizes` and the grid `centres` (px), for this
    process only. Refuses a variant whose objects could leave the image."""
    low, mid, high = centres
    reach = max(sizes) / 2 + world.JITTER
    if not (low < mid < high) or low - reach < 0 or high + reach > world.IMAGE_SIZE:
        raise SystemExit(f"--centres {centres} with --sizes {sizes}: an object's box must "
                         f"stay inside the {world.IMAGE_SIZE}-px image (centre +- "
                         f"{reach:g} px), with increasing centres")
    world.SIZES = tuple(sizes)
    grid = {"left": low, "": mid, "right": high}
    rows = {"top": low, "": mid, "bottom": high}
    for name in world.POSITIONS:  # in place: subjects and metrics hold the dict
        words = name.split()
        column = next((w for w in words if w in ("left", "right")), "")
        row = next((w for w in words if w in ("top", "bottom")), "")
        world.POSITIONS[name] = (grid[column], rows[row])
    boundaries = ((low + mid) / 2, (mid + high) / 2)
    world.POSITION_BOUNDARIES = metrics.POSITION_BOUNDARIES = boundaries


def compare(argv: list[str]) -> int:
    """`compare BASE [--methods KEY ...] [--subjects ID ...] [--seeds N ...] [--steps N]
    [--json F]`."""
    import json
    import tempfile
    import time

    import numpy as np
    import torch

    from toyworld.compare import CompareConfig, Method, load_base, run
    from toyworld.subjects import SUBJECTS, get_subject, write_examples

    parser = argparse.ArgumentParser(prog="toyworld_world_variant.py ... -- compare")
    parser.add_argument("base")
    parser.add_argument("--methods", nargs="+", default=["words-n1-fp32", "full-n1-fp32"])
    parser.add_argument("--subjects", nargs="+", default=[s.subject_id for s in SUBJECTS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=CompareConfig().steps)
    parser.add_argument("--invert-steps", type=int, default=0,
                        help="token inversion before fine-tuning (default 0: the runs "
                             "docs/toyworld_history.md records inverted none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    config = replace(CompareConfig(), steps=args.steps, invert_steps=args.invert_steps)
    torch.set_num_threads(args.threads)
    pipe, rows = load_base(args.base), []
    with tempfile.TemporaryDirectory() as examples:
        write_examples(examples)
        for key in args.methods:
            for seed in args.seeds:
                for subject_id in args.subjects:
                    start = time.perf_counter()
                    row = run(pipe, Method.from_key(key), get_subject(subject_id), seed,
                              config, examples=Path(examples))
                    row["wall_s"] = round(time.perf_counter() - start, 1)
                    rows.append(row)
                    print(f"{key:16} {subject_id:20} seed {seed}  subject fidelity "
                          f"{row['subject_fidelity']:.3f} (colour {row['subject_colour']:.2f}, "
                          f"shape {row['subject_shape']:.2f}, pattern "
                          f"{row['subject_pattern']:.2f})  {row['wall_s']:.0f} s", flush=True)
            mine = [r["subject_fidelity"] for r in rows if r["method"] == key]
            print(f"{key:16} mean {np.mean(mine):.3f}; subjects >= 0.85: "
                  f"{sum(v >= 0.85 for v in mine)} of {len(mine)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: toyworld_world_variant.py [--sizes ...] [--centres ...] -- "
                         f"{{{','.join(COMMANDS)}}} ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(world.SIZES))
    parser.add_argument("--centres", type=int, nargs=3, default=[
        world.POSITIONS["top left"][0], world.POSITIONS["center"][0],
        world.POSITIONS["bottom right"][0]])
    args = parser.parse_args(argv[:split])
    command, rest = (argv[split + 1:] or [""])[0], argv[split + 2:]
    if command not in COMMANDS:
        raise SystemExit(f"command {command!r}; allowed: {', '.join(COMMANDS)}")
    use_variant(tuple(args.sizes), tuple(args.centres))
    print(f"world variant: sizes {world.SIZES}, positions {world.POSITIONS}, "
          f"boundaries {world.POSITION_BOUNDARIES}", flush=True)
    if command == "compare":
        return compare(rest)
    if command == "train_base":
        from toyworld.train_base import main as run
    else:
        from toyworld.evaluate import main as run
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
