"""A job's training checkpoints in the artefact store, so a retried job (its actor or
node died: preemption) goes on from its last checkpoint instead of step 0.

    subjects/<first member>/checkpoint/state.safetensors   tensors (tuneqdm.trainstate)
    subjects/<first member>/checkpoint/state.json          written LAST: step, losses,
        optimiser settings, the job's spec hash, the base fingerprint, tensors' sha256

A checkpoint is used only if it names the same spec hash and base fingerprint and its
tensors match their checksum; anything else is ignored (training starts at step 0).
It is removed once the job's subjects are written. The folder has no done.json, so
status shows the subject as unfinished while a checkpoint is there.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .manifest import Job
from .store import Storage, sha256_hex, subject_rel

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = f"{CHECKPOINT_DIR}/state.safetensors"
STATE_JSON = f"{CHECKPOINT_DIR}/state.json"


def _owner(job: Job) -> str:
    return job.subject_ids[0]


def save_checkpoint(storage: Storage, job: Job, spec_hash: str, fingerprint: str,
                    state) -> None:
    """Write `state` (a tuneqdm TrainState) for `job`, its JSON last."""
    tensors, info = state.to_files()
    storage.write_bytes(subject_rel(_owner(job), STATE_TENSORS), tensors)
    storage.write_json(subject_rel(_owner(job), STATE_JSON),
                       {**info, "spec_hash": spec_hash, "base_fingerprint": fingerprint,
                        "tensors_sha256": sha256_hex(tensors), "job_id": job.job_id})


def load_checkpoint(storage: Storage, job: Job, spec_hash: str,
                    fingerprint: str) -> tuple[Any, str]:
    """(TrainState or None, why none): the job's checkpoint if it is for this spec
    and base and intact."""
    from tuneqdm.trainstate import TrainState

    try:
        info = storage.read_json(subject_rel(_owner(job), STATE_JSON))
    except FileNotFoundError:
        return None, "no checkpoint"
    except OSError as err:
        return None, f"checkpoint unreadable: {err}"
    if not isinstance(info, dict) or info.get("spec_hash") != spec_hash or \
            info.get("base_fingerprint") != fingerprint:
        return None, "checkpoint of other settings or another base"
    try:
        tensors = storage.read_bytes(subject_rel(_owner(job), STATE_TENSORS))
        if sha256_hex(tensors) != info.get("tensors_sha256"):
            return None, "checkpoint tensors do not match their checksum"
        return TrainState.from_files(tensors, info), ""
    except (OSError, ValueError) as err:
        return None, f"checkpoint unusable: {err}"


def remove_checkpoint(storage: Storage, job: Job) -> None:
    """Delete the job's checkpoint folder if there is one (best effort)."""
    with contextlib.suppress(OSError):  # StorageError is an OSError
        storage.remove(subject_rel(_owner(job), CHECKPOINT_DIR), recursive=True)
