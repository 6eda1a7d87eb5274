"""benchmarks/toyworld_positions.py: the scenes it draws and how it splits them."""

from __future__ import annotations

from pathlib import Path

from toyworld.subjects import get_subject, subject_contexts
from toyworld.world import POSITIONS
from tuneqdm.testing import load_script

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    return load_script(ROOT / "benchmarks" / "toyworld_positions.py")


def test_scenes_put_the_subject_on_its_photos_backgrounds_at_every_position():
    bench = _bench()
    subject = get_subject("checkered-star")
    scenes = bench.position_scenes(subject, seed=0)
    train, evaluation = subject_contexts(subject)
    backgrounds = {s.background for s in train}
    assert len(scenes) == len(backgrounds) * len(POSITIONS) == 36
    assert {(s.background, s.position) for s in scenes} == {
        (b, p) for b in backgrounds for p in POSITIONS}
    assert not {s.background for s in scenes} & {s.background for s in evaluation}
    assert all((s.shape, s.pattern, s.colour) == ("star", "checkered", "purple")
               for s in scenes)
    assert bench.position_scenes(subject, seed=0) == scenes


def test_summary_splits_seen_from_new_positions():
    bench = _bench()
    images = [{"position": "top", "seen": False, "score": 0.5, "colour": 1.0, "shape": 0.0,
               "pattern": 0.5},
              {"position": "left", "seen": False, "score": 0.7, "colour": 1.0, "shape": 1.0,
               "pattern": 0.1},
              {"position": "right", "seen": True, "score": 0.9, "colour": 1.0, "shape": 1.0,
               "pattern": 0.7}]
    runs = [{"method": "full-n1-fp32", "label": "full-precision DreamBooth",
             "subject": "checkered-star", "seed": 0, "images": images}]
    [row] = bench.summarise(runs)
    assert row["method"] == "full-precision DreamBooth"
    assert (row["seen pattern"], row["new pattern"], row["new shape"]) == (0.7, 0.3, 0.5)
    assert row["pattern gap"] == 0.4
