"""subjects.csv, one reader per column: a cell's text -> its value, or ValueError with
the message that the manifest reports for that column (file, line and column are
added by the caller, pipeline/manifest.py).

    subject_id    required; 1-64 of a-z 0-9 - _, starting with a letter or digit
    images        required; a folder, a glob or a remote prefix (photos.py); a photo's
                  caption is a sidecar <photo name>.txt holding a prompt template
    class         required; the class noun
    token         optional; one word, default "sks"
    prompt        optional; a template with {token} and {class_noun}
    group         optional; an id shared by the rows that train jointly
    steps, seed, lr_scale_out, lr_scale_in    optional training overrides
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .photos import ImageRef, caption_uri, list_images
from .store.layout import ID_PATTERN, ID_RULE

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_<>-]{1,32}$")
REQUIRED_COLUMNS = ("subject_id", "images", "class")
OPTIONAL_COLUMNS = ("token", "prompt", "group", "steps", "lr_scale_out", "lr_scale_in", "seed")
ALLOWED_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
DEFAULT_TOKEN = "sks"
DEFAULT_PROMPT = "a photo of {token} {class_noun}"
PROMPT_FIELDS = ("token", "class_noun")
MAX_STEPS = 1_000_000
MAX_SEED = 2**32 - 1


def read_subject_id(raw: str) -> str:
    if not raw:
        raise ValueError(f"is empty; use {ID_RULE}")
    if not ID_PATTERN.match(raw):
        raise ValueError(f"{raw!r} is not a valid id: use {ID_RULE}")
    return raw


def read_class(raw: str) -> str:
    if not raw:
        raise ValueError("is empty; give the class noun, e.g. dog")
    if len(raw) > 100 or not raw.isprintable():
        raise ValueError(f"{raw[:40]!r} must be printable text of at most 100 characters")
    return raw


def read_token(raw: str) -> str:
    token = raw or DEFAULT_TOKEN
    if not TOKEN_PATTERN.match(token):
        raise ValueError(f"{token!r} must be one word of 1-32 letters, digits, '_', '-', "
                         "'<' or '>'")
    return token


def read_prompt(raw: str) -> str:
    return check_template(raw or DEFAULT_PROMPT)


def check_template(prompt: str) -> str:
    """A prompt template: {token} required, {class_noun} allowed, nothing else."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
    except ValueError as err:
        raise ValueError(f"{prompt!r} is not a valid template ({err}); use {{token}} and "
                         "{class_noun}") from None
    unknown = sorted({f for f in fields if f not in PROMPT_FIELDS})
    if unknown:
        raise ValueError(f"{prompt!r} uses unknown placeholder(s) {unknown}; allowed: "
                         "{token}, {class_noun}")
    if "token" not in fields:
        raise ValueError(f"{prompt!r} must contain {{token}}")
    return prompt


def read_group(raw: str) -> str | None:
    if raw and not ID_PATTERN.match(raw):
        raise ValueError(f"{raw!r} is not a valid group id: use {ID_RULE}")
    return raw or None


def _integer_in(low: int, high: int) -> Callable[[str], int | None]:
    def read(raw: str) -> int | None:
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ValueError(f"{raw!r} must be an integer in [{low}, {high}]")
        return value

    return read


def read_rate(raw: str) -> float | None:
    """A learning rate: a positive finite number (empty: not overridden)."""
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{raw!r} must be a positive number, e.g. 1e-4")
    return value


read_steps = _integer_in(1, MAX_STEPS)
read_seed = _integer_in(0, MAX_SEED)

# The cell readers of a row, in the order their problems are reported.
CELL_READERS: tuple[tuple[str, Callable[[str], Any]], ...] = (
    ("subject_id", read_subject_id), ("class", read_class), ("token", read_token),
    ("prompt", read_prompt), ("group", read_group), ("steps", read_steps),
    ("seed", read_seed), ("lr_scale_out", read_rate), ("lr_scale_in", read_rate),
)
OVERRIDE_COLUMNS = ("steps", "seed", "lr_scale_out", "lr_scale_in")


def read_images(raw: str, base_dir: Path,
                storage_options: dict[str, Any]) -> tuple[ImageRef, ...]:
    """The photos an `images` cell names (listed, not yet opened)."""
    if not raw:
        raise ValueError("is empty; give a folder, a glob or an s3:// prefix")
    try:
        refs = list_images(raw, base_dir, storage_options)
    except Exception as err:  # a bad path, a missing bucket, no credentials, ...
        raise ValueError(f"cannot list {raw!r}: {err}") from None
    if not refs:
        raise ValueError(f"no image files found in {raw!r}")
    for ref in refs:
        if ref.caption is not None:
            try:
                check_template(ref.caption)
            except ValueError as err:
                raise ValueError(f"{caption_uri(ref.uri)}: caption {err}") from None
    return tuple(refs)
