"""Peak training memory of the toy-world comparison's rows (benchmarks/toyworld_table.py).

Each measurement runs in a fresh process, so one row's allocations never sit in
another's peak: the growth of peak RSS while a row fine-tunes for a few steps, after
two warm-up steps. `INVERSION` measures the token inversion (toyworld/invert.py) the
same way: learnt once per subject on the float base, before any row fine-tunes.

    python benchmarks/_toyworld_memory.py models/toyworld-base tuneqdm-n4-w4 10
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes
from toyworld.compare import UNTUNED_METHODS, CompareConfig, Method
from toyworld.subjects import SUBJECTS

INVERSION = "token-inversion"  # the key of the inversion's measurement


def _measured(step) -> int:
    """Peak RSS growth (bytes) while `step()` runs, after the collector has run."""
    import gc

    gc.collect()
    release_free_memory()
    before = rss_bytes()
    reset_peak_rss()
    step()
    return peak_rss_bytes() - before


def memory_child(base: str, key: str, steps: int) -> dict:
    """In a fresh process: peak RSS growth while fine-tuning `key` (a Method key, or
    INVERSION) for `steps` steps at CompareConfig's batch."""
    import torch

    from toyworld.compare import (
        load_base,
        memory_config,
        method_unet,
        train_config,
        training_subject,
        with_unet,
    )
    from tuneqdm.train import finetune

    torch.set_num_threads(1)
    pipe = load_base(base)
    subject = training_subject(SUBJECTS[0])
    config = memory_config(CompareConfig())
    if key == INVERSION:
        from toyworld.invert import invert_token

        def invert(n: int):
            return invert_token(pipe, subject, n, config.lr_invert, config.batch_size, 0)

        invert(2)
        peak = _measured(lambda: invert(steps))
        return {"method": key, "peak_train_bytes": peak, "model_bytes": 0}
    method = Method.from_key(key)
    unet = method_unet(pipe.unet, method)
    tuned = with_unet(pipe, unet)
    pipe.unet = None
    finetune(tuned, [subject], replace(train_config(method, unet, config, 0), steps=2))
    peak = _measured(lambda: finetune(
        tuned, [subject], replace(train_config(method, unet, config, 0), steps=steps)))
    return {"method": key, "peak_train_bytes": peak,
            "model_bytes": sum(t.numel() * t.element_size()
                               for t in [*unet.parameters(), *unet.buffers()])}


def measure_memory(base: Path, methods: list[Method], steps: int,
                   inversion: bool = False) -> dict[str, dict]:
    """memory_child of every fine-tuned row (and of the inversion, if `inversion`),
    two processes at a time; keyed by Method key (and INVERSION)."""
    def one(key: str) -> dict:
        command = [sys.executable, __file__, str(base), key, str(steps)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    keys = [m.key for m in methods if m.name not in UNTUNED_METHODS]
    if inversion and keys:
        keys.append(INVERSION)
    with ThreadPoolExecutor(2) as pool:
        return {r["method"]: r for r in pool.map(one, keys)}


if __name__ == "__main__":
    base, key, steps = sys.argv[1:]
    print(json.dumps(memory_child(base, key, int(steps))))
