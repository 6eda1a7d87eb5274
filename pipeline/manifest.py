"""subjects.csv: parse and validate every row before any Ray work starts.

One row per subject. Columns (header required, order free):

    subject_id    required; 1-64 of a-z 0-9 - _, starting with a letter or digit; unique
    images        required; a folder, a glob (*.jpg) or a remote prefix (s3://b/dogs/);
                  relative paths are relative to the CSV file's folder
    class         required; the class noun ("dog", "backpack")
    token         optional; the rare identifier word, default "sks"
    prompt        optional; instance prompt template with {token} and {class_noun},
                  default "a photo of {token} {class_noun}"
    group         optional; rows sharing a group train jointly into one scale set
    steps, lr_scale_out, lr_scale_in, seed    optional per-row training overrides

Blank lines and lines starting with `#` are ignored. All problems are collected and
raised together as one `ManifestError`, each naming file, line and column.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import io
import json
import math
import re
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneqdm.images import DEFAULT_MAX_PIXELS, ImageLoadError, check_image

from .storage import is_remote

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ID_RULE = "1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_<>-]{1,32}$")
REQUIRED_COLUMNS = ("subject_id", "images", "class")
OPTIONAL_COLUMNS = ("token", "prompt", "group", "steps", "lr_scale_out", "lr_scale_in", "seed")
ALLOWED_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
OVERRIDE_COLUMNS = ("steps", "lr_scale_out", "lr_scale_in", "seed")
DEFAULT_TOKEN = "sks"
DEFAULT_PROMPT = "a photo of {token} {class_noun}"
PROMPT_FIELDS = ("token", "class_noun")
MAX_STEPS = 1_000_000


@dataclass(frozen=True)
class Problem:
    """One validation error, located in the CSV."""

    file: str
    line: int
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: column {self.column}: {self.message}" if self.column else (
            f"{where}: {self.message}")


class ManifestError(ValueError):
    """The CSV has problems; `problems` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the subjects file:\n{lines}")


def validate_subject_id(value: str) -> str:
    """Return `value` if it is a valid subject (or group) id, else raise ValueError."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a valid id: use {ID_RULE}")
    return value


@dataclass(frozen=True)
class ImageRef:
    """One training photo: where it is and how big the file was when validated."""

    uri: str
    size: int


@dataclass(frozen=True)
class SubjectSpec:
    """A validated row."""

    subject_id: str
    images: tuple[ImageRef, ...]
    class_noun: str
    token: str = DEFAULT_TOKEN
    prompt: str = DEFAULT_PROMPT
    group: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    line: int = field(default=0, compare=False)  # where it came from; not part of its identity

    @property
    def instance_prompt(self) -> str:
        return self.prompt.format(token=self.token, class_noun=self.class_noun)

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject_id": self.subject_id, "class_noun": self.class_noun,
            "token": self.token, "prompt": self.prompt, "group": self.group,
            "overrides": dict(self.overrides),
            "images": [{"uri": ref.uri, "size": ref.size} for ref in self.images],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubjectSpec:
        return cls(
            subject_id=data["subject_id"], class_noun=data["class_noun"],
            token=data["token"], prompt=data["prompt"], group=data.get("group"),
            overrides=dict(data.get("overrides", {})),
            images=tuple(ImageRef(i["uri"], int(i["size"])) for i in data["images"]),
        )


@dataclass(frozen=True)
class Job:
    """One unit of training: a lone subject, or all subjects of a group (trained
    jointly into one multi-subject scale set)."""

    job_id: str
    subjects: tuple[SubjectSpec, ...]

    @property
    def subject_ids(self) -> list[str]:
        return [s.subject_id for s in self.subjects]

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.subjects[0].overrides)  # validated equal across a group

    def spec_hash(self, extra: dict[str, Any]) -> str:
        """Hash of everything that determines this job's result (+ `extra`: base
        address, training settings). A finished artefact counts only for its hash."""
        payload = {"subjects": [s.to_dict() for s in self.subjects], **extra}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "subjects": [s.to_dict() for s in self.subjects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(data["job_id"], tuple(SubjectSpec.from_dict(s) for s in data["subjects"]))


def group_jobs(subjects: list[SubjectSpec]) -> list[Job]:
    """Lone subjects become one job each; a group becomes one job (CSV order kept)."""
    jobs: dict[str, list[SubjectSpec]] = {}
    for spec in subjects:
        key = f"group:{spec.group}" if spec.group else f"subject:{spec.subject_id}"
        jobs.setdefault(key, []).append(spec)
    return [Job(members[0].group or members[0].subject_id, tuple(members))
            for members in jobs.values()]


# -- parsing -------------------------------------------------------------------------


def load_manifest(path: str | Path, storage_options: dict[str, Any] | None = None,
                  check_images: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = 32) -> list[SubjectSpec]:
    """Read and validate `path`. Raises ManifestError listing every problem."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError([Problem(name, 0, None, "file not found")]) from None
    except IsADirectoryError:
        raise ManifestError([Problem(name, 0, None, "is a folder, not a CSV file")]) from None
    except UnicodeDecodeError as err:
        raise ManifestError([Problem(name, 1, None, f"not UTF-8 text ({err.reason})")]) from None
    parser = _Parser(name, path.resolve().parent, storage_options or {}, check_images,
                     max_pixels, min_side)
    return parser.parse(text)


class _Parser:
    def __init__(self, name: str, base_dir: Path, storage_options: dict[str, Any],
                 check_images: bool, max_pixels: int, min_side: int) -> None:
        self.name = name
        self.base_dir = base_dir
        self.storage_options = storage_options
        self.check_images = check_images
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.problems: list[Problem] = []

    def problem(self, line: int, column: str | None, message: str) -> None:
        self.problems.append(Problem(self.name, line, column, message))

    def parse(self, text: str) -> list[SubjectSpec]:
        rows = self._rows(text)
        if self.problems:
            raise ManifestError(self.problems)
        if not rows:
            raise ManifestError([Problem(self.name, 1, None, "no header row; the first line "
                                 f"must name the columns, e.g. {','.join(REQUIRED_COLUMNS)}")])
        header_line, header = rows[0]
        columns = self._header(header_line, header)
        if self.problems:
            raise ManifestError(self.problems)
        if len(rows) == 1:
            raise ManifestError([Problem(self.name, header_line, None,
                                         "no subjects: the file has a header but no rows")])
        specs: list[SubjectSpec] = []
        first_line: dict[str, int] = {}
        for line, cells in rows[1:]:
            if len(cells) != len(columns):
                self.problem(line, None, f"has {len(cells)} fields, the header has "
                                         f"{len(columns)} ({','.join(columns)})")
                continue
            spec = self._row(line, dict(zip(columns, (c.strip() for c in cells), strict=True)))
            if spec is None:
                continue
            if spec.subject_id in first_line:
                self.problem(line, "subject_id", f"duplicate id {spec.subject_id!r} (first "
                                                 f"used on line {first_line[spec.subject_id]})")
                continue
            first_line[spec.subject_id] = line
            specs.append(spec)
        self._check_groups(specs)
        if self.check_images:
            self._check_image_files(specs)
        if self.problems:
            raise ManifestError(sorted(self.problems, key=lambda p: p.line))
        return specs

    def _rows(self, text: str) -> list[tuple[int, list[str]]]:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows: list[tuple[int, list[str]]] = []
        line = 1
        try:
            for cells in reader:
                start, line = line, reader.line_num + 1
                if not cells or all(not c.strip() for c in cells):
                    continue
                if cells[0].lstrip().startswith("#"):
                    continue
                rows.append((start, cells))
        except csv.Error as err:
            self.problem(reader.line_num, None, f"malformed CSV ({err})")
        return rows

    def _header(self, line: int, header: list[str]) -> list[str]:
        columns = [c.strip().lower() for c in header]
        seen: set[str] = set()
        for column in columns:
            if column in seen:
                self.problem(line, column, "appears twice in the header")
            seen.add(column)
            if column not in ALLOWED_COLUMNS:
                self.problem(line, column or "''", "unknown column; allowed: "
                                                   f"{', '.join(ALLOWED_COLUMNS)}")
        for column in REQUIRED_COLUMNS:
            if column not in seen:
                self.problem(line, column, "required column is missing from the header")
        return columns

    def _row(self, line: int, row: dict[str, str]) -> SubjectSpec | None:
        before = len(self.problems)
        subject_id = row["subject_id"]
        if not subject_id:
            self.problem(line, "subject_id", f"is empty; use {ID_RULE}")
        elif not ID_PATTERN.match(subject_id):
            self.problem(line, "subject_id", f"{subject_id!r} is not a valid id: use {ID_RULE}")
        class_noun = row["class"]
        if not class_noun:
            self.problem(line, "class", "is empty; give the class noun, e.g. dog")
        elif len(class_noun) > 100 or not class_noun.isprintable():
            self.problem(line, "class", f"{class_noun[:40]!r} must be printable text of at "
                                        "most 100 characters")
        token = row.get("token") or DEFAULT_TOKEN
        if not TOKEN_PATTERN.match(token):
            self.problem(line, "token", f"{token!r} must be one word of 1-32 letters, digits, "
                                        "'_', '-', '<' or '>'")
        prompt = row.get("prompt") or DEFAULT_PROMPT
        self._check_prompt(line, prompt)
        group = row.get("group") or None
        if group is not None and not ID_PATTERN.match(group):
            self.problem(line, "group", f"{group!r} is not a valid group id: use {ID_RULE}")
        overrides = self._overrides(line, row)
        images: tuple[ImageRef, ...] = ()
        if not row["images"]:
            self.problem(line, "images", "is empty; give a folder, a glob or an s3:// prefix")
        else:
            images = self._resolve_images(line, row["images"])
        if len(self.problems) != before:
            return None
        return SubjectSpec(subject_id, images, class_noun, token, prompt, group, overrides, line)

    def _check_prompt(self, line: int, prompt: str) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
        except ValueError as err:
            self.problem(line, "prompt", f"{prompt!r} is not a valid template ({err}); use "
                                         "{token} and {class_noun}")
            return
        unknown = sorted({f for f in fields if f not in PROMPT_FIELDS})
        if unknown:
            self.problem(line, "prompt", f"{prompt!r} uses unknown placeholder(s) {unknown}; "
                                         "allowed: {token}, {class_noun}")
        elif "token" not in fields:
            self.problem(line, "prompt", f"{prompt!r} must contain {{token}}")

    def _overrides(self, line: int, row: dict[str, str]) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        for column in ("steps", "seed"):
            raw = row.get(column, "")
            if not raw:
                continue
            low, high = (1, MAX_STEPS) if column == "steps" else (0, 2**32 - 1)
            try:
                value = int(raw)
            except ValueError:
                value = None
            if value is None or not low <= value <= high:
                self.problem(line, column, f"{raw!r} must be an integer in [{low}, {high}]")
            else:
                overrides[column] = value
        for column in ("lr_scale_out", "lr_scale_in"):
            raw = row.get(column, "")
            if not raw:
                continue
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                self.problem(line, column, f"{raw!r} must be a positive number, e.g. 1e-4")
            else:
                overrides[column] = value
        return overrides

    def _check_groups(self, specs: list[SubjectSpec]) -> None:
        groups: dict[str, list[SubjectSpec]] = {}
        for spec in specs:
            if spec.group:
                groups.setdefault(spec.group, []).append(spec)
        line_of = {spec.subject_id: spec.line for spec in specs}
        for group, members in groups.items():
            first = members[0]
            outsider = line_of.get(group)
            if outsider is not None and group not in [m.subject_id for m in members]:
                self.problem(first.line, "group", f"group {group!r} has the name of the "
                             f"subject on line {outsider}, which is not in it; rename one")
            tokens: dict[str, int] = {}
            for member in members:
                if member.overrides != first.overrides:
                    self.problem(member.line, None, f"group {group!r}: training overrides "
                                 f"{member.overrides} differ from line {first.line}'s "
                                 f"{first.overrides}; a group trains with one setting")
                if member.token in tokens:
                    self.problem(member.line, "token", f"group {group!r}: token "
                                 f"{member.token!r} is already used by line "
                                 f"{tokens[member.token]}; jointly trained subjects need "
                                 "distinct tokens")
                tokens.setdefault(member.token, member.line)

    # -- images ------------------------------------------------------------------------

    def _resolve_images(self, line: int, source: str) -> tuple[ImageRef, ...]:
        try:
            refs = list_images(source, self.base_dir, self.storage_options)
        except Exception as err:  # a bad path, a missing bucket, no credentials, ...
            self.problem(line, "images", f"cannot list {source!r}: {err}")
            return ()
        if not refs:
            self.problem(line, "images", f"no image files found in {source!r}")
        return tuple(refs)

    def _check_image_files(self, specs: list[SubjectSpec]) -> None:
        work = [(spec, ref) for spec in specs for ref in spec.images]

        def check(item: tuple[SubjectSpec, ImageRef]) -> Problem | None:
            spec, ref = item
            try:
                data = read_image_bytes(ref.uri, self.storage_options)
                check_image(data, name=ref.uri, max_pixels=self.max_pixels,
                            min_side=self.min_side)
            except ImageLoadError as err:
                return Problem(self.name, spec.line, "images", str(err))
            except Exception as err:
                return Problem(self.name, spec.line, "images", f"{ref.uri}: unreadable ({err})")
            return None

        with ThreadPoolExecutor(max_workers=8) as pool:
            self.problems.extend(p for p in pool.map(check, work) if p is not None)


def list_images(source: str, base_dir: Path,
                storage_options: dict[str, Any] | None = None) -> list[ImageRef]:
    """Resolve an `images` cell into image files, sorted.

    A folder (or remote prefix) gives every non-hidden file directly inside it (each
    must then be an image); a glob gives what it matches; a single file gives itself.
    """
    if is_remote(source):
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


def read_image_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of an image file, local or remote."""
    if is_remote(uri):
        import fsspec

        with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
            return handle.read()
    return Path(uri).read_bytes()


def _hidden(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(".")


__all__ = [
    "ALLOWED_COLUMNS", "ID_RULE", "ImageRef", "Job", "ManifestError", "Problem", "SubjectSpec",
    "group_jobs", "list_images", "load_manifest", "read_image_bytes",
    "validate_subject_id",
]
