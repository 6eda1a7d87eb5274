"""Train the toy world's text-to-image base from a seed and save it in diffusers format.

    HF_HUB_OFFLINE=1 python -m toyworld.train_base --out models/toyworld-base.stage1 --seed 0

is stage 1 of models/toyworld-base; `--resume-from FOLDER` continues a saved base
(stages 2 and 3). scripts/train_toyworld_base.sh runs all three and reproduces the
committed base (same seed and --threads give the same weights on the same software
versions). See toyworld/base.py for what is trained and docs/toyworld.md for the
measured time and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace

from .base import BaseConfig, resume_folder, train_base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.train_base",
        description="Train the toy-world base pipeline on CPU and save it with save_pretrained.")
    parser.add_argument("--out", required=True, help="folder to save the pipeline into")
    defaults = BaseConfig()
    for field in fields(BaseConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs="+", default=default,
                                help=f"default {' '.join(map(str, default))}")
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"default {default}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    values = {f.name: getattr(args, f.name) for f in fields(BaseConfig)}
    config = replace(BaseConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in values.items()})
    for name in ("steps", "dataset_size", "batch_size", "eval_images", "threads"):
        if getattr(config, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(config, name)}")
    if not 0.0 <= config.high_noise_fraction <= 1.0:
        raise SystemExit("--high-noise-fraction must be in [0, 1], "
                         f"got {config.high_noise_fraction}")
    if not 0 <= config.high_noise_from < 1000:
        raise SystemExit("--high-noise-from must be a timestep in [0, 999], "
                         f"got {config.high_noise_from}")
    if config.resume_from:
        try:
            resume_folder(config)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    report = train_base(config, args.out, log=log)
    json.dump({"out": args.out, **report["timings"], **report["held_out_accuracy"]},
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
