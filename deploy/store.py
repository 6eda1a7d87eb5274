"""What the service reads from storage: the served base and the trained subjects.

It reads the layout that `tuneqdm-pipeline submit` writes through the artefact store
(pipeline.store, local folder or s3://): the quantized base under bases/<address>/
and subjects/<id>/ with meta.json and scales.safetensors under their completion
marker, done.json. Subject ids are validated (pipeline.store.validate_subject_id)
before any path is built. Every subject is read with `pipeline.store.verify_subject`,
the reader that resume and `status` use too: a subject is listed once its done.json
and meta.json check out, servable when meta.json names the served base's fingerprint;
its scale set is then read, checked against its checksum, parsed (never unpickled),
and checked against the base's layers by the caller (ScaleSet.check_fits).

A subject's sample images (`samples/NN.png`) and the thumbnails of its training photos
(`photos/NN.png`, at most 128 px a side; the photos themselves stay where meta.json
says they were, possibly on another machine), all listed in its done.json, are read
one at a time, checksum-checked, for GET /v1/subjects/{id}/samples/{index} and
/photos/{index}. Subjects trained before thumbnails were kept have none (photos 0).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.store import (
    BASES_DIR,
    ID_RULE,
    SCALES,
    BaseInfo,
    Defect,
    Storage,
    Verdict,
    complete_bases,
    last_run_base,
    local_base_path,
    photo_name,
    read_base,
    read_subject_file,
    sample_name,
    subject_ids,
    validate_subject_id,
    verify_subject,
)

from .errors import BaseNotFound, InvalidRequest, SubjectMismatch, SubjectNotFound

BaseRef = BaseInfo  # the served base (address, fingerprint, source, quant_config, ...)
MAX_SAMPLES = 100  # image indices 0..99: samples/NN.png and photos/NN.png have two digits
LISTED = {"sample": sample_name, "photo": photo_name}  # images a subject folder serves


@dataclass(frozen=True)
class SubjectInfo:
    """One subject, as listed by GET /v1/subjects (from its meta.json and done.json)."""

    subject_id: str
    class_noun: str
    token: str
    method: str
    bits: int | None
    num_experts: int | None
    trained_at: str | None
    base_fingerprint: str
    servable: bool
    instance_prompt: str
    final_loss: float | None
    steps: int | None
    scales_sha256: str
    samples: int = 0  # sample images in the folder: GET .../samples/0 .. samples-1
    training_photos: int = 0  # photos it was trained on
    photos: int = 0  # thumbnails of them in the folder: GET .../photos/0 .. photos-1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_subject_id(subject_id: str) -> str:
    """The id, or InvalidRequest (422) naming the rule; run before any storage access."""
    try:
        return validate_subject_id(subject_id)
    except ValueError:
        shown = subject_id if len(subject_id) <= 80 else subject_id[:77] + "..."
        raise InvalidRequest(f"subject id {shown!r} is invalid: use {ID_RULE}") from None


def resolve_base(storage: Storage, address: str | None = None) -> BaseInfo:
    """The base to serve: `address` if given, else the only complete base under
    bases/, else the base of the last submit (summary.json). Raises BaseNotFound."""
    if address is not None:
        info = read_base(storage, address)
        if info is None:
            raise BaseNotFound(f"no complete quantized base {address!r} under "
                               f"{storage.uri(BASES_DIR)}")
        return info
    complete = complete_bases(storage)
    if len(complete) == 1:
        return next(iter(complete.values()))
    if not complete:
        raise BaseNotFound(f"{storage.root} holds no complete quantized base under "
                           f"{BASES_DIR}/: run `tuneqdm-pipeline submit -o {storage.root}` "
                           "first")
    last = last_run_base(storage)
    if last in complete:
        return complete[last]
    raise BaseNotFound(f"{storage.root} holds {len(complete)} bases ({', '.join(sorted(complete))})"
                       "; choose one with --base")


class SubjectStore:
    """Subjects and base of one output folder, for one served base.

    Picklable (rebuilt from its arguments), so Serve replicas receive it as an
    argument and open their own storage connection.
    """

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None,
                 base_address: str | None = None) -> None:
        self.storage = Storage(output, storage_options)
        self.base = resolve_base(self.storage, base_address)

    def __reduce__(self):
        return (SubjectStore, (self.storage.root, self.storage.options, self.base.address))

    def local_base_path(self, cache_dir: str | Path | None = None) -> Path:
        """A local folder holding the base (downloaded once per node if remote)."""
        return local_base_path(self.storage, self.base.address, self.base.fingerprint,
                               cache_dir)

    # -- subjects -------------------------------------------------------------------

    def subject_ids(self) -> list[str]:
        """Ids of the folders under subjects/ that are valid ids (finished or not)."""
        return subject_ids(self.storage)

    def _verified(self, subject_id: str, load_scales: bool) -> Verdict:
        """verify_subject's answer, or the Serve error for a subject that is not there."""
        check_subject_id(subject_id)
        verdict = verify_subject(self.storage, subject_id, load_scales=load_scales,
                                 check_files=False,
                                 scales_source=f"scale set of {subject_id!r}")
        if verdict.meta is not None:  # done.json and meta.json check out
            return verdict
        if verdict.defect in (Defect.NOT_STARTED, Defect.UNFINISHED):
            raise SubjectNotFound(f"subject {subject_id!r} not found: no finished scale set "
                                  "of that id")
        if verdict.defect is Defect.NOT_DONE:
            raise SubjectNotFound(f"subject {subject_id!r} not found: its training did not "
                                  "finish")
        if verdict.defect is Defect.MISSING:
            raise SubjectNotFound(f"subject {subject_id!r} not found: {verdict.file} is "
                                  "missing")
        raise SubjectMismatch(f"subject {subject_id!r}: {verdict.reason} (changed or corrupt "
                              "since training); retrain it")

    def _info(self, verdict: Verdict) -> SubjectInfo:
        meta = verdict.record
        quant = meta.quant_config
        return SubjectInfo(
            subject_id=verdict.subject_id, class_noun=meta.class_noun, token=meta.token,
            method=str(quant.get("method", "")), bits=quant.get("bits"),
            num_experts=quant.get("num_experts"), trained_at=meta.finished_at,
            base_fingerprint=meta.base_fingerprint,
            servable=meta.base_fingerprint == self.base.fingerprint,
            instance_prompt=meta.instance_prompt, final_loss=meta.final_loss,
            steps=meta.steps, scales_sha256=verdict.files.get(SCALES, ""),
            samples=_count(verdict.files, sample_name), training_photos=len(meta.images),
            photos=_count(verdict.files, photo_name))

    def describe(self, subject_id: str) -> SubjectInfo:
        """The subject's listing entry; SubjectNotFound if it has not finished."""
        return self._info(self._verified(subject_id, load_scales=False))

    def read_sample(self, subject_id: str, index: int, kind: str = "sample") -> bytes:
        """The PNG bytes of the subject's sample `index` (0 .. samples-1), or with kind
        "photo" of its training photo's thumbnail, checked against done.json's checksum.
        Raises InvalidRequest (422: bad id or index out of [0, MAX_SAMPLES)),
        SubjectNotFound (404: no finished subject, no such image, file missing) or
        SubjectMismatch (409: the file changed since training)."""
        check_subject_id(subject_id)
        if kind not in LISTED:
            raise ValueError(f"kind {kind!r} is invalid: one of {sorted(LISTED)}")
        if isinstance(index, bool) or not isinstance(index, int) or \
                not 0 <= index < MAX_SAMPLES:
            raise InvalidRequest(f"{kind} index {index!r} is invalid: use an integer in "
                                 f"[0, {MAX_SAMPLES - 1}]")
        verdict = self._verified(subject_id, load_scales=False)
        name = LISTED[kind](index)
        if name not in verdict.files:
            count = _count(verdict.files, LISTED[kind])
            held = f"0..{count - 1}" if count else "none"
            raise SubjectNotFound(f"subject {subject_id!r} has no {kind} {index} (its "
                                  f"{kind}s: {held})")
        data = read_subject_file(self.storage, verdict, name)
        if isinstance(data, bytes):
            return data
        if data.defect is Defect.MISSING:
            raise SubjectNotFound(f"subject {subject_id!r}: {name} is missing")
        raise SubjectMismatch(f"subject {subject_id!r}: {name} does not match its checksum "
                              "(changed or corrupt since training)")

    def _check_servable(self, info: SubjectInfo) -> SubjectInfo:
        if not info.servable:
            raise SubjectMismatch(
                f"subject {info.subject_id!r} was trained on base "
                f"{info.base_fingerprint[:12]}..., not on the served base "
                f"{self.base.fingerprint[:12]}...; serve its base (--base) or retrain it")
        return info

    def servable(self, subject_id: str) -> SubjectInfo:
        """describe(), or SubjectMismatch (409) if it was trained on another base."""
        return self._check_servable(self.describe(subject_id))

    def list_subjects(self) -> list[SubjectInfo]:
        """Every finished subject (servable or not), sorted by id."""
        out = []
        for subject_id in self.subject_ids():
            try:
                out.append(self.describe(subject_id))
            except (SubjectNotFound, SubjectMismatch):
                continue
        return out

    def read_scale_set(self, subject_id: str):
        """(ScaleSet, SubjectInfo) of a servable subject, checksum- and base-checked.

        Raises SubjectNotFound (404) or SubjectMismatch (409: another base, corrupt
        file, not a scale set). Layer shapes are checked when the set meets the UNet.
        """
        verdict = self._verified(subject_id, load_scales=True)
        info = self._check_servable(self._info(verdict))
        if verdict.defect is Defect.MISSING:
            raise SubjectNotFound(f"subject {subject_id!r} not found: {SCALES} is missing")
        if verdict.defect is Defect.CHECKSUM:
            raise SubjectMismatch(f"scale set of {subject_id!r} does not match its checksum "
                                  "(changed or corrupt since training); retrain it")
        if verdict.defect is Defect.SCALES_UNLOADABLE:
            raise SubjectMismatch(verdict.detail)
        if verdict.defect is Defect.SCALES_OTHER_BASE:
            raise SubjectMismatch(f"scale set of {subject_id!r} names base "
                                  f"{verdict.scale_set.base_fingerprint[:12]}..., not the "
                                  f"served base {self.base.fingerprint[:12]}...")
        if not verdict.done:
            raise SubjectMismatch(f"scale set of {subject_id!r}: {verdict.reason}")
        return verdict.scale_set, info


def _count(files: dict[str, str], name: Callable[[int], str]) -> int:
    """How many of done.json's files are of one kind (samples/NN.png or photos/NN.png,
    numbered from 0)."""
    count = 0
    while name(count) in files:
        count += 1
    return count


class SubjectCatalog:
    """SubjectStore lookups cached for `ttl_s` seconds (the ingress asks per request).

    Positive and negative answers are both cached, so unknown ids do not reach storage
    on every request, and a newly trained subject appears within `ttl_s` (in the
    listing: within `ttl_s` plus one background refresh).
    """

    def __init__(self, store: SubjectStore, ttl_s: float = 10.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, SubjectInfo | Exception]] = {}
        self._listing: tuple[float, list[SubjectInfo]] | None = None
        self._refreshing = False

    def servable(self, subject_id: str) -> SubjectInfo:
        """SubjectStore.servable, cached; raises the cached error as well."""
        check_subject_id(subject_id)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(subject_id)
        if hit is None or now - hit[0] > self.ttl_s:
            try:
                value: SubjectInfo | Exception = self.store.servable(subject_id)
            except (SubjectNotFound, SubjectMismatch) as err:
                value = err
            with self._lock:
                if len(self._entries) > 10_000:
                    self._entries.clear()
                self._entries[subject_id] = (now, value)
        else:
            value = hit[1]
        if isinstance(value, Exception):
            raise type(value)(*value.args)
        return value

    def list_subjects(self) -> list[SubjectInfo]:
        """SubjectStore.list_subjects, cached. Only the first call reads storage while
        the caller waits; once the listing is older than `ttl_s`, the next call starts
        one background refresh and is answered from the cached listing meanwhile, so
        a paginated GET /v1/subjects stays fast over thousands of subjects (ttl_s 0:
        every call reads storage)."""
        now = time.monotonic()
        with self._lock:
            listing = self._listing
            stale = listing is not None and now - listing[0] > self.ttl_s
            refresh = stale and not self._refreshing
            if refresh:
                self._refreshing = True
        if listing is None or self.ttl_s == 0:  # ttl 0: always read storage
            return self._refresh()
        if refresh:
            threading.Thread(target=self._refresh, name="catalog-refresh", daemon=True).start()
        return listing[1]

    def _refresh(self) -> list[SubjectInfo]:
        started = time.monotonic()
        try:
            subjects = self.store.list_subjects()
            with self._lock:
                self._listing = (started, subjects)
            return subjects
        finally:
            with self._lock:
                self._refreshing = False
