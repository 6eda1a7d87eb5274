"""What the service reads from storage: the served base and the trained subjects.

It reads the layout that `tuneqdm-pipeline submit` writes (pipeline/artifacts.py,
pipeline/base.py) through the pipeline's Storage class, local folder or s3://:

    <output>/bases/<address>/            the quantized base (done.json last)
    <output>/subjects/<id>/done.json     the completion marker: base fingerprint and
                                         sha256 of scales.safetensors and meta.json
    <output>/subjects/<id>/scales.safetensors, meta.json

Subject ids are validated (pipeline.manifest.validate_subject_id) before any path is
built. A subject is servable when its done.json names the served base's fingerprint;
its scale set is then read, checked against its checksum, parsed (never unpickled)
and checked against the base's layers by the caller (ScaleSet.check_fits).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import DONE, META, SCALES, SUBJECTS_DIR, subject_rel
from pipeline.base import BASES_DIR, local_base_path, read_done
from pipeline.manifest import ID_RULE, validate_subject_id
from pipeline.storage import Storage, sha256_hex

from .errors import BaseNotFound, InvalidRequest, SubjectMismatch, SubjectNotFound

SUMMARY = "summary.json"


@dataclass(frozen=True)
class BaseRef:
    """The quantized base a service runs on."""

    address: str
    fingerprint: str
    source: str
    quant_config: dict[str, Any]


@dataclass(frozen=True)
class SubjectInfo:
    """One subject, as listed by GET /v1/subjects (from done.json and meta.json)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_subject_id(subject_id: str) -> str:
    """The id, or InvalidRequest (422) naming the rule; run before any storage access."""
    try:
        return validate_subject_id(subject_id)
    except ValueError:
        shown = subject_id if len(subject_id) <= 80 else subject_id[:77] + "..."
        raise InvalidRequest(f"subject id {shown!r} is invalid: use {ID_RULE}") from None


def resolve_base(storage: Storage, address: str | None = None) -> BaseRef:
    """The base to serve: `address` if given, else the only complete base under
    bases/, else the base of the last submit (summary.json). Raises BaseNotFound."""
    if address is not None:
        done = read_done(storage, address) if _safe_segment(address) else None
        if done is None:
            raise BaseNotFound(f"no complete quantized base {address!r} under "
                               f"{storage.uri(BASES_DIR)}")
        return _base_ref(address, done)
    complete = {}
    for name in storage.list_dir(BASES_DIR):
        if _safe_segment(name) and (done := read_done(storage, name)) is not None:
            complete[name] = done
    if len(complete) == 1:
        (name, done), = complete.items()
        return _base_ref(name, done)
    if not complete:
        raise BaseNotFound(f"{storage.root} holds no complete quantized base under "
                           f"{BASES_DIR}/: run `tuneqdm-pipeline submit -o {storage.root}` "
                           "first")
    try:
        last = storage.read_json(SUMMARY).get("base", {}).get("address")
    except (FileNotFoundError, OSError, AttributeError):
        last = None
    if last in complete:
        return _base_ref(last, complete[last])
    raise BaseNotFound(f"{storage.root} holds {len(complete)} bases ({', '.join(sorted(complete))})"
                       "; choose one with --base")


def _safe_segment(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith(".")


def _base_ref(address: str, done: dict[str, Any]) -> BaseRef:
    return BaseRef(address=address, fingerprint=done["fingerprint"],
                   source=str(done.get("source", "")),
                   quant_config=dict(done.get("quant_config") or {}))


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
        ids = []
        for name in self.storage.list_dir(SUBJECTS_DIR):
            try:
                ids.append(validate_subject_id(name))
            except ValueError:
                continue
        return ids

    def _done(self, subject_id: str) -> dict[str, Any]:
        check_subject_id(subject_id)
        try:
            done = self.storage.read_json(subject_rel(subject_id, DONE))
        except FileNotFoundError:
            raise SubjectNotFound(f"subject {subject_id!r} not found: no finished scale set "
                                  "of that id") from None
        if not isinstance(done, dict) or done.get("status") != "done":
            raise SubjectNotFound(f"subject {subject_id!r} not found: its training did not "
                                  "finish")
        return done

    def describe(self, subject_id: str) -> SubjectInfo:
        """The subject's listing entry; SubjectNotFound if it has not finished."""
        done = self._done(subject_id)
        try:
            meta = self.storage.read_json(subject_rel(subject_id, META))
        except FileNotFoundError:
            raise SubjectNotFound(f"subject {subject_id!r} not found: meta.json is "
                                  "missing") from None
        quant = meta.get("quant_config") or {}
        fingerprint = str(done.get("base_fingerprint", ""))
        return SubjectInfo(
            subject_id=subject_id,
            class_noun=str(meta.get("class_noun", "")),
            token=str(meta.get("token", "")),
            method=str(quant.get("method", "")),
            bits=quant.get("bits"),
            num_experts=quant.get("num_experts"),
            trained_at=meta.get("finished_at"),
            base_fingerprint=fingerprint,
            servable=fingerprint == self.base.fingerprint,
            instance_prompt=str(meta.get("instance_prompt", "")),
            final_loss=meta.get("final_loss"),
            steps=meta.get("steps"),
            scales_sha256=str((done.get("files") or {}).get(SCALES, "")),
        )

    def servable(self, subject_id: str) -> SubjectInfo:
        """describe(), or SubjectMismatch (409) if it was trained on another base."""
        info = self.describe(subject_id)
        if not info.servable:
            raise SubjectMismatch(
                f"subject {subject_id!r} was trained on base {info.base_fingerprint[:12]}..., "
                f"not on the served base {self.base.fingerprint[:12]}...; serve its base "
                "(--base) or retrain it")
        return info

    def list_subjects(self) -> list[SubjectInfo]:
        """Every finished subject (servable or not), sorted by id."""
        out = []
        for subject_id in self.subject_ids():
            try:
                out.append(self.describe(subject_id))
            except SubjectNotFound:
                continue
        return out

    def read_scale_set(self, subject_id: str):
        """(ScaleSet, SubjectInfo) of a servable subject, checksum- and base-checked.

        Raises SubjectNotFound (404) or SubjectMismatch (409: another base, corrupt
        file, not a scale set). Layer shapes are checked when the set meets the UNet.
        """
        from tuneqdm.scaleset import ScaleSet, ScaleSetError

        info = self.servable(subject_id)
        try:
            data = self.storage.read_bytes(subject_rel(subject_id, SCALES))
        except FileNotFoundError:
            raise SubjectNotFound(f"subject {subject_id!r} not found: scales.safetensors is "
                                  "missing") from None
        if info.scales_sha256 and sha256_hex(data) != info.scales_sha256:
            raise SubjectMismatch(f"scale set of {subject_id!r} does not match its checksum "
                                  "(changed or corrupt since training); retrain it")
        try:
            scale_set = ScaleSet.from_bytes(data, source=f"scale set of {subject_id!r}")
        except ScaleSetError as err:
            raise SubjectMismatch(str(err)) from None
        if scale_set.base_fingerprint != self.base.fingerprint:
            raise SubjectMismatch(f"scale set of {subject_id!r} names base "
                                  f"{scale_set.base_fingerprint[:12]}..., not the served base "
                                  f"{self.base.fingerprint[:12]}...")
        return scale_set, info


class SubjectCatalog:
    """SubjectStore lookups cached for `ttl_s` seconds (the ingress asks per request).

    Positive and negative answers are both cached, so unknown ids do not reach storage
    on every request, and a newly trained subject appears within `ttl_s`.
    """

    def __init__(self, store: SubjectStore, ttl_s: float = 10.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, SubjectInfo | Exception]] = {}
        self._listing: tuple[float, list[SubjectInfo]] | None = None

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
        now = time.monotonic()
        with self._lock:
            listing = self._listing
        if listing is None or now - listing[0] > self.ttl_s:
            listing = (now, self.store.list_subjects())
            with self._lock:
                self._listing = listing
        return listing[1]
