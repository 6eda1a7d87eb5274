"""Generation: reproducible, experts follow every scheduler's t, subjects batch together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneqdm import expert_index, quantized_layers
from tuneqdm.base import load_quantized_pipeline
from tuneqdm.generate import generate
from tuneqdm.scaleset import ScaleSet

STEPS = 4


def _as_array(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def _subject_set(unet, seed: int, subject: str) -> ScaleSet:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quantized_layers(unet).values():
            layer.reset_scales()
            layer.scale_out.mul_(1 + 0.3 * torch.randn(layer.scale_out.shape, generator=generator))
            layer.scale_in.mul_(1 + 0.3 * torch.randn(layer.scale_in.shape, generator=generator))
    subjects = [{"subject_id": subject, "token": "sks", "class_noun": "dog"}]
    return ScaleSet.from_model(unet, subjects=subjects)


@pytest.fixture(scope="module")
def pipe(tiny_base_dir):
    return load_quantized_pipeline(tiny_base_dir)


def test_seed_reproducible(pipe):
    first = generate(pipe, ["a photo of sks dog"], seed=5, num_inference_steps=STEPS)
    second = generate(pipe, ["a photo of sks dog"], seed=5, num_inference_steps=STEPS)
    other = generate(pipe, ["a photo of sks dog"], seed=6, num_inference_steps=STEPS)
    assert np.array_equal(_as_array(first), _as_array(second))
    assert not np.array_equal(_as_array(first), _as_array(other))


def test_subjects_mixed_in_one_batch_match_one_at_a_time(pipe):
    sets = [_subject_set(pipe.unet, 1, "a"), _subject_set(pipe.unet, 2, "b")]
    prompts = ["a photo of sks dog", "a photo of sks dog on the grass"]
    together = _as_array(generate(pipe, prompts, sets, seed=[11, 12], num_inference_steps=STEPS))
    alone = _as_array(
        [
            generate(pipe, [prompts[i]], sets[i], seed=[11 + i], num_inference_steps=STEPS)[0]
            for i in range(2)
        ]
    )
    assert np.abs(together - alone).max() <= 2  # batched matmuls may round differently
    swapped = _as_array(
        generate(pipe, prompts, sets[::-1], seed=[11, 12], num_inference_steps=STEPS)
    )
    assert np.abs(swapped - together).mean() > 1  # the scale set really changes the image


@pytest.mark.parametrize(
    "scheduler_name",
    ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"],
)
def test_experts_follow_the_schedulers_t(pipe, scheduler_name):
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(original.config)
    seen = []
    router = pipe.unet.tuneqdm_router
    hook = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(
            (kwargs.get("timestep", args[1]), router.rows.clone())
        ),
        with_kwargs=True,
    )
    try:
        images = generate(
            pipe, ["a photo of sks dog"], seed=0, num_inference_steps=6, guidance_scale=3.0
        )
    finally:
        hook.remove()
        pipe.scheduler = original
    assert images[0].size == (16, 16) and len(seen) >= 6
    experts_seen = set()
    for timestep, rows in seen:
        expected = expert_index(torch.as_tensor(timestep), 2, 1000).reshape(-1)
        assert rows.shape == (2,)  # classifier-free guidance doubles the batch
        assert torch.equal(rows, expected.expand(2))
        experts_seen.update(rows.tolist())
    assert experts_seen == {0, 1}


def test_bad_arguments_are_explained(pipe):
    one = _subject_set(pipe.unet, 1, "a")
    with pytest.raises(ValueError, match="2 scale sets for 1 prompts"):
        generate(pipe, ["x"], [one, one])
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        generate(pipe, ["x"], seed=[1, 2])
