"""Where in the image does a fine-tuned subject keep its look? A diagnostic, never a
recipe choice.

Each run trains as a table run does (toyworld.compare.run, all 5 photos), then draws
the subject on its photos' own 4 backgrounds at all 9 positions (2 images each), and
reads every image (metrics.subject_fidelity). The positions split into the 5 its
photos show ("seen") and the 4 they do not ("new"; these are the evaluation prompts'
positions, on other backgrounds, so this script reads the table's weakness, and no
recipe is chosen on it: docs/toyworld.md "Positions and the token").

    HF_HUB_OFFLINE=1 python benchmarks/toyworld_positions.py --methods full-n1-fp32 \\
        words-n1-fp32 lora-n1-fp32 --subjects checkered-star --json outputs/positions.json

prints, per method and subject, colour, shape, pattern and subject fidelity at seen
and at new positions, with the gap in pattern.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

import numpy as np
from _common import markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("score", "colour", "shape", "pattern")


def position_scenes(subject, seed: int) -> list:
    """The subject on each of its photos' backgrounds at each of the 9 positions
    (scenes alternate plain background and floor), in a fixed order."""
    from toyworld.subjects import subject_contexts
    from toyworld.world import POSITIONS, SCENES, sample_scene

    train, _ = subject_contexts(subject)
    rng = np.random.default_rng([seed, 99])
    backgrounds = list(dict.fromkeys(s.background for s in train))
    return [sample_scene(rng, shape=subject.shape, pattern=subject.pattern,
                         colour=subject.colour, background=background,
                         scene=SCENES[i % 2], position=position)
            for i, background in enumerate(backgrounds) for position in POSITIONS]


def one_run(job: tuple) -> dict:
    """Train `key` on `subject_id` (seed), draw position_scenes, read every image."""
    key, subject_id, seed, base, invert_steps = job
    import torch

    torch.set_num_threads(1)
    from toyworld.compare import CompareConfig, Method, load_base, run
    from toyworld.metrics import subject_fidelity
    from toyworld.subjects import get_subject, subject_contexts
    from toyworld.world import caption

    subject, method = get_subject(subject_id), Method.from_key(key)
    scenes = position_scenes(subject, seed)
    token = None if method.name == "words" else subject.token
    prompts = [caption(scene, token=token) for scene in scenes]
    config = replace(CompareConfig(), invert_steps=invert_steps)
    row = run(load_base(base), method, subject, seed, config, keep_images=True,
              prompts=prompts)
    seen = {s.position for s in subject_contexts(subject)[0]}
    per_image = config.images_per_prompt
    images = []
    for k, image in enumerate(row["images"]):
        reading = subject_fidelity(image, subject)
        images.append({"position": scenes[k // per_image].position,
                       "seen": scenes[k // per_image].position in seen,
                       **{part: float(getattr(reading, part)) for part in PARTS}})
    return {"method": key, "label": row["label"], "subject": subject_id, "seed": seed,
            "images": images}


def summarise(runs: list[dict]) -> list[dict]:
    """Per method and subject: seen and new means of PARTS, and the pattern gap."""
    rows = []
    for key in dict.fromkeys(r["method"] for r in runs):
        for subject in dict.fromkeys(r["subject"] for r in runs):
            images = [i for r in runs if r["method"] == key and r["subject"] == subject
                      for i in r["images"]]
            if not images:
                continue
            row = {"method": next(r["label"] for r in runs if r["method"] == key),
                   "subject": subject}
            for seen, name in ((True, "seen"), (False, "new")):
                for part in PARTS:
                    row[f"{name} {part}"] = round(float(np.mean(
                        [i[part] for i in images if i["seen"] == seen])), 3)
            row["pattern gap"] = round(row["seen pattern"] - row["new pattern"], 3)
            rows.append(row)
    return rows


COLUMNS = [(c, c) for c in ("method", "subject", *(f"seen {p}" for p in PARTS),
                            *(f"new {p}" for p in PARTS), "pattern gap")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "models" / "toyworld-base")
    parser.add_argument("--methods", nargs="+", default=["full-n1-fp32"], metavar="KEY")
    parser.add_argument("--subjects", nargs="+", default=["checkered-star"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--invert-steps", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    jobs = [(key, subject, seed, str(args.base), args.invert_steps)
            for key in args.methods for subject in args.subjects for seed in args.seeds]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(one_run, jobs))
    print(markdown_table(summarise(runs), COLUMNS))
    write_json(args.json, {"command": sys.argv, "runs": runs})


if __name__ == "__main__":
    main()
