"""A montage of a finished run: per subject, its training photos beside its samples.

Reads any output of `tuneqdm-pipeline submit` (a local folder or s3://) through the
artefact store: only subjects that `verify_subject` accepts, their `photos/NN.png`
(thumbnails of the training photos) and `samples/NN.png` (generated from the photos'
captions in turn, else the instance prompt). One row per subject, photos left,
samples right, nearest-neighbour zoom.

    python scripts/demo_montage.py outputs/demo --out docs/demo_montage.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw

from pipeline.store import (
    PHOTOS_DIR,
    SAMPLES_DIR,
    Storage,
    subject_ids,
    subject_rel,
    verify_subject,
)

LABEL_W, GAP = 150, 12


def subject_images(storage: Storage, subject_id: str) -> tuple[list, list] | None:
    """(photos, samples) of a verified subject as PIL images in file order; None (and
    a line on stderr) for a subject the verifier does not accept."""
    verdict = verify_subject(storage, subject_id, load_scales=False)
    if not verdict.done:
        print(f"skipped {subject_id}: {verdict.reason}", file=sys.stderr)
        return None
    folder = subject_rel(subject_id)

    def read(prefix: str) -> list:
        names = sorted(n for n in verdict.files if n.startswith(prefix + "/"))
        return [Image.open(io.BytesIO(storage.read_bytes(f"{folder}/{n}"))).convert("RGB")
                for n in names]

    return read(PHOTOS_DIR), read(SAMPLES_DIR)


def montage(rows: list[tuple[str, list, list]], side: int = 96) -> Image.Image:
    """rows: (label, photos, samples). Photos, a gap, then samples, each `side` px."""
    photos_n = max(len(p) for _, p, _ in rows)
    samples_n = max(len(s) for _, _, s in rows)
    cell = side + 4
    width = LABEL_W + cell * photos_n + GAP + cell * samples_n
    canvas = Image.new("RGB", (width, 18 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((LABEL_W, 3), "training photos", fill="black")
    draw.text((LABEL_W + cell * photos_n + GAP, 3), "samples", fill="black")
    for i, (label, photos, samples) in enumerate(rows):
        top = 18 + i * cell
        draw.text((4, top + side // 2 - 6), label, fill="black")
        for j, image in enumerate(photos):
            canvas.paste(image.resize((side, side), Image.NEAREST), (LABEL_W + j * cell, top))
        left = LABEL_W + cell * photos_n + GAP
        for j, image in enumerate(samples):
            canvas.paste(image.resize((side, side), Image.NEAREST), (left + j * cell, top))
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a submit output (folder or s3://)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--side", type=int, default=96, help="pixels per image (default 96)")
    args = parser.parse_args(argv)
    storage = Storage(args.output)
    ids = subject_ids(storage)
    found = {sid: subject_images(storage, sid) for sid in ids}
    rows = [(sid, *images) for sid, images in found.items() if images is not None]
    if not rows:
        raise SystemExit(f"{args.output}: no finished subject there")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    montage(rows, args.side).save(args.out)
    print(f"wrote {args.out} ({len(rows)} subjects)")


if __name__ == "__main__":
    main()
