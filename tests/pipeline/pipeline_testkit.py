"""Helpers for the pipeline tests: DreamBooth photos copied into subject folders,
broken photo folders, CSV writing. (Imported by name: pytest puts this folder on
sys.path.)"""

from __future__ import annotations

import shutil
from pathlib import Path

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "dreambooth"  # beside the repo


def copy_photos(subject: str, target: Path, count: int = 3) -> Path:
    """Copy the first `count` DreamBooth photos of `subject` into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted((DREAMBOOTH / subject).glob("*.jpg"))[:count]:
        shutil.copy(path, target / path.name)
    return target


def truncated_photo_folder(target: Path) -> Path:
    """A folder whose second photo is cut short: passes the header check, fails to
    decode in the worker."""
    copy_photos("cat", target, 2)
    second = sorted(target.iterdir())[1]
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 3])
    return target


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    lines = [",".join(columns)] + [",".join(r.get(c, "") for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
