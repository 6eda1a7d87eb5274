"""The TuneQDM authors' released checkpoint -> a quantized base and a subject in an output.

    import_reference(ReferenceImport(...), storage) -> ImportResult

tuneqdm.reference_import converts the checkpoint (integers, zero points, per-expert
scales of every quantized layer) and the float pipeline it was made from into our
quantized base and one scale set. This module stores both in the layout `submit`
writes (docs/design.md §4), so `status`, `serve` and `generate` see the subject like
a trained one:

    <output>/bases/<address>/     the base, done.json last; <address> is derived from
                                  the base's fingerprint, so checkpoints made from the
                                  same quantized model share one base (and one server)
    <output>/subjects/<id>/       scales.safetensors + meta.json, done.json last

No Ray: the import is one process's work (a UNet-sized load, no training).
"""

from __future__ import annotations

import hashlib
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .columns import DEFAULT_PROMPT, DEFAULT_TOKEN, TOKEN_PATTERN
from .store import (
    DONE,
    BaseInfo,
    Storage,
    SubjectMeta,
    base_rel,
    read_base,
    read_done,
    sha256_hex,
    subject_rel,
    validate_subject_id,
    write_base,
    write_subject,
)
from .store.layout import ADDRESS_LENGTH
from .worker import library_versions

PLACEHOLDERS = ("{token}", "{class_noun}")


class ReferenceImportError(ValueError):
    """The import's arguments are unusable (subject id, token, prompt, an existing
    subject); nothing was written."""


@dataclass(frozen=True)
class ReferenceImport:
    """checkpoint: the released implementation's torch.save file; base_model: the
    float diffusers pipeline (hub id or folder) it was made from; the subject's id,
    class noun, identifier token and prompt template, as in subjects.csv."""

    checkpoint: str
    base_model: str
    subject_id: str
    class_noun: str
    token: str = DEFAULT_TOKEN
    prompt: str = DEFAULT_PROMPT
    overwrite: bool = False

    def check(self, storage: Storage) -> None:
        """ReferenceImportError for a bad subject id, token or prompt, or a finished subject of
        that id already in storage (unless overwrite)."""
        try:
            validate_subject_id(self.subject_id)
        except ValueError as err:
            raise ReferenceImportError(f"subject id {err}") from None
        if not TOKEN_PATTERN.match(self.token):
            raise ReferenceImportError(f"token {self.token!r} must be one word of 1-32 "
                                       "letters, digits, '_', '-', '<' or '>'")
        if not self.class_noun.strip():
            raise ReferenceImportError("class noun is empty; give one, e.g. dog")
        leftover = self.prompt
        for placeholder in PLACEHOLDERS:
            leftover = leftover.replace(placeholder, "")
        if "{token}" not in self.prompt or "{" in leftover or "}" in leftover:
            raise ReferenceImportError(f"prompt {self.prompt!r} must contain {{token}} and no "
                               "placeholders but {token} and {class_noun}")
        if not self.overwrite and storage.exists(subject_rel(self.subject_id, DONE)):
            raise ReferenceImportError(f"subject {self.subject_id!r} already has a finished scale "
                               f"set in {storage.root}; choose another id or overwrite it")

    @property
    def instance_prompt(self) -> str:
        return self.prompt.replace("{token}", self.token).replace("{class_noun}",
                                                                  self.class_noun)


@dataclass(frozen=True)
class ImportResult:
    base: BaseInfo                 # the stored base (its marker and quant.json)
    base_written: bool             # False: an identical base was already in storage
    subject_uri: str
    layers: int
    scale0_source: dict[str, int]  # how s0 was obtained, per layer count


def imported_base_address(fingerprint: str) -> str:
    """The storage address of an imported base: a function of its fingerprint only."""
    digest = hashlib.sha256(f"reference-import:{fingerprint}".encode()).hexdigest()
    return digest[:ADDRESS_LENGTH]


def import_reference(request: ReferenceImport, storage: Storage) -> ImportResult:
    """Convert the checkpoint; store the base (unless already there) and the subject."""
    from tuneqdm.reference_import import import_reference_checkpoint

    request.check(storage)
    start = time.perf_counter()
    subject = {"subject_id": request.subject_id, "token": request.token,
               "class_noun": request.class_noun}
    with tempfile.TemporaryDirectory(prefix="tuneqdm-import-") as tmp:
        local = Path(tmp) / "base"
        info, scale_set = import_reference_checkpoint(
            request.checkpoint, request.base_model, local, subjects=[subject])
        address = imported_base_address(info["fingerprint"])
        done = read_done(storage, address)
        written = done is None
        if written:
            done = write_base(storage, address, local)  # keeps a faster writer's base
    scales = scale_set.to_bytes()
    meta = _subject_meta(request, done, info, time.perf_counter() - start)
    uri = write_subject(storage, request.subject_id, scales, meta, [])
    base = read_base(storage, address)
    if base is None:
        raise OSError(f"the base written to {storage.uri(base_rel(address))} does not verify")
    return ImportResult(base, written, uri, len(info["layers"]), info["scale0_source"])


def _subject_meta(request: ReferenceImport, done: dict[str, Any], info: dict[str, Any],
                  seconds: float) -> SubjectMeta:
    """meta.json of an imported subject: the fields a trained subject's has, with no
    training of ours (no losses, no steps), and where it came from."""
    checkpoint_sha = sha256_hex(Path(request.checkpoint).read_bytes())
    spec = {"reference_checkpoint_sha256": checkpoint_sha, "subject": request.subject_id,
            "token": request.token, "class_noun": request.class_noun,
            "prompt": request.prompt, "base": done["address"]}
    return SubjectMeta(
        subject_id=request.subject_id, base_fingerprint=done["fingerprint"],
        base_address=done["address"],
        spec_hash=sha256_hex(repr(sorted(spec.items())).encode())[:32],
        run_id="import-" + time.strftime("%Y%m%d-%H%M%S"),
        members=(request.subject_id,), class_noun=request.class_noun, token=request.token,
        prompt=request.prompt, quant_config=info["quant_config"], train_seconds=0.0,
        seconds=round(seconds, 3), scales_dtype="float32", attempt=0,
        host=socket.gethostname(), versions=library_versions(),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        imported_from={"checkpoint": str(request.checkpoint), "sha256": checkpoint_sha,
                       "base_model": request.base_model,
                       "scale0_source": info["scale0_source"]})
