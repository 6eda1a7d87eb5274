"""Helpers for the serving tests (imported by name: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import socket
from pathlib import Path

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "dreambooth"  # beside the repo
SUBJECTS = {"dog": ("dog", "sks"), "cat": ("cat", "zwx"), "backpack": ("backpack", "qvt")}
STEPS = 4  # sampling steps used by the tests: enough for subjects to differ, still fast
PROMPT = "a photo of {token} {class_noun}"
SAMPLES = 2  # sample images `submit` makes per subject (served by GET .../samples/{n})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_close(image, reference, max_diff: int = 2, mean_diff: float = 0.5) -> None:
    """uint8 images equal up to float rounding of batched products (PNG levels)."""
    import numpy as np

    actual = np.asarray(image).astype(np.int16)
    assert actual.shape == reference.shape
    diff = np.abs(actual - reference)
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


class LocalBackend:
    """http.Backend without Ray: a SubjectStore and one Engine in this process."""

    def __init__(self, store, engine) -> None:
        self.store = store
        self.engine = engine
        self.base = store.base
        self.native_size = engine.native_size
        self.fail_with: Exception | None = None  # raised by generate when set

    def list_subjects(self):
        return self.store.list_subjects()

    def describe(self, subject_id):
        return self.store.describe(subject_id)

    def servable(self, subject_id):
        return self.store.servable(subject_id)

    def read_sample(self, subject_id, index, kind="sample"):
        return self.store.read_sample(subject_id, index, kind)

    async def generate(self, subject_id, params):
        from deploy.engine import GenerationRequest, LoadedSubject

        if self.fail_with is not None:
            raise self.fail_with
        scale_set, info = self.store.read_scale_set(subject_id)
        self.engine.check_fits(scale_set)
        result = self.engine.run([GenerationRequest(LoadedSubject(info, scale_set), params)])[0]
        return {"images": result.png_bytes(), "seeds": list(result.seeds),
                "batch_images": result.batch_images, "batch_subjects": result.batch_subjects}
