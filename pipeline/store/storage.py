"""Object storage behind one small interface: local folders and s3:// through fsspec.

Every artefact of a run lives under one root URI (`--output`). Writes are atomic:
locally a file is written under a temporary name in the same folder and renamed over
the target (`os.replace`); on S3 a file is one PUT, or above s3fs's chunk size a
multipart upload, and S3 makes either visible all at once, when it completes. Folders
travel with fsspec's recursive `put` / `get`; a folder counts as complete only once its
completion marker is written, last (docs/design.md §4). Paths below the root are
built only from validated ids, and every segment is checked again here, so no `..` or
`/` ever reaches the filesystem.

Credentials never travel as storage options (they would show in the process list
and in Ray's dashboard): s3fs reads them from the environment or a profile.
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

# Option names refused by parse_storage_options, compared lower-case without "_"/"-":
# exactly these, or containing one of the fragments.
_CREDENTIAL_NAMES = frozenset({"key", "secret", "token", "password", "passwd"})
_CREDENTIAL_FRAGMENTS = ("secret", "password", "token", "accesskey", "credential",
                         "customerkey", "accountkey", "apikey", "privatekey")
CREDENTIALS_HELP = ("give credentials through the environment (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or a profile "
                    "(profile=NAME, from ~/.aws/credentials), which s3fs reads")


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["key=value", "client_kwargs.endpoint_url=http://..."]` -> nested dict.

    Values are read as JSON when they parse (`true`, `3`, `null`, `{"a": 1}`) and as
    plain strings otherwise; a dotted key builds nested dicts. Credentials (key,
    secret, token, password, aws_secret_access_key, ... at any depth, also inside a
    JSON value) are refused with a ValueError naming the option, never its value.
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
        _refuse_credentials(key, key.split("."), value)
        target = options
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"storage option {pair!r} conflicts with an earlier value")
        target[leaf] = value
    return options


def _refuse_credentials(option: str, names: list[str], value: Any) -> None:
    """ValueError if any of `names`, or any key nested in `value`, names a credential."""
    for name in names:
        flat = name.lower().replace("_", "").replace("-", "")
        if flat in _CREDENTIAL_NAMES or any(part in flat for part in _CREDENTIAL_FRAGMENTS):
            raise ValueError(f"storage option {option!r} passes a credential ({name!r}), "
                             "which is refused on the command line (it would show in the "
                             f"process list and in Ray's dashboard): {CREDENTIALS_HELP}")
    if isinstance(value, dict):
        for inner, nested in value.items():
            _refuse_credentials(option, [str(inner)], nested)


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
    """Hex SHA-256 of `data` (the checksums in completion markers)."""
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
                # one PUT below 2 x s3fs's chunk size (100 MiB), else a multipart upload;
                # S3 shows the object only when either completes.
                self.fs.pipe_file(path, data)
            else:
                _atomic_write_local(Path(path), data)
        except Exception as err:
            raise StorageError(f"cannot write {self.uri(rel)}: {err}") from err
        return self.uri(rel)

    def write_files(self, files: dict[str, bytes]) -> None:
        """Write several files, each atomically, in no particular order: on S3 as
        concurrent PUTs (fsspec's batched `pipe`), one round trip's latency instead of
        one per file. A completion marker is written after this returns, never in it."""
        if not self.remote:
            for rel, data in files.items():
                self.write_bytes(rel, data)
            return
        paths = {self._path(rel): data for rel, data in files.items()}
        try:
            self.fs.pipe(paths)
        except Exception as err:
            raise StorageError(f"cannot write {len(files)} files under {self.root}: "
                               f"{err}") from err

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
        """Copy a local folder to `rel/`, which must not hold files yet.

        Local storage: copied beside the target and renamed into place, so the folder
        appears whole (FileExistsError if another writer's copy got there first).
        S3: fsspec's recursive put (large files as multipart uploads); the files appear
        one by one, so the caller writes a completion marker last.
        """
        local_dir = Path(local_dir)
        if self.remote:
            try:
                self.fs.put(f"{local_dir}/", self._path(rel), recursive=True)
            except Exception as err:
                raise StorageError(f"cannot upload {local_dir} to {self.uri(rel)}: "
                                   f"{err}") from err
            return
        target = self.local_path(rel)
        staging = target.with_name(f".staging-{target.name}-{uuid.uuid4().hex[:12]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local_dir, staging)
        try:
            os.rename(staging, target)  # never replaces a folder that has files
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise FileExistsError(f"{self.uri(rel)} already exists") from err

    def download_dir(self, rel: str, local_dir: str | Path) -> None:
        """Copy every file under `rel/` into `local_dir` (which must not exist yet)."""
        local_dir = Path(local_dir)
        if not self.remote:
            shutil.copytree(self.local_path(rel), local_dir)
            return
        src = self._path(rel)
        self.fs.invalidate_cache(src)
        try:
            self.fs.get(f"{src}/", f"{local_dir}/", recursive=True)
        except Exception as err:
            raise StorageError(f"cannot download {self.uri(rel)}: {err}") from err


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
