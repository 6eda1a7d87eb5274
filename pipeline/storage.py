"""Object storage behind one small interface: local folders and s3:// through fsspec.

Every artefact of a run lives under one root URI (`--output`). Writes are atomic:
locally a file is written under a temporary name in the same folder and renamed over
the target (`os.replace`); on S3 each file is one PUT, which S3 makes visible all at
once. Paths below the root are built only from validated ids, and every segment is
checked again here, so no `..` or `/` ever reaches the filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

# S3 allows one PUT up to 5 GiB; below this size s3fs's pipe_file makes one PUT.
_SINGLE_PUT_LIMIT = 5 * 2**30 - 1


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["key=value", "client_kwargs.endpoint_url=http://..."]` -> nested dict.

    Values are read as JSON when they parse (`true`, `3`, `null`, `{"a": 1}`) and as
    plain strings otherwise; a dotted key builds nested dicts.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"storage option {pair!r} is invalid: use key=value, "
                             "e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"storage option {pair!r} conflicts with an earlier value")
        target[leaf] = value
    return options


def is_remote(uri: str) -> bool:
    """Whether `uri` names something other than the local filesystem."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def normalize_root(uri: str) -> str:
    """An absolute, slash-free-ended root: local paths become absolute (Ray workers
    do not share the driver's working directory)."""
    uri = uri.strip()
    if not uri:
        raise ValueError("storage URI is empty")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not is_remote(uri):
        return str(Path(uri).expanduser().resolve())
    return uri.rstrip("/")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """Files under one root URI. Relative paths use `/` and validated segments.

    Picklable (rebuilt from `root` and `options`), so actors receive it as an argument.
    """

    def __init__(self, root: str, options: dict[str, Any] | None = None) -> None:
        self.root = normalize_root(root)
        self.options = dict(options or {})
        self.remote = is_remote(self.root)
        if self.remote:
            self.fs, self._root_path = url_to_fs(self.root, **self.options)
        else:
            self.fs = fsspec.filesystem("file")
            self._root_path = self.root

    def __reduce__(self):
        return (Storage, (self.root, self.options))

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- paths ---------------------------------------------------------------------

    def uri(self, rel: str = "") -> str:
        """The full URI (or absolute local path) of `rel`."""
        rel = _check_rel(rel)
        return f"{self.root}/{rel}" if rel else self.root

    def _path(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self._root_path}/{rel}" if rel else self._root_path

    def local_path(self, rel: str = "") -> Path:
        """The local filesystem path of `rel` (local storage only)."""
        if self.remote:
            raise StorageError(f"{self.uri(rel)} is not on the local filesystem")
        return Path(self._path(rel))

    # -- reads ---------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        path = self._path(rel)
        if self.remote:
            self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            if self.remote:
                self.fs.invalidate_cache(path)
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise StorageError(f"cannot read {self.uri(rel)}: {err}") from err

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StorageError(f"{self.uri(rel)} is not valid JSON: {err}") from err

    def list_dir(self, rel: str = "") -> list[str]:
        """Names of the entries directly under `rel` (files and folders); [] if none."""
        path = self._path(rel)
        if self.remote:
            self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        own = path.rstrip("/")
        names = {PurePosixPath(str(entry).rstrip("/")).name for entry in entries
                 if str(entry).rstrip("/") != own}
        return sorted(name for name in names if name and not name.startswith("."))

    # -- writes --------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write `data` to `rel` atomically; return its URI."""
        path = self._path(rel)
        try:
            if self.remote:
                if len(data) > _SINGLE_PUT_LIMIT:
                    raise StorageError(f"{self.uri(rel)}: {len(data)} bytes is over S3's "
                                       "single-PUT limit")
                # chunksize above the size: s3fs sends one put_object, never multipart.
                self.fs.pipe_file(path, data, chunksize=_SINGLE_PUT_LIMIT)
            else:
                _atomic_write_local(Path(path), data)
        except StorageError:
            raise
        except Exception as err:
            raise StorageError(f"cannot write {self.uri(rel)}: {err}") from err
        return self.uri(rel)

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n")
                                .encode())

    def remove(self, rel: str, recursive: bool = False) -> None:
        """Delete `rel` if it exists (a file, or a folder with recursive=True)."""
        path = self._path(rel)
        if self.remote:
            self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            return
        if not self.remote and Path(path).is_dir():
            if recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
            return
        self.fs.rm(path, recursive=recursive)

    def upload_dir(self, local_dir: str | Path, rel: str) -> None:
        """Copy a local folder's files to `rel/` (each file written atomically)."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(f"{rel}/{file.relative_to(local_dir).as_posix()}",
                             file.read_bytes())

    def download_dir(self, rel: str, local_dir: str | Path) -> None:
        """Copy every file under `rel/` into `local_dir` (which must not exist yet)."""
        src = self._path(rel)
        if self.remote:
            self.fs.invalidate_cache(src)
        local_dir = Path(local_dir)
        for path in self.fs.find(src):
            path = str(path)
            target = local_dir / PurePosixPath(path).relative_to(PurePosixPath(src))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(path))


def _check_rel(rel: str) -> str:
    rel = rel.strip("/")
    if not rel:
        return ""
    for segment in rel.split("/"):
        if segment in ("", ".", "..") or "\\" in segment or "\x00" in segment:
            raise ValueError(f"unsafe storage path {rel!r}: segment {segment!r} is not allowed")
    return rel


def _atomic_write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
