"""The TuneQDM paper's comparison reproduced on the toy world (toyworld/compare.py).

Every method x subject x seed is one run: fine-tune the toy base on the subject, then
generate and score its evaluation prompts. Runs go to worker processes (one torch
thread each: small UNet ops scale badly across threads). Peak training memory is
measured separately, one fresh process per method. Writes a markdown table (mean and
95% intervals over subjects, toyworld/stats.py), the paper's claims as paired tests,
each subject's mean per row (benchmarks/_toyworld_summary.py), an image grid (rows:
methods, columns: prompts; the top row is the renderer's ground truth) and JSON.

    HF_HUB_OFFLINE=1 python benchmarks/toyworld_table.py          # 8 x 3 seeds: ~1 h (57.4 min)
    HF_HUB_OFFLINE=1 python benchmarks/toyworld_table.py --quick  # < 5 min
    python benchmarks/toyworld_table.py --summarise outputs/toyworld_table.json \
        --markdown docs/toyworld_table.md  # the table again from a run's JSON, no runs
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    ProcessPoolExecutor,
    wait,
)
from dataclasses import replace
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import (
    machine_info,
    markdown_table,
    write_json,
)
from benchmarks._toyworld_memory import INVERSION, measure_memory
from benchmarks._toyworld_summary import (
    CLAIM_COLUMNS,
    COLUMNS,
    check_claims,
    per_subject,
    summarise,
)
from toyworld.compare import (
    PROMPT_SETS,
    UNTUNED_METHODS,
    CompareConfig,
    Method,
    paper_methods,
)
from toyworld.subjects import SUBJECTS, get_subject
from tuneqdm.batches import TIMESTEP_SAMPLING
from tuneqdm.config import ROUNDINGS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = ROOT / "models" / "toyworld-base"
QUICK_METHODS = [Method("none"), Method("full"), Method("peqa", 4), Method("tuneqdm", 4, 1),
                 Method("tuneqdm", 4, 4)]
# rows --methods may ask for beyond the default table's: the quantized base prompted
# with the subject's token (tables before session 17 had them)
EXTRA_METHODS = [Method("none", bits) for bits in (8, 4, 3)]

_WORKER: dict = {}


def _init_worker(base: str) -> None:
    import torch

    from toyworld.compare import load_base

    torch.set_num_threads(1)
    _WORKER["pipe"] = load_base(base)


def _invert_job(subject_id: str, seed: int, config: dict) -> dict:
    """The token inversion of (subject, seed) (compare.subject_inversion), as numbers."""
    from toyworld.compare import subject_inversion

    return subject_inversion(_WORKER["pipe"], get_subject(subject_id), seed,
                             CompareConfig(**config)).to_record()


def _run_job(key: str, subject_id: str, seed: int, config: dict, keep_images: bool,
             inversion: dict | None = None) -> dict:
    from toyworld.compare import run
    from toyworld.invert import Inversion

    pipe = _WORKER["pipe"]
    start = time.perf_counter()
    shared = None if inversion is None else Inversion.from_record(pipe.text_encoder, inversion)
    row = run(pipe, Method.from_key(key), get_subject(subject_id), seed,
              CompareConfig(**config), keep_images=keep_images, inversion=shared)
    row["wall_s"] = time.perf_counter() - start
    return row


def run_grid(base: Path, methods: list[Method], subjects: list[str], seeds: list[int],
             config: CompareConfig, workers: int, grid_subjects: list[str]) -> list[dict]:
    """Every (method, subject, seed) run, on `workers` processes. With
    config.invert_steps, each (subject, seed)'s token inversion is learnt once, first,
    and its fine-tuned runs start from it as soon as it is done (one inversion instead
    of one per row: the same numbers, since it depends on no method)."""
    trained = [m for m in methods if m.name not in UNTUNED_METHODS]
    shared = bool(config.invert_steps and trained)
    settings, rows, total = config.to_dict(), [], len(methods) * len(subjects) * len(seeds)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(str(base),)) as pool:
        def submit(method: Method, subject: str, seed: int, inversion: dict | None = None):
            return pool.submit(_run_job, method.key, subject, seed, settings,
                               seed == seeds[0] and subject in grid_subjects, inversion)

        pending = {pool.submit(_invert_job, s, seed, settings): (s, seed)
                   for seed in seeds for s in subjects if shared}
        pending.update({submit(m, s, seed): None for seed in seeds for m in methods
                        for s in subjects if not (shared and m in trained)})
        while pending:
            for future in wait(pending, return_when=FIRST_COMPLETED)[0]:
                inverted = pending.pop(future)
                if inverted is not None:
                    record = future.result()
                    pending.update({submit(m, *inverted, record): None for m in trained})
                    print(f"inverted {inverted[0]} seed {inverted[1]}: loss "
                          f"{fmean(record['losses'][:10]):.4f} -> "
                          f"{fmean(record['losses'][-10:]):.4f} "
                          f"({record['seconds']:.1f} s)", flush=True)
                    continue
                rows.append(row := future.result())
                print(f"[{len(rows)}/{total}] {row['label']:<26} {row['subject']:<20} seed "
                      f"{row['seed']}: subject {row['subject_fidelity']:.3f} prompt "
                      f"{row['prompt_fidelity']:.3f} ({row['wall_s']:.1f} s)", flush=True)
    return rows


# -- tables and grid ------------------------------------------------------------------


def write_grid(path: Path, rows: list[dict], methods: list[Method], subjects: list[str]) -> None:
    """PNG: one column per (subject, first prompt image), rows = truth + methods."""
    import numpy as np
    from PIL import Image, ImageDraw

    from toyworld.subjects import subject_contexts
    from toyworld.world import render

    zoom, label_w = 3, 190
    truth = [render(subject_contexts(get_subject(s))[1][0]).image for s in subjects]
    lines = [("target (renderer)", truth)]
    for method in methods:
        by_subject = {r["subject"]: r for r in rows if r["method"] == method.key and "images" in r}
        lines.append((method.label, [by_subject[s]["images"][0] for s in subjects]))
    cell = 32 * zoom + 4
    canvas = Image.new("RGB", (label_w + cell * len(subjects), cell * len(lines)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, images) in enumerate(lines):
        draw.text((4, i * cell + cell // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            tile = Image.fromarray(np.asarray(image)).resize((32 * zoom, 32 * zoom),
                                                             Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell + 2, i * cell + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--quick", action="store_true",
                        help="2 subjects, 1 seed, 5 methods at 4 bits (about 4 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--subjects", nargs="+", default=[s.subject_id for s in SUBJECTS],
                        help="default: all 8")
    parser.add_argument("--methods", nargs="+", default=None, metavar="KEY",
                        choices=[m.key for m in [*paper_methods(extended=True),
                                                 *EXTRA_METHODS]],
                        help="rows to run, by key (default: the table's; e.g. "
                             "none-n1-fp32 full-n1-fp32 peqa-n1-w4 tuneqdm-n4-w4)")
    parser.add_argument("--extended", action="store_true",
                        help="also the quantized bases told in words and full fine-tuning "
                             "under the paper's recipe (the 18 rows of sessions 17-27; "
                             "about 10 min more)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--full-batch-size", type=int, default=None,
                        help="full fine-tuning's batch under the fast recipe (default "
                             f"{CompareConfig.full_batch_size})")
    parser.add_argument("--lr-full", type=float, default=None)
    parser.add_argument("--lr-lora", type=float, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--inference-steps", type=int, default=None,
                        help="DDIM steps per sample (default: CompareConfig's)")
    parser.add_argument("--captioned", action=argparse.BooleanOptionalAction, default=None,
                        help="train on each image's own caption (its background and "
                             "position) instead of the instance prompt alone")
    parser.add_argument("--invert-steps", type=int, default=None, metavar="N",
                        help="learn each subject's token embedding for N steps before "
                             "fine-tuning (toyworld/invert.py; default: CompareConfig's)")
    parser.add_argument("--lr-invert", type=float, default=None)
    parser.add_argument("--rel-lr", type=float, default=None,
                        help="scale methods: lr_scale_out = rel_lr * mean(s0)")
    parser.add_argument("--prompts", choices=PROMPT_SETS, default="evaluation",
                        help="score the evaluation prompts (the table), the tuning "
                             "prompts (to choose a recipe on, docs/toyworld.md) or the "
                             "validation prompts (a background held out of the photos; "
                             "seed = fold)")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=CompareConfig.rounding,
                        help="how the quantized rows round (default: gptq, the min/max "
                             "grid with GPTQ-chosen integers; nearest: the paper's "
                             "round-to-nearest; mse: per-channel clipping search)")
    parser.add_argument("--keep-float", nargs="+", default=(), metavar="LAYER",
                        help="UNet layers (names or shell patterns) the quantized rows leave "
                             "in float, e.g. conv_in conv_out; default: none")
    parser.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLING, default=None,
                        help="how training draws timesteps (default: CompareConfig's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--summarise", type=Path, default=None, metavar="JSON",
                        help="run nothing: write --markdown (and --json) again from a "
                             "finished run's JSON, e.g. after a change to the statistics")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """CompareConfig's defaults with what the command line sets."""
    overrides = {"steps": args.steps, "batch_size": args.batch_size,
                 "full_batch_size": args.full_batch_size, "lr_full": args.lr_full,
                 "lr_lora": args.lr_lora, "rel_lr": args.rel_lr,
                 "guidance_scale": args.guidance_scale, "captioned": args.captioned,
                 "inference_steps": args.inference_steps,
                 "timestep_sampling": args.timestep_sampling,
                 "invert_steps": args.invert_steps, "lr_invert": args.lr_invert}
    return replace(CompareConfig(), rounding=args.rounding, prompts=args.prompts,
                   keep_float=tuple(args.keep_float),
                   **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarise:
        write_outputs(args, **load_run(args.summarise))
        return
    if not (args.base / "model_index.json").is_file():
        raise SystemExit(f"--base {args.base}: no pipeline there (train it with "
                         "bash scripts/train_toyworld_base.sh)")
    methods = paper_methods(extended=args.extended)
    if args.quick:
        methods, args.seeds, args.subjects = QUICK_METHODS, [0], args.subjects[:2]
    if args.methods:
        methods = [Method.from_key(key) for key in dict.fromkeys(args.methods)]
    config = config_from_args(args)
    start = time.perf_counter()
    rows = run_grid(args.base, methods, args.subjects, args.seeds, config, args.workers,
                    grid_subjects=args.subjects)
    grid_s = time.perf_counter() - start
    memory = {} if args.no_memory else measure_memory(args.base, methods, args.memory_steps,
                                                      config.invert_steps > 0)
    if args.grid and config.prompts == "evaluation":
        write_grid(args.grid, rows, methods, args.subjects)
    command = shlex.join(["python", "benchmarks/toyworld_table.py", *(argv or sys.argv[1:])])
    write_outputs(args, rows=[{k: v for k, v in r.items() if k != "images"} for r in rows],
                  methods=methods, memory=memory, config=config, command=command,
                  seeds=args.seeds, subjects=args.subjects, machine=machine_info(),
                  seconds={"runs": grid_s, "total": time.perf_counter() - start})


def load_run(path: Path) -> dict:
    """write_outputs' arguments from a finished run's JSON (--summarise)."""
    try:
        run = json.loads(path.read_text())
        # runs before session 25 trained full fine-tuning at the common batch, runs
        # before session 27 inverted no token
        saved = {"full_batch_size": run["config"]["batch_size"], "invert_steps": 0,
                 **run["config"]}
        config = CompareConfig(**{**saved, "keep_float": tuple(saved["keep_float"])})
        return {"rows": run["rows"], "methods": [Method.from_key(k) for k in run["methods"]],
                "memory": run["memory"], "config": config, "seeds": run["seeds"],
                "subjects": run["subjects"], "seconds": run["seconds"],
                "machine": run["machine"],
                "command": run.get("command", "(command not recorded)")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--summarise {path}: not a finished run's JSON of this script "
                         f"({type(error).__name__}: {error})") from None


def subject_tables(rows: list[dict], methods: list[Method], subjects: list[str]) -> str:
    """Markdown: subject fidelity per subject (mean over seeds), and the same read on
    the objects' interiors where the rows have it (metrics.interior)."""
    columns = [("method", "method"), *((s, s) for s in subjects), ("weakest", "weakest")]
    text = ("Subject fidelity per subject (mean over seeds):\n\n"
            + markdown_table(per_subject(rows, methods, subjects), columns))
    interior = per_subject(rows, methods, subjects, "subject_fidelity_interior")
    if interior:
        text += ("\n\nThe same with colour and pattern read on each object's interior, "
                 "without its 1-px outline (a diagnostic of soft edges, docs/toyworld.md "
                 "\"Edges\"):\n\n" + markdown_table(interior, columns))
    return text


def inversion_note(rows: list[dict], memory: dict, config: CompareConfig) -> str:
    """A line under the table on the token inversion the fine-tuned rows start from
    (empty without one)."""
    seconds = [r["invert_s"] for r in rows if r.get("invert_s")]
    if not config.invert_steps or not seconds:
        return ""
    peak = memory.get(INVERSION, {}).get("peak_train_bytes")
    peak_text = "" if peak is None else f", peak {peak / 2**20:.1f} MiB"
    return (f"\n\nEvery fine-tuned row starts from its subject's token inversion "
            f"(toyworld/invert.py): {config.invert_steps} steps of "
            f"{config.batch_size} at {config.lr_invert:g} on the float base, learnt once "
            f"per (subject, seed) and shared by the rows; {fmean(seconds):.1f} s each"
            f"{peak_text}. Its seconds are in each fine-tuned row's train s, its row of "
            f"the text encoder's embedding in trainable numbers and bytes.")


def write_outputs(args: argparse.Namespace, rows: list[dict], methods: list[Method],
                  memory: dict, config: CompareConfig, command: str, seeds: list[int],
                  subjects: list[str], seconds: dict, machine: dict) -> None:
    """Print the table and the claims; write --markdown and --json."""
    table = markdown_table(summarise(rows, methods, memory), COLUMNS)
    tested = check_claims(rows, methods)
    claims = (markdown_table(tested, CLAIM_COLUMNS) if tested
              else "(none: the rows run do not pair up into any of them)")
    total_s = seconds["total"]
    by_subject = subject_tables(rows, methods, subjects)
    table += inversion_note(rows, memory, config)
    print(table, claims, by_subject, sep="\n\n")
    print(f"{len(rows)} runs in {seconds['runs']:.0f} s; total {total_s:.0f} s")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        workers = "" if args.summarise else f", {args.workers} workers"
        again = ("" if not args.summarise else
                 f" Summarised again from its JSON by `python benchmarks/toyworld_table.py "
                 f"--summarise {args.summarise} --markdown {args.markdown}`.")
        args.markdown.write_text(
            f"Made by `HF_HUB_OFFLINE=1 {command}` in {total_s / 60:.1f} min "
            f"({len(rows)} runs{workers}): subjects {', '.join(subjects)}; "
            f"seeds {', '.join(map(str, seeds))}; {config.to_dict()}.{again}\n\n{table}\n\n"
            f"The paper's claims on subject fidelity, runs paired by (subject, seed):\n\n"
            f"{claims}\n\n{by_subject}\n")
        print(f"wrote {args.markdown}")
    write_json(args.json, {
        "config": config.to_dict(), "seeds": seeds, "subjects": subjects,
        "methods": [m.key for m in methods], "memory": memory, "machine": machine,
        "seconds": seconds, "command": command, "rows": rows,
    })


if __name__ == "__main__":
    main()
