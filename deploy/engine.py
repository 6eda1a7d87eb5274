"""The generation engine of one replica: the quantized base, loaded ONCE, and its bank.

No Ray here: a Serve replica wraps an Engine (app.py), and `tuneqdm-pipeline
generate` uses one directly, so both produce the same images for the same seed.

    Engine(base_path, fingerprint, capacity)      load the base, preallocate the bank
    engine.run([GenerationRequest, ...])          one UNet batch, any mix of subjects

A batch's requests must agree on steps, guidance and size (their `batch_key`);
prompts, negative prompts, seeds, image counts, strengths and subjects may all
differ. Each image is seeded on its own (tuneqdm.generate), so an image does not
depend on what else shares its batch, up to float rounding of batched matrix products.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneqdm.generate import generate

from .bank import ScaleBank
from .errors import BaseNotFound, SubjectMismatch
from .params import GenerationParams
from .store import SubjectInfo


@dataclass(eq=False)
class LoadedSubject:
    """A subject's scale set in host memory, as returned by the multiplexed loader.

    `key` names this exact scale set (id + checksum): a retrained subject is a new key.
    When Serve's model cache evicts it, it calls `__del__`, which tells the bank that
    its slot may go first (`on_evict`); the bank keeps the rows until it needs the slot.
    """

    info: SubjectInfo
    scale_set: object  # tuneqdm.scaleset.ScaleSet
    loaded_at: float = field(default_factory=time.time)
    on_evict: Callable[[Hashable], None] | None = None
    fresh: bool = True  # no request has used it yet

    @property
    def key(self) -> tuple[str, str]:
        return (self.info.subject_id, self.info.scales_sha256)

    def __del__(self) -> None:  # Serve calls it on eviction, Python again on collection
        callback, self.on_evict = self.on_evict, None
        if callback is not None:
            with contextlib.suppress(Exception):
                callback(self.key)


@dataclass(eq=False)
class GenerationRequest:
    subject: LoadedSubject
    params: GenerationParams


@dataclass
class GenerationResult:
    """Images of one request, and the batch it rode in."""

    images: list  # PIL images, params.num_images of them
    seeds: tuple[int, ...]
    batch_images: int
    batch_subjects: int
    seconds: float

    def png_bytes(self) -> list[bytes]:
        return [to_png(image) for image in self.images]


def to_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device,
                                                                         torch.dtype]:
    """(device, compute dtype) of a replica (tuneqdm/device.py decides): "auto" is the
    GPU Ray assigned, else the CPU; "cuda" without one is refused, never silently the
    CPU; dtype "auto" is bf16 on CUDA (fp16 allowed: the kernels pre-scale), fp32 else."""
    from tuneqdm.device import DeviceError, resolve_dtype
    from tuneqdm.device import resolve_device as pick

    try:
        resolved = pick(device, _ray_gpu_ids())
    except DeviceError as err:
        raise ValueError(str(err)) from None
    return resolved, resolve_dtype(dtype, resolved)


def _ray_gpu_ids() -> list | None:
    """GPU ids Ray assigned to this replica; None outside Ray (`generate` without Serve)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_gpu_ids() if ray.is_initialized() else None


class Engine:
    """A quantized pipeline with a ScaleBank of `capacity` subjects.

    Not thread-safe: one caller at a time (a replica's batch thread).
    """

    def __init__(self, base_path: str | Path, fingerprint: str, capacity: int,
                 device: str = "auto", dtype: str = "auto",
                 scheduler: str | None = None, cache_weights: bool = False) -> None:
        """capacity: subjects the bank holds (serving: ServeSettings'
        max_subjects_per_replica); scheduler: the sampler for every request
        (tuneqdm.schedulers), set once here; None keeps the base's own;
        cache_weights: keep the centred weights expanded (weight_cache_bytes says how
        much memory that holds; the subjects' scales act on activations, so one cache
        serves every subject)."""
        from diffusers.utils import logging as diffusers_logging

        from tuneqdm.base import load_quantized_pipeline
        from tuneqdm.schedulers import make_scheduler

        diffusers_logging.disable_progress_bar()
        self.device, self.dtype = resolve_device(device, dtype)
        self.pipe = load_quantized_pipeline(base_path, self.device, self.dtype)
        loaded = getattr(self.pipe.unet, "tuneqdm_base_fingerprint", None)
        if loaded != fingerprint:
            raise BaseNotFound(f"base at {base_path} has fingerprint {str(loaded)[:12]}..., "
                               f"expected {fingerprint[:12]}...")
        self.fingerprint = fingerprint
        self.pipe.set_progress_bar_config(disable=True)
        if scheduler is not None:
            self.pipe.scheduler = make_scheduler(scheduler, self.pipe.scheduler.config)
        self.bank = ScaleBank(self.pipe.unet, capacity)
        self.weight_cache_bytes = 0
        if cache_weights:
            from tuneqdm.inference import cache_expanded_weights

            self.weight_cache_bytes = cache_expanded_weights(self.pipe.unet, self.dtype)
        self.native_size = int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def check_fits(self, scale_set) -> None:
        """SubjectMismatch (409) unless `scale_set` fits this UNet (base, layers, shapes)."""
        from tuneqdm.scaleset import ScaleSetError

        try:
            scale_set.check_fits(self.pipe.unet)
        except ScaleSetError as err:
            raise SubjectMismatch(str(err)) from None

    @torch.no_grad()
    def run(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request's images in ONE pipeline call (one UNet batch)."""
        if not requests:
            return []
        key = requests[0].params.batch_key
        if any(r.params.batch_key != key for r in requests):
            raise ValueError("requests of one batch must share steps, guidance and size")
        start = time.perf_counter()
        slots = self.bank.acquire([(r.subject.key, r.subject.scale_set) for r in requests])
        prompts, negatives, seeds, image_slots, strengths = [], [], [], [], []
        for request, slot in zip(requests, slots, strict=True):
            n = request.params.num_images
            prompts += [request.params.prompt] * n
            negatives += [request.params.negative_prompt] * n
            seeds += list(request.params.seeds)
            image_slots += [slot] * n
            strengths += [float(request.params.strength)] * n
        steps, guidance, height, width = key
        images = generate(
            self.pipe, prompts, seed=seeds, slots=image_slots, num_inference_steps=steps,
            guidance_scale=guidance, height=height, width=width,
            negative_prompt=negatives if any(negatives) else None,
            strengths=strengths)  # all 1: the unchanged path (tuneqdm.generate)
        seconds = time.perf_counter() - start
        results, offset = [], 0
        for request in requests:
            n = request.params.num_images
            results.append(GenerationResult(
                images=images[offset:offset + n], seeds=request.params.seeds,
                batch_images=len(prompts), batch_subjects=len(set(slots)), seconds=seconds))
            offset += n
        return results
