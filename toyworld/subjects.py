"""Subjects of the toy world: novel objects to personalise the base with.

A subject is one fixed object (a shape, a pattern, a colour) whose shape+pattern
combination never occurs in the base's training data (split.py holds them out), named by
a rare token and a class noun (its shape): "a sks star". Like the DreamBooth data set
the TuneQDM paper evaluates on (arXiv 2401.04339, section 4), each subject has a few
images in varied contexts and evaluation prompts that put it in contexts none of its
images show (background colours and positions it was never seen with).

`python -m toyworld.subjects --out examples` writes examples/subjects.csv, the images
with their captions and examples/subjects_eval.csv (the evaluation prompts); all are
committed.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .world import COLOUR_NAMES, POSITIONS, SCENES, Scene, caption, render, sample_scene

NUM_IMAGES = 5
NUM_EVAL_PROMPTS = 4
# The instance prompt, as a subjects.csv template (pipeline/manifest.py fills it in).
PROMPT_TEMPLATE = "a {token} {class_noun}"


@dataclass(frozen=True)
class Subject:
    """A novel object. `prompt` is its instance prompt ("a sks star")."""

    subject_id: str
    token: str
    shape: str
    pattern: str
    colour: str

    @property
    def class_noun(self) -> str:
        return self.shape

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(token=self.token, class_noun=self.class_noun)


SUBJECTS: tuple[Subject, ...] = (
    Subject("checkered-star", "sks", "star", "checkered", "purple"),
    Subject("striped-circle", "zwx", "circle", "striped", "orange"),
    Subject("dotted-square", "qvt", "square", "dotted", "green"),
    Subject("checkered-triangle", "pxr", "triangle", "checkered", "blue"),
    Subject("striped-diamond", "bnk", "diamond", "striped", "yellow"),
    Subject("dotted-cross", "vjd", "cross", "dotted", "red"),
    Subject("checkered-circle", "xqz", "circle", "checkered", "white"),
    Subject("striped-square", "kmw", "square", "striped", "black"),
)


def get_subject(subject_id: str) -> Subject:
    for subject in SUBJECTS:
        if subject.subject_id == subject_id:
            return subject
    raise ValueError(f"unknown subject {subject_id!r}; known: "
                     f"{', '.join(s.subject_id for s in SUBJECTS)}")


def _allowed_backgrounds(subject: Subject) -> list[str]:
    from .split import HELD_OUT_COLOUR_PAIRS  # split imports SUBJECTS from here

    return [c for c in COLOUR_NAMES
            if c != subject.colour and (subject.colour, c) not in HELD_OUT_COLOUR_PAIRS]


def subject_contexts(subject: Subject, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, evaluation scenes) of a subject.

    Training: NUM_IMAGES scenes over 4 backgrounds (one seen as both scenes) and
    NUM_IMAGES distinct positions. Evaluation: NUM_EVAL_PROMPTS scenes whose background
    colours and positions appear in none of the training scenes. Every (colour,
    background) pair used is one the base trained on, so only the object is new.
    """
    index = SUBJECTS.index(subject) if subject in SUBJECTS else 0
    rng = np.random.default_rng([seed, index])
    backgrounds = list(rng.permutation(_allowed_backgrounds(subject)))  # 6 colours
    seen_bg, unseen_bg = backgrounds[:4], backgrounds[4:6]
    positions = list(rng.permutation(list(POSITIONS)))
    seen_pos, unseen_pos = positions[:NUM_IMAGES], positions[NUM_IMAGES:]
    fixed = {"shape": subject.shape, "pattern": subject.pattern, "colour": subject.colour}
    train_bg = [*seen_bg, seen_bg[0]]
    train_scene = [SCENES[i % 2] for i in range(NUM_IMAGES)]
    train = [sample_scene(rng, background=bg, scene=sc, position=pos, **fixed)
             for bg, sc, pos in zip(train_bg, train_scene, seen_pos, strict=True)]
    evaluation = [sample_scene(rng, background=unseen_bg[i % 2], scene=SCENES[(i // 2) % 2],
                               position=unseen_pos[i], **fixed)
                  for i in range(NUM_EVAL_PROMPTS)]
    return train, evaluation


def tuning_contexts(subject: Subject, seed: int = 0) -> list[Scene]:
    """NUM_EVAL_PROMPTS scenes to tune fine-tuning recipes on, never to report.

    Each puts the subject on one of its training backgrounds at one of its training
    positions, in a (background, position) pair no training image shows. So they share
    no background and no position with the evaluation scenes, and the recipe is chosen
    without looking at the prompts that measure it (docs/toyworld.md "Recipe").
    """
    index = SUBJECTS.index(subject) if subject in SUBJECTS else 0
    train, _ = subject_contexts(subject, seed)
    shown = {(s.background, s.position) for s in train}
    pairs = [(bg, pos) for bg in dict.fromkeys(s.background for s in train)
             for pos in dict.fromkeys(s.position for s in train) if (bg, pos) not in shown]
    rng = np.random.default_rng([seed, index, 1])  # apart from subject_contexts' stream
    chosen = [pairs[i] for i in rng.choice(len(pairs), NUM_EVAL_PROMPTS, replace=False)]
    fixed = {"shape": subject.shape, "pattern": subject.pattern, "colour": subject.colour}
    return [sample_scene(rng, background=bg, scene=SCENES[i % 2], position=pos, **fixed)
            for i, (bg, pos) in enumerate(chosen)]


def validation_split(subject: Subject, fold: int, seed: int = 0) -> tuple[list[int], list[Scene]]:
    """(indices of the photos to train on, NUM_EVAL_PROMPTS scenes to score): a
    background held out of fine-tuning, to choose recipes on without the evaluation
    prompts.

    The tuning contexts reuse the photos' backgrounds, so a recipe that ties the subject
    to its photos' backgrounds scores well there and fails on the evaluation prompts'
    new ones (docs/toyworld.md "Full fine-tuning's rate"). Here one photo whose
    background no other photo shows is left out of training, and the scenes put the
    subject on that background: at the left-out photo's position and at 3 of the kept
    photos'. Fold f (mod 3) leaves out the f-th of the 3 backgrounds shown once (the
    4th background is shown twice). No evaluation background or position is used.
    """
    index = SUBJECTS.index(subject) if subject in SUBJECTS else 0
    train, _ = subject_contexts(subject, seed)
    backgrounds = [s.background for s in train]
    once = [bg for bg in dict.fromkeys(backgrounds) if backgrounds.count(bg) == 1]
    held = once[fold % len(once)]
    keep = [i for i, bg in enumerate(backgrounds) if bg != held]
    left_out = train[backgrounds.index(held)].position
    rng = np.random.default_rng([seed, index, 2, fold % len(once)])
    kept_positions = [train[i].position for i in keep]
    positions = [left_out, *(kept_positions[i] for i in
                             rng.choice(len(kept_positions), NUM_EVAL_PROMPTS - 1, replace=False))]
    fixed = {"shape": subject.shape, "pattern": subject.pattern, "colour": subject.colour}
    scenes = [sample_scene(rng, background=held, scene=SCENES[i % 2], position=pos, **fixed)
              for i, pos in enumerate(positions)]
    return keep, scenes


def tuning_prompts(subject: Subject, seed: int = 0) -> list[str]:
    """Prompts of tuning_contexts: the subject by its token, in contexts built from its
    training images' backgrounds and positions, recombined."""
    return [caption(s, token=subject.token) for s in tuning_contexts(subject, seed)]


def evaluation_prompts(subject: Subject, seed: int = 0) -> list[str]:
    """Prompts placing the subject in contexts none of its images show."""
    return [caption(s, token=subject.token) for s in subject_contexts(subject, seed)[1]]


def caption_template(scene: Scene) -> str:
    """A subject photo's caption as a prompt template (tuneqdm.data.Subject.captions):
    "a {token} {class_noun} on a blue floor, top left". It names what the photo shows
    besides the subject, so fine-tuning binds the token to the subject alone."""
    text = caption(scene, token="{token}")
    head = f"a {{token}} {scene.shape}"
    if not text.startswith(head):
        raise ValueError(f"caption {text!r} does not start with {head!r}")
    return "a {token} {class_noun}" + text[len(head):]


def described_prompts(subject: Subject, seed: int = 0) -> list[str]:
    """The evaluation prompts with the subject told in words instead of its token
    ("a purple checkered star on a orange background, top" for "a sks star on ..."):
    what the base draws when it is told what the subject looks like."""
    return [caption(s) for s in subject_contexts(subject, seed)[1]]


def write_examples(out: str | Path, seed: int = 0) -> Path:
    """Write subjects.csv, subjects_eval.csv and subjects/<id>/<n>.png under `out`, each
    photo with its caption template beside it (<n>.txt, caption_template).

    Image folders in the CSV are relative to the CSV's folder ("subjects/<id>/"), as
    pipeline/manifest.py resolves them; `prompt` is an instance prompt template with
    {token} and {class_noun}, for photos without a caption. Image folders hold PNGs and
    their captions only (the manifest refuses other files there); the evaluation
    prompts go to subjects_eval.csv (subject_id, prompt).
    """
    from PIL import Image

    out = Path(out)
    rows, eval_rows = [], []
    for subject in SUBJECTS:
        folder = out / "subjects" / subject.subject_id
        folder.mkdir(parents=True, exist_ok=True)
        train, evaluation = subject_contexts(subject, seed)
        for i, scene in enumerate(train):
            Image.fromarray(render(scene).image).save(folder / f"{i}.png", optimize=True)
            (folder / f"{i}.txt").write_text(caption_template(scene) + "\n")
        rows.append({"subject_id": subject.subject_id,
                     "images": f"subjects/{subject.subject_id}/",
                     "class": subject.class_noun, "token": subject.token,
                     "prompt": PROMPT_TEMPLATE})
        eval_rows += [{"subject_id": subject.subject_id, "prompt": caption(s, token=subject.token)}
                      for s in evaluation]
    for name, table in (("subjects.csv", rows), ("subjects_eval.csv", eval_rows)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return out / "subjects.csv"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_examples(args.out, args.seed))


if __name__ == "__main__":
    main()
