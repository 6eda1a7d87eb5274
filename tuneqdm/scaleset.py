"""Scale sets: one subject's (or one jointly trained group's) trained scales.

The artefact of docs/design.md §4: `scales.safetensors` holding, per quantized layer,

    "<layer>.scale_out"  (N, out)     "<layer>.scale_in"  (N, in)   (TuneQDM only)

in fp32 or fp16, with safetensors metadata (all strings): format_version, method,
num_experts, num_train_timesteps, base_fingerprint, subjects (JSON list of
{subject_id, token, class_noun}), training (JSON), final_loss. Never pickled; loading
refuses pickles, unknown versions, and sets whose fingerprint or shapes do not match
the base they are applied to. Sets reach a model's scale tables through
scaletable.ScaleTable (one slot per set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from .scaletable import ScaleTable
from .st_io import save_bytes

FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = (FORMAT_VERSION,)


class ScaleSetError(ValueError):
    """A scale set that cannot be read, or does not fit the base it is applied to."""


@dataclass
class ScaleSet:
    """Trained scales of one subject or group, plus what they were trained on.

    tensors: "<layer>.scale_out" -> (N, out), "<layer>.scale_in" -> (N, in), float32.
    """

    tensors: dict[str, torch.Tensor]
    method: str
    num_experts: int
    num_train_timesteps: int
    base_fingerprint: str
    subjects: list[dict[str, str]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    final_loss: float | None = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_model(cls, unet: nn.Module, **metadata: Any) -> ScaleSet:
        """Copy the current scale parameters (rows 0..N-1, slot 0) of a quantized model."""
        config = unet.tuneqdm_config
        tensors = ScaleTable(unet).read(slot=0)
        metadata.setdefault("base_fingerprint", base_fingerprint_of(unet))
        return cls(
            tensors=tensors,
            method=config.method,
            num_experts=config.num_experts,
            num_train_timesteps=config.num_train_timesteps,
            **metadata,
        )

    @property
    def num_scales(self) -> int:
        """Trainable numbers in the set (all experts)."""
        return sum(t.numel() for t in self.tensors.values())

    @property
    def subject_ids(self) -> list[str]:
        return [s["subject_id"] for s in self.subjects]

    # -- serialisation ----------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "num_experts": str(self.num_experts),
            "num_train_timesteps": str(self.num_train_timesteps),
            "base_fingerprint": self.base_fingerprint,
            "subjects": json.dumps(self.subjects),
            "training": json.dumps(self.training, sort_keys=True),
            "final_loss": "" if self.final_loss is None else repr(float(self.final_loss)),
        }

    def to_bytes(self, dtype: torch.dtype = torch.float32) -> bytes:
        """safetensors bytes; dtype float32 (exact) or float16 (half the size)."""
        if dtype not in (torch.float32, torch.float16):
            raise ScaleSetError(f"scale set dtype {dtype} is not allowed: float32 or float16")
        tensors = {k: v.to(dtype).contiguous() for k, v in sorted(self.tensors.items())}
        return save_bytes(tensors, self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ScaleSet:
        try:
            tensors = st_load(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as err:
            raise ScaleSetError(
                f"{source} is not a safetensors scale set ({err}); pickles and other formats "
                "are refused"
            ) from None
        version = metadata.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ScaleSetError(
                f"{source}: unknown scale-set format_version {version!r}; this library reads "
                f"{list(SUPPORTED_VERSIONS)}"
            )
        try:
            return cls(
                tensors={k: v.float() for k, v in tensors.items()},
                method=metadata["method"],
                num_experts=int(metadata["num_experts"]),
                num_train_timesteps=int(metadata["num_train_timesteps"]),
                base_fingerprint=metadata["base_fingerprint"],
                subjects=json.loads(metadata.get("subjects", "[]")),
                training=json.loads(metadata.get("training", "{}")),
                final_loss=float(metadata["final_loss"]) if metadata.get("final_loss") else None,
            )
        except (KeyError, ValueError) as err:
            raise ScaleSetError(f"{source}: malformed scale-set metadata ({err})") from None

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes(dtype))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScaleSet:
        path = Path(path)
        if not path.is_file():
            raise ScaleSetError(f"scale set {path} does not exist")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    # -- checks -----------------------------------------------------------------------

    def check_fits(self, unet: nn.Module) -> None:
        """Raise ScaleSetError unless this set fits `unet` (fingerprint, layers, shapes)."""
        expected_fp = base_fingerprint_of(unet)
        if self.base_fingerprint != expected_fp:
            raise ScaleSetError(
                f"scale set for subjects {self.subject_ids} was trained on base "
                f"{self.base_fingerprint[:16]}..., not on this base {expected_fp[:16]}..."
            )
        config = unet.tuneqdm_config
        if (self.method, self.num_experts) != (config.method, config.num_experts):
            raise ScaleSetError(
                f"scale set is method={self.method} N={self.num_experts}; the base is set up "
                f"for method={config.method} N={config.num_experts}"
            )
        expected = expected_shapes(unet)
        missing, extra = (
            sorted(set(expected) - set(self.tensors)),
            sorted(set(self.tensors) - set(expected)),
        )
        if missing or extra:
            raise ScaleSetError(
                f"scale set layers differ from the base: missing {missing[:3]}, "
                f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)"
            )
        for name, shape in expected.items():
            if tuple(self.tensors[name].shape) != shape:
                raise ScaleSetError(
                    f"scale set tensor {name} has shape {tuple(self.tensors[name].shape)}, "
                    f"the base needs {shape}"
                )


def expected_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """Tensor name -> (N, channels) that a scale set for `unet` must hold."""
    return ScaleTable(unet).slot_shapes()


def base_fingerprint_of(unet: nn.Module) -> str:
    """The fingerprint of a quantized UNet (set when loaded or computed from tensors)."""
    fingerprint = getattr(unet, "tuneqdm_base_fingerprint", None)
    if fingerprint is None:
        from .base import fingerprint_state, frozen_state_dict

        fingerprint = fingerprint_state(frozen_state_dict(unet))
        unet.tuneqdm_base_fingerprint = fingerprint
    return fingerprint


def install_scale_sets(unet: nn.Module, scale_sets: list[ScaleSet]) -> None:
    """Make each layer's scale table the rows of `scale_sets`, one block of N per set.

    Set k occupies rows k*N .. k*N + N - 1 (its "slot"); the base's weights are not
    touched. With one set the tables stay trainable parameters of shape (N, ...).
    """
    if not scale_sets:
        raise ScaleSetError("install_scale_sets needs at least one scale set")
    for scale_set in scale_sets:
        scale_set.check_fits(unet)
    table = ScaleTable(unet)
    table.allocate(len(scale_sets), trainable=len(scale_sets) == 1)
    for slot, scale_set in enumerate(scale_sets):
        table.write(slot, scale_set.tensors)


def apply_scale_set(unet: nn.Module, scale_set: ScaleSet) -> None:
    """Load one subject's scales into a quantized UNet (checks fit first)."""
    install_scale_sets(unet, [scale_set])


def _read_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (header: u64 length, then JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError("header length past end of file")
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__") or {}
