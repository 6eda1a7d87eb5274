"""Quantized bases in storage: content address, completion marker, reading and writing.

A quantized base is written once per content address (docs/design.md §3, §4):

    address = sha256(source model id or absolute path, revision, QuantConfig,
                     base format version, and for a local folder its file list)

under `bases/<address>/` (the tuneqdm.base folder layout, with its quant.json) and
`done.json` written last. A base counts as complete when done.json is there and its
fingerprint matches quant.json's. Locally the folder is copied beside its place and
renamed in (it appears whole); on S3 its files are put recursively, marker last.
Nodes that train or serve from a remote base keep a local copy (cache.py).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from .cache import exclusive_lock, remove_leftovers
from .layout import (
    ADDRESS_LENGTH,
    BASES_DIR,
    DONE,
    QUANT_JSON,
    SUMMARY_JSON,
    base_rel,
    is_safe_segment,
)
from .records import BaseInfo
from .storage import Storage


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


def read_base(storage: Storage, address: str) -> BaseInfo | None:
    """BaseInfo of the base at `address` if it is complete and consistent, else None."""
    if not is_safe_segment(address):
        return None
    try:
        marker = storage.read_json(base_rel(address, DONE))
        quant_info = storage.read_json(base_rel(address, QUANT_JSON))
    except OSError:
        return None
    if not isinstance(marker, dict) or not isinstance(quant_info, dict) or \
            marker.get("fingerprint") != quant_info.get("fingerprint"):
        return None
    return BaseInfo.from_marker(address, marker, quant_info)


def read_done(storage: Storage, address: str) -> dict[str, Any] | None:
    """The base's done.json object if the base is complete and consistent, else None."""
    info = read_base(storage, address)
    return None if info is None else info.marker()


def complete_bases(storage: Storage) -> dict[str, BaseInfo]:
    """Every complete base under bases/, by address."""
    found = {}
    for name in storage.list_dir(BASES_DIR):
        if (info := read_base(storage, name)) is not None:
            found[name] = info
    return found


def last_run_base(storage: Storage) -> str | None:
    """The base address of the last submit (its summary.json), if there is one."""
    try:
        address = storage.read_json(SUMMARY_JSON).get("base", {}).get("address")
    except (OSError, AttributeError):
        return None
    return address if isinstance(address, str) else None


def write_base(storage: Storage, address: str, folder: str | Path,
               quantize_seconds: float | None = None) -> dict[str, Any]:
    """Put the quantized base `folder` (with its quant.json) at bases/<address>/, its
    done.json last; returns done.json.

    Local storage: under the address's lock, a base another submit completed first is
    kept (its done.json returned) and leftovers of crashed copies are removed.
    """
    if storage.remote:
        return _write_base(storage, address, folder, quantize_seconds)
    bases = storage.local_path(BASES_DIR)
    with exclusive_lock(bases / f".{address}.lock"):
        existing = read_done(storage, address)
        if existing is not None:
            return existing
        remove_leftovers(bases, (f".staging-{address}-",))
        return _write_base(storage, address, folder, quantize_seconds)


def _write_base(storage: Storage, address: str, folder: str | Path,
                quantize_seconds: float | None) -> dict[str, Any]:
    quant_info = json.loads((Path(folder) / QUANT_JSON).read_text())
    rel = base_rel(address)
    storage.remove(rel, recursive=True)  # a partial base from a crashed run
    storage.upload_dir(folder, rel)
    info = BaseInfo(address=address, fingerprint=quant_info["fingerprint"],
                    quantize_seconds=quantize_seconds,
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    storage.write_json(base_rel(address, DONE), info.marker())
    return info.marker()


def quantize_into_storage(storage: Storage, address: str, source: str,
                          revision: str | None, quant_config: dict[str, Any],
                          num_threads: int = 1) -> dict[str, Any]:
    """Quantize `source` (tuneqdm.base) and write it under bases/<address>/; returns
    done.json. Run in a Ray task by pipeline/quantize.py, or directly (tests)."""
    import torch

    from tuneqdm import QuantConfig
    from tuneqdm.base import quantize_pipeline

    torch.set_num_threads(max(1, num_threads))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneqdm-quantize-") as tmp:
        local = Path(tmp) / "base"
        quantize_pipeline(source, local, QuantConfig.from_dict(quant_config),
                          revision=revision)
        return write_base(storage, address, local,
                          round(time.perf_counter() - start, 3))


def read_base_config(storage: Storage, address: str, component: str) -> dict[str, Any]:
    """`bases/<address>/<component>/config.json` (the diffusers config of e.g. "unet")."""
    if not is_safe_segment(component):
        raise ValueError(f"base component {component!r} is not a folder name")
    return storage.read_json(base_rel(address, f"{component}/config.json"))


def native_size(storage: Storage, address: str) -> int:
    """The base's image side in pixels: UNet sample_size x the VAE's scale factor
    (2^(VAE blocks - 1), 8 when the VAE config cannot tell)."""
    unet = read_base_config(storage, address, "unet")
    try:
        vae = read_base_config(storage, address, "vae")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (FileNotFoundError, KeyError, json.JSONDecodeError, TypeError):
        factor = 8
    size = unet["sample_size"]
    return int((size[0] if isinstance(size, list) else size) * factor)

