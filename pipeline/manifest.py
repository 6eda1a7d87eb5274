"""subjects.csv: parse and validate every row before any Ray work starts.

One row per subject. Columns (header required, order free):

    subject_id    required; 1-64 of a-z 0-9 - _, starting with a letter or digit; unique
    images        required; a folder, a glob (*.jpg) or a remote prefix (s3://b/dogs/);
                  relative paths are relative to the CSV file's folder; a photo's
                  optional caption is <photo name>.txt beside it (photos.py)
    class         required; the class noun ("dog", "backpack")
    token         optional; the rare identifier word, default "sks"
    prompt        optional; instance prompt template with {token} and {class_noun},
                  default "a photo of {token} {class_noun}"
    group         optional; rows sharing a group train jointly into one scale set
    steps, lr_scale_out, lr_scale_in, seed    optional per-row training overrides

Blank lines and lines starting with `#` are ignored. All problems are collected and
raised together as one `ManifestError`, each naming file, line and column. Each
column's rule is one reader in columns.py; photos are listed by photos.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneqdm.images import DEFAULT_MAX_PIXELS, ImageLoadError, check_image

from .columns import (
    ALLOWED_COLUMNS,
    CELL_READERS,
    DEFAULT_PROMPT,
    DEFAULT_TOKEN,
    OVERRIDE_COLUMNS,
    REQUIRED_COLUMNS,
    read_images,
)
from .photos import ImageRef, read_image_bytes


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
            "images": [_image_dict(ref) for ref in self.images],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubjectSpec:
        return cls(
            subject_id=data["subject_id"], class_noun=data["class_noun"],
            token=data["token"], prompt=data["prompt"], group=data.get("group"),
            overrides=dict(data.get("overrides", {})),
            images=tuple(ImageRef(i["uri"], int(i["size"]), i.get("caption"))
                         for i in data["images"]),
        )

    @property
    def captions(self) -> list[str] | None:
        """Each photo's prompt template (its caption, else the row's prompt), or None
        when no photo has a caption."""
        if all(ref.caption is None for ref in self.images):
            return None
        return [ref.caption or self.prompt for ref in self.images]

    def sample_prompts(self, count: int) -> list[str]:
        """`count` prompts to draw its samples from: with captions, its photos' captions
        in turn, filled in (a caption names a context, so the sample shows the subject
        somewhere it was trained to be drawn); else the instance prompt each time."""
        templates = self.captions or [self.prompt]
        return [templates[i % len(templates)].format(token=self.token,
                                                     class_noun=self.class_noun)
                for i in range(count)]


def _image_dict(ref: ImageRef) -> dict[str, Any]:
    """A photo as stored in a job (and hashed: a caption-less photo hashes as before
    captions existed, so finished subjects still count on resume)."""
    out: dict[str, Any] = {"uri": ref.uri, "size": ref.size}
    if ref.caption is not None:
        out["caption"] = ref.caption
    return out


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
    """Collects every problem of one CSV text; `parse` raises them together."""

    def __init__(self, name: str, base_dir: Path, storage_options: dict[str, Any],
                 check_images: bool, max_pixels: int, min_side: int) -> None:
        self.name = name
        self.base_dir = base_dir
        self.storage_options = storage_options
        self.check_images = check_images
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.problems: list[Problem] = []
        self._listed: dict[str, tuple[ImageRef, ...] | ValueError] = {}

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
        specs = self._specs(columns, rows[1:])
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

    def _specs(self, columns: list[str], rows: list[tuple[int, list[str]]]
               ) -> list[SubjectSpec]:
        """The valid rows, each id once (problems recorded for the others)."""
        specs: list[SubjectSpec] = []
        first_line: dict[str, int] = {}
        self._list_all(columns, rows)
        for line, cells in rows:
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
        return specs

    def _row(self, line: int, row: dict[str, str]) -> SubjectSpec | None:
        """A row's SubjectSpec, or None after recording each bad cell's problem."""
        before = len(self.problems)
        values: dict[str, Any] = {}
        for column, read in CELL_READERS:
            try:
                values[column] = read(row.get(column, ""))
            except ValueError as err:
                self.problem(line, column, str(err))
        overrides = {c: values[c] for c in OVERRIDE_COLUMNS if values.get(c) is not None}
        images: tuple[ImageRef, ...] = ()
        listed = self._listed.get(row["images"]) or self._list(row["images"])
        if isinstance(listed, ValueError):
            self.problem(line, "images", str(listed))
        else:
            images = listed
        if len(self.problems) != before:
            return None
        return SubjectSpec(values["subject_id"], images, values["class"], values["token"],
                           values["prompt"], values["group"], overrides, line)

    def _list(self, raw: str) -> tuple[ImageRef, ...] | ValueError:
        try:
            return read_images(raw, self.base_dir, self.storage_options)
        except ValueError as err:
            return err

    def _list_all(self, columns: list[str], rows: list[tuple[int, list[str]]]) -> None:
        """List every distinct `images` cell at once (threads): against object storage
        each listing is a few round trips, and one after another they dominated the
        start of a large run (docs/pipeline.md, "Scale")."""
        if "images" not in columns:
            return
        at = columns.index("images")
        cells = {cells[at].strip() for _, cells in rows if len(cells) == len(columns)}
        with ThreadPoolExecutor(max_workers=16) as pool:
            self._listed = dict(zip(cells, pool.map(self._list, cells), strict=True))

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
            self._check_members(group, members)

    def _check_members(self, group: str, members: list[SubjectSpec]) -> None:
        """One group's rows: the same overrides, distinct tokens."""
        first = members[0]
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

    def _check_image_files(self, specs: list[SubjectSpec]) -> None:
        first: dict[str, tuple[SubjectSpec, ImageRef]] = {}
        for spec in specs:  # each photo once, reported on the first row naming it
            for ref in spec.images:
                first.setdefault(ref.uri, (spec, ref))
        work = list(first.values())

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


__all__ = [
    "DEFAULT_PROMPT", "Job", "ManifestError", "Problem", "SubjectSpec", "group_jobs",
    "load_manifest",
]
