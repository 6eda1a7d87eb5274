"""Per-subject artefacts in storage, their completion marker, and resume checks.

    <output>/subjects/<subject_id>/scales.safetensors   the trained scale set
    <output>/subjects/<subject_id>/meta.json            settings, base, losses, timing
    <output>/subjects/<subject_id>/samples/NN.png       a few generated samples
    <output>/subjects/<subject_id>/done.json            written LAST: sha256 of each file

A subject counts as finished only if `verify_subject` passes: done.json is there, says
"done" for the same base fingerprint and the same spec hash (subject + settings), every
listed file exists with the recorded sha256, meta.json agrees, and the scale set parses
and names the same base. A crash at any point before done.json leaves a folder that
is simply redone; retraining deletes done.json first, so a half-overwritten folder is
never mistaken for a finished one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .storage import Storage, sha256_hex

SUBJECTS_DIR = "subjects"
SCALES = "scales.safetensors"
META = "meta.json"
DONE = "done.json"
SAMPLES_DIR = "samples"


def subject_rel(subject_id: str, name: str = "") -> str:
    from .manifest import validate_subject_id

    validate_subject_id(subject_id)
    base = f"{SUBJECTS_DIR}/{subject_id}"
    return f"{base}/{name}" if name else base


@dataclass(frozen=True)
class Verdict:
    """Whether a subject's folder holds a finished artefact, and why not."""

    done: bool
    reason: str
    meta: dict[str, Any] | None = None


def write_subject(storage: Storage, subject_id: str, scales: bytes, meta: dict[str, Any],
                  samples: list[bytes]) -> str:
    """Write one subject's artefacts, done.json last. Returns the folder URI."""
    storage.remove(subject_rel(subject_id, DONE))  # from now on the folder is unfinished
    files: dict[str, str] = {}
    for index, png in enumerate(samples):
        name = f"{SAMPLES_DIR}/{index:02d}.png"
        storage.write_bytes(subject_rel(subject_id, name), png)
        files[name] = sha256_hex(png)
    storage.write_bytes(subject_rel(subject_id, SCALES), scales)
    files[SCALES] = sha256_hex(scales)
    meta_bytes = _json_bytes(meta)
    storage.write_bytes(subject_rel(subject_id, META), meta_bytes)
    files[META] = sha256_hex(meta_bytes)
    done = {
        "status": "done",
        "subject_id": subject_id,
        "base_fingerprint": meta["base"]["fingerprint"],
        "spec_hash": meta["spec_hash"],
        "run_id": meta.get("run_id"),
        "finished_at": meta.get("finished_at"),
        "files": files,
    }
    storage.write_json(subject_rel(subject_id, DONE), done)
    return storage.uri(subject_rel(subject_id))


def verify_subject(storage: Storage, subject_id: str, fingerprint: str | None,
                   spec_hash: str | None, load_scales: bool = True) -> Verdict:
    """Check a subject's folder; `fingerprint` / `spec_hash` None skip those checks."""
    try:
        done = storage.read_json(subject_rel(subject_id, DONE))
    except FileNotFoundError:
        exists = storage.exists(subject_rel(subject_id))
        return Verdict(False, "unfinished (no done.json)" if exists else "not started")
    except OSError as err:
        return Verdict(False, f"done.json unreadable: {err}")
    if not isinstance(done, dict) or done.get("status") != "done":
        return Verdict(False, "done.json does not say done")
    if fingerprint is not None and done.get("base_fingerprint") != fingerprint:
        return Verdict(False, "trained on another base")
    if spec_hash is not None and done.get("spec_hash") != spec_hash:
        return Verdict(False, "subject or settings changed since it was trained")
    files = done.get("files")
    if not isinstance(files, dict) or SCALES not in files or META not in files:
        return Verdict(False, "done.json lists no scale set or meta")
    contents: dict[str, bytes] = {}
    for name, digest in sorted(files.items()):
        try:
            data = storage.read_bytes(subject_rel(subject_id, name))
        except (FileNotFoundError, OSError):
            return Verdict(False, f"{name} is missing")
        if sha256_hex(data) != digest:
            return Verdict(False, f"{name} does not match its checksum")
        if name in (SCALES, META):
            contents[name] = data
    meta = json.loads(contents[META])
    if meta.get("status") != "done" or meta.get("spec_hash") != done.get("spec_hash"):
        return Verdict(False, "meta.json disagrees with done.json")
    if load_scales:
        from tuneqdm.scaleset import ScaleSet, ScaleSetError

        try:
            scale_set = ScaleSet.from_bytes(contents[SCALES], source=SCALES)
        except ScaleSetError as err:
            return Verdict(False, f"scale set does not load: {err}")
        if scale_set.base_fingerprint != done.get("base_fingerprint"):
            return Verdict(False, "scale set names another base")
        if subject_id not in scale_set.subject_ids:
            return Verdict(False, f"scale set is for {scale_set.subject_ids}, not {subject_id}")
    return Verdict(True, "finished", meta)


def read_meta(storage: Storage, subject_id: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(subject_rel(subject_id, META))
    except (FileNotFoundError, OSError):
        return None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
