"""Shared pieces of the serving benchmarks (benchmarks/serve_*.py).

- `prepare_output(root, n)`: a submit-style output folder with the tiny base (built
  offline, quantized with pipeline.store.quantize_into_storage, no Ray) and n subjects.
  The subjects are *synthetic*: scale sets drawn around the base's s0 (s_out = s0 *
  (1 + 0.05 eps), s_in = 1 + 0.05 eps, per expert; POOL draws reused in turn), written
  with pipeline.store.write_subject exactly as `submit` writes trained ones, by 8
  threads (10,000 subjects in minutes). Swap cost, batching and throughput depend on
  the scale sets' shapes, not their values, and 100 real trainings would cost minutes
  of the shared machine for nothing.
- `local_serve(...)`: local Ray (2 CPUs) + Serve on 127.0.0.1, stopped on exit.
- `percentile`, `markdown_table`, `write_json`, `machine_info`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

QUANT = {"bits": 4, "method": "tuneqdm", "num_experts": 4}
CLASSES = ("dog", "cat", "backpack", "toy", "star", "circle", "square", "triangle")
TOKENS = ("sks", "zwx", "qvt")


def subject_ids(n: int) -> list[str]:
    return [f"subject-{i:03d}" for i in range(n)]


def prepare_output(root: str | Path, num_subjects: int, seed: int = 0,
                   threads: int = 8) -> Path:
    """`root/out` with the tiny quantized base and `num_subjects` synthetic subjects
    (those already finished there are kept). Fast enough for 10,000 subjects: the
    scale tensors are drawn once for POOL sets and reused in turn (each subject's set
    still carries its own id, so its bytes and checksum are its own and the store's
    verifier accepts it), and `threads` writers overlap the writes' fsyncs."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.store import Storage

    root = Path(root)
    output = root / "out"
    storage = Storage(str(output))
    missing = [(index, subject_id) for index, subject_id in enumerate(subject_ids(num_subjects))
               if not (output / "subjects" / subject_id / "done.json").is_file()]
    if not missing:
        return output
    base = _tiny_base(root, storage)
    pool = _tensor_pool(storage, base["address"], seed)
    with ThreadPoolExecutor(threads) as writers:
        list(writers.map(lambda item: _write_synthetic(storage, base, pool, *item), missing))
    return output


POOL = 16  # distinct synthetic tensor sets, reused in turn


def _tiny_base(root: Path, storage) -> dict[str, Any]:
    """The tiny test base quantized into `storage` (once): its done.json marker."""
    from pipeline.store import content_address, quantize_into_storage, read_done
    from tuneqdm import QuantConfig
    from tuneqdm.testing import save_tiny_pipeline

    source = root / "tiny-sd"
    if not (source / "model_index.json").is_file():
        save_tiny_pipeline(source)
    quant = QuantConfig(**QUANT).to_dict()
    address = content_address(str(source), None, quant)
    done = read_done(storage, address) or quantize_into_storage(
        storage, address, str(source), None, quant)
    return {**done, "address": address, "quant": quant}


def _tensor_pool(storage, address: str, seed: int) -> list[dict[str, Any]]:
    """POOL scale tensor dicts around the base's s0: s_out (N, out) = s0 * (1 + 0.05
    eps), s_in (N, in) = 1 + 0.05 eps, fp32."""
    import torch

    from pipeline.store import base_rel
    from tuneqdm.base import load_quantized_unet
    from tuneqdm.model import quantized_layers

    layers = quantized_layers(load_quantized_unet(storage.local_path(base_rel(address))))
    n = QUANT["num_experts"]
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL):
        tensors = {}
        for name, layer in layers.items():
            noise = torch.randn(n, layer.out_features, generator=generator)
            tensors[f"{name}.scale_out"] = layer.scale0.float() * (1 + 0.05 * noise)
            noise = torch.randn(n, layer.in_features, generator=generator)
            tensors[f"{name}.scale_in"] = 1 + 0.05 * noise
        pool.append(tensors)
    return pool


def _write_synthetic(storage, base: dict[str, Any], pool: list[dict[str, Any]], index: int,
                     subject_id: str) -> None:
    """One subject's folder through pipeline.store.write_subject, as `submit` writes."""
    from pipeline.store import SubjectMeta, write_subject
    from tuneqdm.scaleset import ScaleSet

    class_noun, token = CLASSES[index % len(CLASSES)], TOKENS[index % len(TOKENS)]
    scale_set = ScaleSet(tensors=pool[index % len(pool)], method="tuneqdm",
                         num_experts=QUANT["num_experts"], num_train_timesteps=1000,
                         base_fingerprint=base["fingerprint"],
                         subjects=[{"subject_id": subject_id, "token": token,
                                    "class_noun": class_noun}])
    meta = SubjectMeta(subject_id=subject_id, base_fingerprint=base["fingerprint"],
                       base_address=base["address"], spec_hash=f"synthetic-{index}",
                       run_id="synthetic", class_noun=class_noun, token=token,
                       prompt="a photo of {token} {class_noun}", quant_config=base["quant"],
                       steps=0, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_subject(storage, subject_id, scale_set.to_bytes(), meta, [])


@contextlib.contextmanager
def local_serve(output: Path, port: int = 8790, num_cpus: int = 2, **settings: Any):
    """Serve `output` on 127.0.0.1:`port` from a local Ray; yields the base URL."""
    with local_serve_apps(output, {"/": settings}, port, num_cpus) as url:
        yield url


@contextlib.contextmanager
def local_serve_apps(output: Path, apps: dict[str, dict[str, Any]], port: int = 8790,
                     num_cpus: int = 2):
    """Several apps (route prefix -> ServeSettings fields) on one local Serve; the app
    at "/" is named "tuneqdm", the others after their prefix. Yields the base URL."""
    import ray
    from ray import serve

    from deploy.app import ServeSettings, build_app

    ray.init(num_cpus=num_cpus, object_store_memory=128 * 2**20, include_dashboard=False,
             namespace="tuneqdm-bench", log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for prefix, settings in apps.items():
            name = "tuneqdm" if prefix == "/" else prefix.strip("/")
            app_settings = ServeSettings(output=str(output), name=name, route_prefix=prefix,
                                         **settings)
            serve.run(build_app(app_settings), name=name, route_prefix=prefix)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_stats() -> list[dict[str, Any]]:
    """stats() of the model replicas that answer a few calls (best effort)."""
    from ray import serve

    handle = serve.get_deployment_handle("SubjectModel", app_name="tuneqdm")
    seen = {}
    for _ in range(8):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
    return list(seen.values())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "load_average": load,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {path}")


# runwayml/stable-diffusion-v1-5 unet/config.json, the fields that shape the model
# (the hub cannot be reached; sizes depend on shapes only).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
}


def sd15_scale_skeleton(num_experts: int = 4):
    """The SD v1.5 UNet quantized as a skeleton on the meta device (no weights), with
    CPU `scale0` and a 1-byte CPU `packed` per layer: enough for a ScaleBank and
    ScaleSet.check_fits at full SD v1.5 shapes without 3.4 GB of weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn

    from tuneqdm import QuantConfig
    from tuneqdm.model import build_quantized_skeleton, quantized_layers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        build_quantized_skeleton(unet, QuantConfig(bits=4, num_experts=num_experts), names)
    for layer in quantized_layers(unet).values():
        layer.packed = torch.zeros(1, dtype=torch.uint8)
        layer.scale0 = torch.full((layer.out_features,), 1e-3)
    unet.tuneqdm_base_fingerprint = "sd15-skeleton"
    return unet
