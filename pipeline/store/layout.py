"""The artefact layout under one output root, and the id rule for the paths in it.

Every name below is declared here once (docs/design.md §4):

    bases/<address>/                     a quantized base (tuneqdm.base layout)
    bases/<address>/done.json            written LAST: address, fingerprint, timing
    subjects/<subject_id>/scales.safetensors   the trained scale set
    subjects/<subject_id>/meta.json      SubjectMeta (records.py)
    subjects/<subject_id>/samples/NN.png a few generated samples
    subjects/<subject_id>/photos/NN.png  thumbnails of its training photos (optional)
    subjects/<subject_id>/done.json      written LAST: sha256 of every file above
    summary.json, summary.parquet        the last submit's summary

Subject (and group) ids are the only user input that becomes a path: they are checked
against ID_PATTERN before any path is built.
"""

from __future__ import annotations

import re

BASES_DIR = "bases"
SUBJECTS_DIR = "subjects"
DONE = "done.json"
SCALES = "scales.safetensors"
META = "meta.json"
SAMPLES_DIR = "samples"
PHOTOS_DIR = "photos"
THUMBNAIL_SIDE = 128  # longest side of a training photo's thumbnail, pixels
QUANT_JSON = "quant.json"  # written by tuneqdm.base into every base folder
SUMMARY_JSON = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
ADDRESS_LENGTH = 24

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ID_RULE = "1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"


def validate_subject_id(value: str) -> str:
    """Return `value` if it is a valid subject (or group) id, else raise ValueError."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid id: use {ID_RULE}")
    return value


def subject_rel(subject_id: str, name: str = "") -> str:
    """`subjects/<id>[/name]`; ValueError for an invalid id."""
    validate_subject_id(subject_id)
    base = f"{SUBJECTS_DIR}/{subject_id}"
    return f"{base}/{name}" if name else base


def sample_name(index: int) -> str:
    """The name of the index-th sample image inside a subject folder."""
    return f"{SAMPLES_DIR}/{index:02d}.png"


def photo_name(index: int) -> str:
    """The name of the thumbnail of the index-th training photo inside a subject folder."""
    return f"{PHOTOS_DIR}/{index:02d}.png"


def base_rel(address: str, name: str = "") -> str:
    """`bases/<address>[/name]`."""
    base = f"{BASES_DIR}/{address}"
    return f"{base}/{name}" if name else base


def is_safe_segment(name: str) -> bool:
    """Whether `name` can be one path segment (no separator, not hidden, not . or ..)."""
    return bool(name) and "/" not in name and name not in (".", "..") and \
        not name.startswith(".")
