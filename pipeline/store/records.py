"""Typed records of the artefact store: a subject's metadata and a base's info.

Each fact is stored once in storage (docs/design.md §4):

- `subjects/<id>/meta.json` is a SubjectMeta: what was trained (the row, the settings,
  the base it was trained on), how it went (losses, timing) and where (actor, host,
  versions). Its completion marker `done.json` holds only the checksums of the files;
  derived values (the instance prompt, the job id) are properties, not stored.
- `bases/<address>/done.json` is a base's marker (address, fingerprint, timing); the
  rest of BaseInfo comes from the base's own `quant.json` (written by tuneqdm.base).

`from_dict` reads what earlier versions wrote too: keys that are no longer stored
(`status`, `instance_prompt`, `job_id`, ...) are ignored, missing ones take defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_captions(value: Any) -> tuple[str | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"captions must be a list, not {type(value).__name__}")
    return tuple(None if c is None else str(c) for c in value)


@dataclass(frozen=True)
class SubjectMeta:
    """meta.json of one finished subject (a group's members each get their own)."""

    subject_id: str
    base_fingerprint: str
    base_address: str = ""
    spec_hash: str = ""
    run_id: str | None = None
    group: str | None = None
    members: tuple[str, ...] = ()
    class_noun: str = ""
    token: str = ""
    prompt: str = ""
    images: tuple[str, ...] = ()
    train_config: dict[str, Any] = field(default_factory=dict)
    quant_config: dict[str, Any] = field(default_factory=dict)
    losses: tuple[float, ...] = ()
    final_loss: float | None = None
    steps: int | None = None
    train_seconds: float | None = None
    seconds: float | None = None
    trainable_numbers: int | None = None
    scales_dtype: str = "float32"
    sample_count: int = 0
    sample_steps: int | None = None
    sample_guidance_scale: float | None = None
    attempt: int | None = None
    actor: str = ""
    host: str = ""
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    finished_at: str | None = None
    started_unix: float | None = None  # the attempt's start and end (before writing its
    finished_unix: float | None = None  # files), seconds since the epoch: utilisation
    imported_from: dict[str, Any] | None = None  # `import-reference`: the checkpoint
    resumed_from_step: int | None = None  # went on from a training checkpoint there
    captions: tuple[str | None, ...] | None = None  # per photo (None: `prompt`), if any

    @property
    def instance_prompt(self) -> str:
        """The prompt template filled with the token and class noun."""
        try:
            return self.prompt.format(token=self.token, class_noun=self.class_noun)
        except (KeyError, IndexError, ValueError):
            return self.prompt

    @property
    def job_id(self) -> str:
        """The job that trained it: its group, or the subject alone."""
        return self.group or self.subject_id

    def to_dict(self) -> dict[str, Any]:
        """The meta.json object."""
        return {
            "subject_id": self.subject_id,
            "base": {"address": self.base_address, "fingerprint": self.base_fingerprint},
            "spec_hash": self.spec_hash, "run_id": self.run_id, "group": self.group,
            "members": list(self.members), "class_noun": self.class_noun,
            "token": self.token, "prompt": self.prompt, "images": list(self.images),
            "train_config": dict(self.train_config),
            "quant_config": dict(self.quant_config), "losses": list(self.losses),
            "final_loss": self.final_loss, "steps": self.steps,
            "train_seconds": self.train_seconds, "seconds": self.seconds,
            "trainable_numbers": self.trainable_numbers, "scales_dtype": self.scales_dtype,
            "samples": {"count": self.sample_count, "steps": self.sample_steps,
                        "guidance_scale": self.sample_guidance_scale},
            "attempt": self.attempt, "actor": self.actor, "host": self.host,
            "device": self.device, "versions": dict(self.versions),
            "finished_at": self.finished_at,
        } | self._optional()

    def _optional(self) -> dict[str, Any]:
        """Keys written only when set, so earlier subjects' meta.json bytes stay as they were."""
        extra: dict[str, Any] = {}
        if self.started_unix is not None:
            extra |= {"started_unix": self.started_unix, "finished_unix": self.finished_unix}
        if self.imported_from:
            extra["imported_from"] = dict(self.imported_from)
        if self.resumed_from_step:
            extra["resumed_from_step"] = self.resumed_from_step
        if self.captions is not None:
            extra["captions"] = list(self.captions)
        return extra

    @classmethod
    def from_dict(cls, data: dict[str, Any], subject_id: str | None = None) -> SubjectMeta:
        """Parse meta.json; `subject_id` fills a missing id. ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"meta.json must hold an object, not {type(data).__name__}")
        base = data.get("base") or {}
        samples = data.get("samples") or {}
        try:
            return cls(
                subject_id=str(data.get("subject_id") or subject_id or ""),
                base_fingerprint=str(base.get("fingerprint") or ""),
                base_address=str(base.get("address") or ""),
                spec_hash=str(data.get("spec_hash") or ""), run_id=data.get("run_id"),
                group=data.get("group"), members=tuple(data.get("members") or ()),
                class_noun=str(data.get("class_noun") or ""),
                token=str(data.get("token") or ""), prompt=str(data.get("prompt") or ""),
                images=tuple(data.get("images") or ()),
                train_config=dict(data.get("train_config") or {}),
                quant_config=dict(data.get("quant_config") or {}),
                losses=tuple(float(x) for x in data.get("losses") or ()),
                final_loss=_opt_float(data.get("final_loss")),
                steps=_opt_int(data.get("steps")),
                train_seconds=_opt_float(data.get("train_seconds")),
                seconds=_opt_float(data.get("seconds")),
                trainable_numbers=_opt_int(data.get("trainable_numbers")),
                scales_dtype=str(data.get("scales_dtype") or "float32"),
                sample_count=int(samples.get("count") or 0),
                sample_steps=_opt_int(samples.get("steps")),
                sample_guidance_scale=_opt_float(samples.get("guidance_scale")),
                attempt=_opt_int(data.get("attempt")), actor=str(data.get("actor") or ""),
                host=str(data.get("host") or ""), device=str(data.get("device") or ""),
                versions=dict(data.get("versions") or {}),
                finished_at=data.get("finished_at"),
                started_unix=_opt_float(data.get("started_unix")),
                finished_unix=_opt_float(data.get("finished_unix")),
                imported_from=data.get("imported_from"),
                resumed_from_step=_opt_int(data.get("resumed_from_step")),
                captions=_opt_captions(data.get("captions")),
            )
        except (AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"meta.json is malformed: {err}") from None


@dataclass(frozen=True)
class BaseInfo:
    """A complete quantized base in storage: its marker plus its quant.json facts."""

    address: str
    fingerprint: str
    source: str = ""
    revision: str | None = None
    quant_config: dict[str, Any] = field(default_factory=dict)
    unet_tensor_bytes: int | None = None
    quantize_seconds: float | None = None
    created_at: str | None = None

    def marker(self) -> dict[str, Any]:
        """The base's done.json object (its quant.json holds the other facts)."""
        return {"address": self.address, "fingerprint": self.fingerprint,
                "quantize_seconds": self.quantize_seconds, "created_at": self.created_at}

    def to_dict(self) -> dict[str, Any]:
        return {**self.marker(), "source": self.source, "revision": self.revision,
                "quant_config": dict(self.quant_config),
                "unet_tensor_bytes": self.unet_tensor_bytes}

    @classmethod
    def from_marker(cls, address: str, marker: dict[str, Any],
                    quant_info: dict[str, Any]) -> BaseInfo:
        """From done.json and quant.json (whose fingerprints the caller compared)."""
        return cls(address=address, fingerprint=str(marker["fingerprint"]),
                   source=str(quant_info.get("source") or ""),
                   revision=quant_info.get("revision"),
                   quant_config=dict(quant_info.get("quant_config") or {}),
                   unet_tensor_bytes=_opt_int(quant_info.get("unet_tensor_bytes")),
                   quantize_seconds=_opt_float(marker.get("quantize_seconds")),
                   created_at=marker.get("created_at"))
