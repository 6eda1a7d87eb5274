"""Training photos named by the `images` column: listing a folder, glob or prefix, and
reading a photo's bytes, locally or through fsspec (s3://).

A photo may have a caption: a text file of the same name with the suffix `.txt`
beside it (`dog/0.jpg` + `dog/0.txt`, the convention of common DreamBooth trainers).
Its text is that photo's prompt template ("a photo of {token} {class_noun} on a
beach"), used instead of the row's `prompt` (tuneqdm.data.Subject.captions).
"""

from __future__ import annotations

import glob as globlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import is_remote

CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 2000


@dataclass(frozen=True)
class ImageRef:
    """One training photo: where it is, how big the file was when validated, and its
    caption template (the text of its sidecar `.txt`), or None."""

    uri: str
    size: int
    caption: str | None = None


def list_images(source: str, base_dir: Path,
                storage_options: dict[str, Any] | None = None) -> list[ImageRef]:
    """Resolve an `images` cell into image files, sorted.

    A folder (or remote prefix) gives every non-hidden file directly inside it (each
    must then be an image, or the caption of one); a glob gives what it matches; a
    single file gives itself. Each photo's sidecar caption is read here; a caption
    with no photo of its name raises ValueError.
    """
    if is_remote(source):
        refs, folder = _list_remote(source, storage_options)
        return _with_captions(refs, storage_options, folder)
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
    refs = sorted((ImageRef(str(f.resolve()), f.stat().st_size) for f in files),
                  key=lambda r: r.uri)
    folder = path.is_dir() and not any(ch in source for ch in "*?[")
    return _with_captions(refs, storage_options, folder)


def _with_captions(refs: list[ImageRef], storage_options: dict[str, Any] | None,
                   folder: bool) -> list[ImageRef]:
    """The photos of a listing, each with its sidecar caption (read here); the
    captions themselves leave the list. A folder's listing holds its captions, so
    only those are read; a photo matched by a glob or named alone is looked for a
    caption beside it (one round trip per photo on object storage)."""
    captions = {r.uri for r in refs if r.uri.lower().endswith(CAPTION_SUFFIX)}
    photos = [r for r in refs if r.uri not in captions]
    stems = {_stem(r.uri) for r in photos}
    orphans = sorted(c for c in captions if _stem(c) not in stems)
    if orphans:
        raise ValueError(f"{orphans[0]}: a caption with no photo of the same name "
                         f"(a caption is <photo name>{CAPTION_SUFFIX}, beside the photo)")
    return [ImageRef(r.uri, r.size,
                     _read_caption(caption_uri(r.uri), storage_options)
                     if not folder or caption_uri(r.uri) in captions else None)
            for r in photos]


def caption_uri(photo_uri: str) -> str:
    """Where a photo's caption is: the same name with the suffix .txt."""
    return _stem(photo_uri) + CAPTION_SUFFIX


def _stem(uri: str) -> str:
    head, _, name = uri.rpartition("/")
    base = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{base}" if head else base


def _read_caption(uri: str, storage_options: dict[str, Any] | None) -> str | None:
    """The caption at `uri` (stripped UTF-8 text), None if there is no such file."""
    try:
        if is_remote(uri):
            from fsspec.core import url_to_fs

            fs, path = url_to_fs(uri, **(storage_options or {}))
            if not fs.isfile(path):
                return None
            data = fs.cat_file(path, end=MAX_CAPTION_BYTES + 1)
        else:
            path = Path(uri)
            if not path.is_file():
                return None
            with open(path, "rb") as handle:
                data = handle.read(MAX_CAPTION_BYTES + 1)
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{uri}: a caption must be UTF-8 text") from None
    if len(data) > MAX_CAPTION_BYTES or not text or not text.isprintable():
        raise ValueError(f"{uri}: a caption must be one line of printable text, 1 to "
                         f"{MAX_CAPTION_BYTES} bytes")
    return text


def _list_remote(source: str,
                 storage_options: dict[str, Any] | None) -> tuple[list[ImageRef], bool]:
    """(the files a remote `images` cell names, whether it named a whole folder)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(source, **(storage_options or {}))
    protocol = source.split("://", 1)[0]
    fs.invalidate_cache()
    folder = False
    if any(ch in path for ch in "*?["):
        infos = [fs.info(p) for p in fs.glob(path)]
    elif fs.isfile(path):
        infos = [fs.info(path)]
    else:
        infos, folder = fs.ls(path.rstrip("/"), detail=True), True
    refs = sorted(
        (ImageRef(f"{protocol}://{info['name']}", int(info.get("size") or 0))
         for info in infos if info.get("type") == "file"
         and not _hidden(info["name"])),
        key=lambda r: r.uri,
    )
    return refs, folder


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
