"""What the base trains on, and what is held out of its training.

Two things never occur in the base's training images:

- 8 (object colour, background colour) pairs, one per colour as object and one per
  colour as background: object colour i on background colour (i + 3) mod 8. Every colour
  is still seen as object and as background, just never in these pairs. The held-out
  caption test (`held_out_scenes`) renders only these pairs, so a correct image shows
  the base composing colours it has not seen together, not recalling an image.
- the subjects' (shape, pattern) combinations (subjects.py), so each subject is a new
  object to the base even though its shape and its pattern are familiar.

Training captions drop parts at random (the colour, the background, the position, or
everything, for classifier-free guidance) and sometimes start "a photo of", so that
short instance prompts ("a sks star", "a photo of sks star") are in distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .subjects import SUBJECTS
from .world import COLOUR_NAMES, Scene, caption, sample_scene

HELD_OUT_COLOUR_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (COLOUR_NAMES[i], COLOUR_NAMES[(i + 3) % len(COLOUR_NAMES)])
    for i in range(len(COLOUR_NAMES))
)
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset((s.shape, s.pattern) for s in SUBJECTS)


@dataclass(frozen=True)
class CaptionDropout:
    """Probabilities of leaving parts out of a training caption."""

    empty: float = 0.1  # the whole caption (for classifier-free guidance)
    colour: float = 0.1
    background: float = 0.15
    position: float = 0.15
    photo_prefix: float = 0.2  # "a photo of a red star ..."


def in_training_split(scene: Scene) -> bool:
    """True if the base may train on `scene`."""
    return ((scene.colour, scene.background) not in HELD_OUT_COLOUR_PAIRS
            and (scene.shape, scene.pattern) not in HELD_OUT_COMBOS)


def sample_training_scene(rng: np.random.Generator) -> Scene:
    """A uniform random scene of the training split (rejection sampling)."""
    while True:
        scene = sample_scene(rng)
        if in_training_split(scene):
            return scene


def training_caption(scene: Scene, rng: np.random.Generator,
                     dropout: CaptionDropout = CaptionDropout()) -> str:
    """A caption of `scene` with parts dropped at random (see CaptionDropout)."""
    if rng.random() < dropout.empty:
        return ""
    text = caption(scene, with_colour=rng.random() >= dropout.colour,
                   with_background=rng.random() >= dropout.background,
                   with_position=rng.random() >= dropout.position)
    if rng.random() < dropout.photo_prefix:
        text = "a photo of " + text
    return text


def held_out_scenes(count: int, seed: int = 1) -> list[Scene]:
    """`count` scenes whose (colour, background) pair is held out of training.

    Shapes and patterns come from the training combinations; pairs cycle so each
    held-out pair is used about equally often.
    """
    rng = np.random.default_rng(seed)
    pairs = sorted(HELD_OUT_COLOUR_PAIRS)
    scenes = []
    while len(scenes) < count:
        colour, background = pairs[len(scenes) % len(pairs)]
        scene = sample_scene(rng, colour=colour, background=background)
        if (scene.shape, scene.pattern) not in HELD_OUT_COMBOS:
            scenes.append(scene)
    return scenes


__all__ = [
    "HELD_OUT_COLOUR_PAIRS", "HELD_OUT_COMBOS", "CaptionDropout",
    "held_out_scenes", "in_training_split", "sample_training_scene", "training_caption",
]
