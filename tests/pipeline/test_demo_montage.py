"""scripts/demo_montage.py: the README's montage of a finished run, read through the
artefact store (training-photo thumbnails beside samples, finished subjects only)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from test_store import _meta, _scales

from pipeline.store import Storage, write_subject
from tuneqdm.testing import load_script

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script(ROOT / "scripts" / "demo_montage.py")


def _png(colour: tuple[int, int, int], side: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(out, format="PNG")
    return out.getvalue()


def test_montage_puts_each_subjects_photos_beside_its_samples(tmp_path, capsys):
    storage = Storage(str(tmp_path / "run"))
    for sid, shade in (("cat", 40), ("dog", 200)):
        write_subject(storage, sid, _scales(sid), _meta(sid, sample_count=1),
                      samples=[_png((shade, 0, 0))],
                      photos=[_png((0, shade, 0)), _png((0, 0, shade))])
    storage.write_bytes("subjects/owl/scales.safetensors", b"unfinished")  # no done.json
    script = _script()
    out = tmp_path / "montage.png"
    script.main([str(tmp_path / "run"), "--out", str(out), "--side", "10"])
    assert "skipped owl" in capsys.readouterr().err
    image = np.asarray(Image.open(out))
    cell, left, top = 14, script.LABEL_W, 18
    assert image.shape == (top + 2 * cell, left + 2 * cell + script.GAP + cell, 3)
    for row, shade in enumerate((40, 200)):  # rows in id order: cat, dog
        y = top + row * cell + 5
        assert tuple(image[y, left + 5]) == (0, shade, 0)  # first photo
        assert tuple(image[y, left + cell + 5]) == (0, 0, shade)  # second photo
        assert tuple(image[y, left + 2 * cell + script.GAP + 5]) == (shade, 0, 0)  # sample
