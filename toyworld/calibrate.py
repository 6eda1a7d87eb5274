"""Calibration inputs for GPTQ rounding of the toy-world UNet (tuneqdm/gptq.py).

GPTQ needs the inputs each layer sees. They come from the float UNet's forward on
what the base itself trained on: scenes of the training split (split.py) with
their training captions, noised at uniform timesteps. No subject photo, no
subject's held-out shape/pattern combination and no evaluation prompt is used, so
the quantized base stays subject-agnostic, as a base quantized once must be.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .base import encode_dataset
from .split import sample_training_scene, training_caption
from .text import tokenize

CALIBRATION_SEED = 123
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def calibration_hessians(pipe, batches: int = 16, batch_size: int = 16,
                         scenes: int = 1024, seed: int = CALIBRATION_SEED) -> dict:
    """GPTQ Hessians {layer name: (K, K) float64} of `pipe.unet`'s Linear / Conv2d
    layers from `batches` x `batch_size` noised training-split latents (v-prediction
    inputs, as the base trained on), drawn from `scenes` scenes; deterministic in
    `seed`. Cached per UNet object with the arguments last used (one table computes
    them once per process; about 10 s on 2 cores)."""
    from tuneqdm.gptq import collect_hessians

    key = (batches, batch_size, scenes, seed)
    cached = _CACHE.get(pipe.unet)
    if cached is not None and cached[0] == key:
        return cached[1]
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    drawn = [sample_training_scene(rng) for _ in range(scenes)]
    means, stds, _ = encode_dataset(pipe.vae, drawn)
    scaling = float(pipe.vae.config.scaling_factor)
    means, stds = means * scaling, stds * scaling  # (scenes, 4, 32, 32)
    total = pipe.scheduler.config.num_train_timesteps

    def run_batches(unet) -> None:
        for _ in range(batches):
            index = torch.from_numpy(rng.integers(len(drawn), size=batch_size))
            clean = means[index] + stds[index] * torch.randn(means[index].shape,
                                                             generator=generator)
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, total, (batch_size,), generator=generator)
            noisy = pipe.scheduler.add_noise(clean, noise, timesteps)
            captions = [training_caption(drawn[int(i)], rng) for i in index]
            hidden = pipe.text_encoder(tokenize(pipe.tokenizer, captions))[0]
            unet(noisy, timesteps, encoder_hidden_states=hidden)

    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        hessians = collect_hessians(pipe.unet, run_batches)
    finally:
        pipe.unet.train(was_training)
    _CACHE[pipe.unet] = (key, hessians)
    return hessians
