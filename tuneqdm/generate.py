"""Image generation with a quantized UNet and subjects' scale sets.

A diffusers StableDiffusionPipeline runs unchanged: its UNet's forward pre-hook
(experts.py) picks each sample's expert from the scheduler's t (int or float, so
DDIM, PNDM, Euler and DPM-Solver all work) and its scale set's slot. Prompts for
several subjects run as ONE batch: their scale sets are written into the layers'
scale tables (scaletable.py), one slot each, or already sit there (a serving bank
passes `slots=`), and each prompt's samples use their own slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from PIL import Image

from .scaleset import ScaleSet, install_scale_sets
from .scaletable import ScaleTable
from .schedulers import use_scheduler

DEFAULT_STEPS = 25  # sampling steps, also the service's default (deploy/params.py)
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance scale, likewise


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    scale_sets: ScaleSet | list[ScaleSet] | None = None,
    seed: int | list[int] = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    slots: Sequence[int] | None = None,
    scheduler: str | None = None,
    strengths: float | Sequence[float] | None = None,
) -> list[Image.Image]:
    """Generate images, num_images_per_prompt per prompt, in prompt order.

    scale_sets: None (the UNet's current scales), one set for every prompt, or one
        per prompt (sets may repeat; each distinct set is installed once).
    seed: one seed (prompt p, image j uses seed + p * num_images_per_prompt + j) or
        one seed per prompt (image j uses seed_p + j), so a prompt's images do not
        depend on what else is in the batch.
    slots: instead of scale_sets, the scale-table slot of each prompt (one per
        prompt) in a UNet whose tables hold them already (ScaleTable.write).
    scheduler: a sampler by name for this call (tuneqdm.schedulers), built from the
        pipeline's scheduler config; None: the pipeline's own.
    strengths: the strength alpha of every prompt (one number) or of each prompt:
        its scales are s0 + alpha (s - s0) (s_in: 1 + alpha (s_in - 1)), so 0 is the
        untuned base and 1 the subject (ScaleTable.select). None, or all 1: the
        subject's scales exactly as without it.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    per_prompt_seeds = _seeds(seed, len(prompts), num_images_per_prompt)
    table, prompt_slots = _prompt_slots(pipe.unet, len(prompts), scale_sets, slots)
    image_slots = None
    if prompt_slots is not None:
        image_slots = torch.tensor(prompt_slots).repeat_interleave(num_images_per_prompt)
    image_strengths = _image_strengths(strengths, len(prompts), num_images_per_prompt)
    if image_strengths is not None and table is None:
        raise ValueError("strengths need a quantized UNet")
    device = pipe._execution_device
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in per_prompt_seeds]
    latents = _initial_latents(pipe, generators, height, width, device)
    selection = (table.select(image_slots, image_strengths) if table is not None
                 else contextlib.nullcontext())
    with selection, use_scheduler(pipe, scheduler):  # the pipeline's own when None
        output = pipe(prompt=prompts, negative_prompt=negative_prompt,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                      latents=latents, output_type="pil")
    return output.images


def _prompt_slots(
    unet,
    num_prompts: int,
    scale_sets: ScaleSet | list[ScaleSet] | None,
    slots: Sequence[int] | None,
) -> tuple[ScaleTable | None, list[int] | None]:
    """(the UNet's scale table or None if not quantized, each prompt's slot or None).

    Installs the scale sets (each distinct one once) into the table first.
    """
    try:
        table = ScaleTable(unet)
    except ValueError:  # a float UNet
        if scale_sets is not None or slots is not None:
            raise ValueError(
                f"{'scale sets' if slots is None else 'slots'} need a quantized UNet"
            ) from None
        return None, None
    if slots is not None:
        if scale_sets is not None:
            raise ValueError("give scale_sets or slots, not both")
        if len(slots) != num_prompts:
            raise ValueError(f"{len(slots)} slots for {num_prompts} prompts: give one per prompt")
        return table, [int(s) for s in slots]
    if isinstance(scale_sets, ScaleSet):
        install_scale_sets(unet, [scale_sets])
    elif scale_sets is not None:
        if len(scale_sets) != num_prompts:
            raise ValueError(
                f"{len(scale_sets)} scale sets for {num_prompts} prompts: give "
                "one set, or one per prompt"
            )
        distinct = list({id(s): s for s in scale_sets}.values())
        install_scale_sets(unet, distinct)
        slots = [next(i for i, d in enumerate(distinct) if d is s) for s in scale_sets]
    return table, slots


def _image_strengths(
    strengths: float | Sequence[float] | None, num_prompts: int, per_prompt: int
) -> torch.Tensor | None:
    """(num_prompts * per_prompt,) float32 strength of each image, or None when every
    strength is 1 (the unchanged, cheapest path)."""
    if strengths is None:
        return None
    if isinstance(strengths, (int, float)):
        strengths = [float(strengths)] * num_prompts
    values = torch.as_tensor([float(a) for a in strengths], dtype=torch.float32)
    if len(values) != num_prompts:
        raise ValueError(f"{len(values)} strengths for {num_prompts} prompts: give one "
                         "or one per prompt")
    if not torch.isfinite(values).all():
        raise ValueError(f"strengths {values.tolist()} are invalid: must be finite numbers")
    if bool((values == 1).all()):
        return None
    return values.repeat_interleave(per_prompt)


def _seeds(seed: int | list[int], num_prompts: int, per_prompt: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(num_prompts * per_prompt)]
    if len(seed) != num_prompts:
        raise ValueError(f"{len(seed)} seeds for {num_prompts} prompts: give one or one each")
    return [s + j for s in seed for j in range(per_prompt)]


def _initial_latents(pipe, generators, height, width, device) -> torch.Tensor:
    """(B, C, h, w) starting noise, each sample from its own CPU generator, so images
    are identical across devices and batch compositions."""
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (
        pipe.unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(device, pipe.text_encoder.dtype)  # the pipeline scales by init_noise_sigma
