"""The quantized base in storage: content address, the quantize task, local copies.

A quantized base is written once per content address (docs/design.md §3, step 2):

    address = sha256(source model id or absolute path, revision, QuantConfig,
                     base format version, and for a local folder its file list)

and stored under `<output>/bases/<address>/` (the tuneqdm.base folder layout) with
`done.json` written last. A submit whose base is already there (done.json present and
its quant.json fingerprint matching) reuses it; otherwise one Ray task quantizes it.
Actors read the base from local storage directly, or download a remote one once per
node into a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .storage import Storage

BASES_DIR = "bases"
DONE = "done.json"
ADDRESS_LENGTH = 24


def base_rel(address: str) -> str:
    return f"{BASES_DIR}/{address}"


def content_address(source: str, revision: str | None, quant_config: dict[str, Any]) -> str:
    """The base's storage key: a hash of what determines the quantized weights."""
    from tuneqdm.base import BASE_FORMAT_VERSION

    payload = {
        "source": source,
        "revision": revision,
        "quant_config": quant_config,
        "base_format_version": BASE_FORMAT_VERSION,
        "local_files": _local_stamp(source),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:ADDRESS_LENGTH]


def _local_stamp(source: str) -> list[list[Any]] | None:
    """For a local model folder: (relative name, size, mtime) of its files, so that a
    retrained model at the same path gets a new address. None for hub ids."""
    path = Path(source)
    if not path.is_dir():
        return None
    return sorted(
        [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
        for p in path.rglob("*") if p.is_file()
    )


def read_done(storage: Storage, address: str) -> dict[str, Any] | None:
    """The base's done.json if the base is complete and consistent, else None."""
    rel = base_rel(address)
    try:
        done = storage.read_json(f"{rel}/{DONE}")
        info = storage.read_json(f"{rel}/quant.json")
    except (FileNotFoundError, OSError):
        return None
    if not isinstance(done, dict) or done.get("fingerprint") != info.get("fingerprint"):
        return None
    return done


def quantize_into_storage(storage: Storage, address: str, source: str,
                          revision: str | None, quant_config: dict[str, Any],
                          num_threads: int = 1) -> dict[str, Any]:
    """Quantize `source` and write it under bases/<address>/; returns done.json.

    Runs inside a Ray task (see `quantize_task`), or directly in tests.
    """
    import torch

    from tuneqdm import QuantConfig
    from tuneqdm.base import quantize_pipeline

    torch.set_num_threads(max(1, num_threads))
    start = time.perf_counter()
    rel = base_rel(address)
    with tempfile.TemporaryDirectory(prefix="tuneqdm-quantize-") as tmp:
        local = Path(tmp) / "base"
        info = quantize_pipeline(source, local, QuantConfig.from_dict(quant_config),
                                 revision=revision)
        existing = publish_base(storage, address, local)
        if existing is not None:
            return existing
    done = {
        "address": address,
        "fingerprint": info["fingerprint"],
        "source": source,
        "revision": revision,
        "quant_config": quant_config,
        "quantize_seconds": round(time.perf_counter() - start, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "unet_tensor_bytes": info.get("unet_tensor_bytes"),
    }
    storage.write_json(f"{rel}/{DONE}", done)
    return done


def publish_base(storage: Storage, address: str, local: Path) -> dict[str, Any] | None:
    """Put the base folder `local` under bases/<address>/ (its done.json is the
    caller's to write, last). Returns the done.json of a complete base that another
    writer put there first (then `local` is not used), else None."""
    rel = base_rel(address)
    storage.remove(rel, recursive=True)  # a partial base from a crashed run
    if storage.remote:
        storage.upload_dir(local, rel)
        return None
    staging = storage.local_path(f"{BASES_DIR}/.staging-{uuid.uuid4().hex[:12]}")
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(local, staging)
    try:
        os.replace(staging, storage.local_path(rel))
    except OSError:  # another submit finished the same base first
        shutil.rmtree(staging, ignore_errors=True)
        existing = read_done(storage, address)
        if existing is not None:
            return existing
        raise
    return None


def quantize_task():
    """The Ray remote function wrapping `quantize_into_storage` (built lazily so that
    importing this module does not import Ray)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=1)(quantize_into_storage)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNEQDM_CACHE", Path.home() / ".cache" / "tuneqdm"))


def local_base_path(storage: Storage, address: str, fingerprint: str,
                    cache_dir: str | Path | None = None) -> Path:
    """A local folder holding the base: the storage folder itself when storage is
    local, else a per-node cached download (fetched once, checked by fingerprint)."""
    if not storage.remote:
        return storage.local_path(base_rel(address))
    cache = Path(cache_dir or default_cache_dir()) / "bases" / address
    marker = cache / ".fingerprint"
    if marker.is_file() and marker.read_text() == fingerprint:
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.parent / f".download-{address}-{uuid.uuid4().hex[:12]}"
    storage.download_dir(base_rel(address), staging)
    (staging / ".fingerprint").write_text(fingerprint)
    if cache.exists():
        shutil.rmtree(cache, ignore_errors=True)
    try:
        os.replace(staging, cache)
    except OSError:  # another actor on this node won the race
        shutil.rmtree(staging, ignore_errors=True)
    return cache
