"""A subject's folder in storage: writing it, and the one read-and-verify API.

    subjects/<id>/samples/NN.png, photos/NN.png, scales.safetensors, meta.json   first
    subjects/<id>/done.json      written LAST: {"status": "done", "files": {name: sha256}}

`verify_subject` is the only reader of this format; `status` (pipeline/summary.py),
resume (pipeline/run.py) and Serve (deploy/store.py) all call it, each at the depth it
needs. It always reads done.json and meta.json (checksum-checked) and compares the
base fingerprint and spec hash it was asked about; `load_scales` also reads the scale
set, checks its checksum, parses it (never unpickled) and checks that it names this
subject and the base in meta.json; `check_files` also checksums every other listed
file (the samples); `read_subject_file` reads one listed file (a sample) of a verified
folder, checksum-checked. A crash at any point before done.json leaves a folder that is
simply redone; rewriting deletes done.json first, so a half-overwritten folder is
never mistaken for a finished one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .layout import DONE, META, SCALES, SUBJECTS_DIR, photo_name, sample_name, subject_rel
from .records import SubjectMeta
from .storage import Storage, sha256_hex


class Defect(str, Enum):
    """Why a subject's folder is not a finished artefact (Verdict.defect)."""

    NOT_STARTED = "not_started"          # no folder
    UNFINISHED = "unfinished"            # a folder without done.json
    NOT_DONE = "not_done"                # done.json unreadable, not "done", or incomplete
    MISSING = "missing"                  # a listed file is missing (Verdict.file)
    CHECKSUM = "checksum"                # a listed file differs from its sha256
    MALFORMED_META = "malformed_meta"    # meta.json is not a SubjectMeta
    OTHER_BASE = "other_base"            # trained on another base than the one asked
    SPEC_CHANGED = "spec_changed"        # subject or settings changed since
    SCALES_UNLOADABLE = "scales_unloadable"
    SCALES_OTHER_BASE = "scales_other_base"
    SCALES_OTHER_SUBJECT = "scales_other_subject"


@dataclass(frozen=True)
class Verdict:
    """Whether a subject's folder holds a finished artefact, and why not.

    meta: meta.json as stored, record: the same as a SubjectMeta (both once read);
    files: done.json's checksums; scale_set: the parsed tuneqdm ScaleSet once loaded;
    detail: the underlying error's message.
    """

    done: bool
    reason: str
    meta: dict[str, Any] | None = None
    defect: Defect | None = None
    file: str | None = None
    detail: str = ""
    subject_id: str = ""
    files: dict[str, str] = field(default_factory=dict)
    record: SubjectMeta | None = None
    scale_set: Any = None


def write_subject(storage: Storage, subject_id: str, scales: bytes,
                  meta: SubjectMeta | Mapping[str, Any], samples: Sequence[bytes],
                  photos: Sequence[bytes] = ()) -> str:
    """Write one subject's artefacts, done.json last. Returns the folder URI.

    `meta` may be a mapping in meta.json's shape; a missing subject_id is filled in.
    """
    if not isinstance(meta, SubjectMeta):
        meta = SubjectMeta.from_dict(dict(meta), subject_id)
    if meta.subject_id != subject_id:
        raise ValueError(f"meta.json of {subject_id!r} names subject {meta.subject_id!r}")
    storage.remove(subject_rel(subject_id, DONE))  # from now on the folder is unfinished
    meta_bytes = (json.dumps(meta.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
                  ).encode()
    contents = {**{sample_name(i): png for i, png in enumerate(samples)},
                **{photo_name(i): png for i, png in enumerate(photos)},  # thumbnails
                SCALES: scales, META: meta_bytes}
    storage.write_files({subject_rel(subject_id, name): data
                         for name, data in contents.items()})
    files = {name: sha256_hex(data) for name, data in contents.items()}
    storage.write_json(subject_rel(subject_id, DONE), {"status": "done", "files": files})
    return storage.uri(subject_rel(subject_id))


def subject_ids(storage: Storage) -> list[str]:
    """Folder names under subjects/ that are valid ids (finished or not), sorted."""
    ids = []
    for name in storage.list_dir(SUBJECTS_DIR):
        try:
            subject_rel(name)
        except ValueError:
            continue  # not one of ours
        ids.append(name)
    return ids


def verify_subject(storage: Storage, subject_id: str, fingerprint: str | None = None,
                   spec_hash: str | None = None, load_scales: bool = True,
                   check_files: bool = True, scales_source: str = SCALES) -> Verdict:
    """Check a subject's folder (see the module docstring).

    `fingerprint` / `spec_hash` None skip those comparisons; `scales_source` names the
    scale set in its parse errors.
    """
    found = _read_marker(storage, subject_id)
    if not found.done:
        return found
    found = _read_meta(storage, subject_id, found.files)
    if not found.done:
        return found
    record = found.record
    if fingerprint is not None and record.base_fingerprint != fingerprint:
        return _fail(found, Defect.OTHER_BASE, "trained on another base")
    if spec_hash is not None and record.spec_hash != spec_hash:
        return _fail(found, Defect.SPEC_CHANGED,
                     "subject or settings changed since it was trained")
    if check_files:
        for name in sorted(set(found.files) - {META, SCALES}):
            checked = _read_checked(storage, found, name)
            if isinstance(checked, Verdict):
                return checked
    if load_scales:
        return _load_scales(storage, found, record, scales_source)
    return found


def _fail(found: Verdict, defect: Defect, reason: str, file: str | None = None,
          detail: str = "", scale_set: Any = None) -> Verdict:
    return Verdict(False, reason, found.meta, defect, file, detail, found.subject_id,
                   found.files, found.record, scale_set)


def _read_marker(storage: Storage, subject_id: str) -> Verdict:
    """done.json's checksums (in a passing Verdict), or why there are none."""
    try:
        done = storage.read_json(subject_rel(subject_id, DONE))
    except FileNotFoundError:
        if storage.exists(subject_rel(subject_id)):
            return Verdict(False, "unfinished (no done.json)", defect=Defect.UNFINISHED,
                           subject_id=subject_id)
        return Verdict(False, "not started", defect=Defect.NOT_STARTED,
                       subject_id=subject_id)
    except OSError as err:
        return Verdict(False, f"done.json unreadable: {err}", defect=Defect.NOT_DONE,
                       subject_id=subject_id, detail=str(err))
    if not isinstance(done, dict) or done.get("status") != "done":
        return Verdict(False, "done.json does not say done", defect=Defect.NOT_DONE,
                       subject_id=subject_id)
    files = done.get("files")
    if not isinstance(files, dict) or SCALES not in files or META not in files:
        return Verdict(False, "done.json lists no scale set or meta", defect=Defect.NOT_DONE,
                       subject_id=subject_id)
    return Verdict(True, "finished", subject_id=subject_id, files=dict(files))


def read_subject_file(storage: Storage, found: Verdict, name: str) -> bytes | Verdict:
    """The bytes of `name` (e.g. `samples/00.png`), a file that `found` (a passing
    Verdict of verify_subject) lists, if they match their checksum; else a failing
    Verdict (MISSING, CHECKSUM). KeyError if done.json does not list `name`."""
    if name not in found.files:
        raise KeyError(name)
    return _read_checked(storage, found, name)


def _read_checked(storage: Storage, found: Verdict, name: str) -> bytes | Verdict:
    """The bytes of listed file `name` if they match their checksum, else a Verdict."""
    try:
        data = storage.read_bytes(subject_rel(found.subject_id, name))
    except OSError:
        return _fail(found, Defect.MISSING, f"{name} is missing", name)
    if sha256_hex(data) != found.files[name]:
        return _fail(found, Defect.CHECKSUM, f"{name} does not match its checksum", name)
    return data


def _read_meta(storage: Storage, subject_id: str, files: dict[str, str]) -> Verdict:
    marker = Verdict(True, "finished", subject_id=subject_id, files=files)
    data = _read_checked(storage, marker, META)
    if isinstance(data, Verdict):
        return data
    try:
        meta = json.loads(data)
        record = SubjectMeta.from_dict(meta, subject_id)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        return _fail(marker, Defect.MALFORMED_META, f"meta.json does not parse: {err}",
                     META, str(err))
    return Verdict(True, "finished", meta, subject_id=subject_id, files=files, record=record)


def _load_scales(storage: Storage, found: Verdict, record: SubjectMeta,
                 source: str) -> Verdict:
    from tuneqdm.scaleset import ScaleSet, ScaleSetError

    data = _read_checked(storage, found, SCALES)
    if isinstance(data, Verdict):
        return data
    try:
        scale_set = ScaleSet.from_bytes(data, source=source)
    except ScaleSetError as err:
        return _fail(found, Defect.SCALES_UNLOADABLE, f"scale set does not load: {err}",
                     SCALES, str(err))
    if scale_set.base_fingerprint != record.base_fingerprint:
        return _fail(found, Defect.SCALES_OTHER_BASE, "scale set names another base", SCALES,
                     scale_set=scale_set)
    if found.subject_id not in scale_set.subject_ids:
        return _fail(found, Defect.SCALES_OTHER_SUBJECT,
                     f"scale set is for {scale_set.subject_ids}, not {found.subject_id}",
                     SCALES, scale_set=scale_set)
    return Verdict(True, "finished", found.meta, subject_id=found.subject_id,
                   files=found.files, record=record, scale_set=scale_set)
