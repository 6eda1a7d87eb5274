"""Training photos named by the `images` column: listing a folder, glob or prefix, and
reading a photo's bytes, locally or through fsspec (s3://)."""

from __future__ import annotations

import glob as globlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import is_remote


@dataclass(frozen=True)
class ImageRef:
    """One training photo: where it is and how big the file was when validated."""

    uri: str
    size: int


def list_images(source: str, base_dir: Path,
                storage_options: dict[str, Any] | None = None) -> list[ImageRef]:
    """Resolve an `images` cell into image files, sorted.

    A folder (or remote prefix) gives every non-hidden file directly inside it (each
    must then be an image); a glob gives what it matches; a single file gives itself.
    """
    if is_remote(source):
        return _list_remote(source, storage_options)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if any(ch in source for ch in "*?["):
        files = [Path(p) for p in globlib.glob(str(path), recursive=True)]
    elif path.is_dir():
        files = list(path.iterdir())
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist")
    files = [f for f in files if f.is_file() and not _hidden(f.name)]
    return sorted((ImageRef(str(f.resolve()), f.stat().st_size) for f in files),
                  key=lambda r: r.uri)


def _list_remote(source: str, storage_options: dict[str, Any] | None) -> list[ImageRef]:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(source, **(storage_options or {}))
    protocol = source.split("://", 1)[0]
    fs.invalidate_cache()
    if any(ch in path for ch in "*?["):
        infos = [fs.info(p) for p in fs.glob(path)]
    elif fs.isfile(path):
        infos = [fs.info(path)]
    else:
        infos = fs.ls(path.rstrip("/"), detail=True)
    return sorted(
        (ImageRef(f"{protocol}://{info['name']}", int(info.get("size") or 0))
         for info in infos if info.get("type") == "file"
         and not _hidden(info["name"])),
        key=lambda r: r.uri,
    )


def read_image_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of an image file, local or remote."""
    if is_remote(uri):
        import fsspec

        with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
            return handle.read()
    return Path(uri).read_bytes()


def _hidden(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(".")


def local_photo_bytes(job) -> dict[str, bytes]:
    """{path: bytes} of every local (not s3://) photo of `job`'s subjects (a
    manifest.Job), read here so that actors on other nodes need not see the path."""
    return {ref.uri: Path(ref.uri).read_bytes() for spec in job.subjects
            for ref in spec.images if not is_remote(ref.uri)}
