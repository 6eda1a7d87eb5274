"""Local copies of remote bases, one per node, safe when many processes ask at once.

    $TUNEQDM_CACHE/bases/<address>/              a complete copy + .fingerprint
    $TUNEQDM_CACHE/bases/.<address>.lock         fcntl lock, held while fetching
    $TUNEQDM_CACHE/bases/.download-<address>-*   a fetch in progress (or a crashed one)

Every FineTuner actor and Serve replica of a node calls `local_base_path`. The first
takes the address's lock, downloads into a `.download-*` folder, checks the copy's
quant.json against the expected fingerprint, marks it and renames it into place; the
others wait on the lock and then find the fresh copy, so a node downloads once and
nobody deletes a copy that matches its fingerprint. Leftovers of crashed fetches are
removed under the lock. A copy with another fingerprint (the base was rewritten) is
replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .layout import QUANT_JSON, base_rel, is_safe_segment
from .storage import Storage, StorageError

FINGERPRINT_MARKER = ".fingerprint"


def default_cache_dir() -> Path:
    """Where a node keeps local copies: $TUNEQDM_CACHE, else ~/.cache/tuneqdm."""
    return Path(os.environ.get("TUNEQDM_CACHE", Path.home() / ".cache" / "tuneqdm"))


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `path` (created if needed) for the block.

    Excludes other processes and other threads (each call opens its own descriptor).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_leftovers(folder: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Delete entries of `folder` whose names start with one of `prefixes` (call it
    with the matching lock held); returns their names."""
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.name.startswith(prefixes):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def local_base_path(storage: Storage, address: str, fingerprint: str,
                    cache_dir: str | Path | None = None) -> Path:
    """A local folder holding the base: the storage folder itself when storage is
    local, else this node's cached copy (fetched once, checked by fingerprint)."""
    if not storage.remote:
        return storage.local_path(base_rel(address))
    if not is_safe_segment(address):
        raise ValueError(f"base address {address!r} is not a folder name")
    root = Path(cache_dir or default_cache_dir()) / "bases"
    cache = root / address
    if _is_fresh(cache, fingerprint):
        return cache
    with exclusive_lock(root / f".{address}.lock"):
        if _is_fresh(cache, fingerprint):
            return cache  # another process of this node fetched it meanwhile
        remove_leftovers(root, (f".download-{address}-", f".stale-{address}-"))
        _fetch(storage, address, fingerprint, root)
    return cache


def _is_fresh(cache: Path, fingerprint: str) -> bool:
    marker = cache / FINGERPRINT_MARKER
    try:
        return marker.read_text() == fingerprint
    except OSError:
        return False


def _fetch(storage: Storage, address: str, fingerprint: str, root: Path) -> None:
    """Download bases/<address>/ into root/<address>/ (the caller holds the lock)."""
    cache = root / address
    staging = root / f".download-{address}-{uuid.uuid4().hex[:12]}"
    try:
        storage.download_dir(base_rel(address), staging)
        try:
            found = json.loads((staging / QUANT_JSON).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != fingerprint:
            raise StorageError(f"{storage.uri(base_rel(address))} holds base "
                               f"{str(found)[:12]}..., not the expected {fingerprint[:12]}...")
        (staging / FINGERPRINT_MARKER).write_text(fingerprint)
        if cache.exists():  # a copy of another fingerprint: set aside, then delete
            stale = root / f".stale-{address}-{uuid.uuid4().hex[:12]}"
            os.rename(cache, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left after the rename
