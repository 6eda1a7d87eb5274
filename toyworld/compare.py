"""The TuneQDM paper's comparison (arXiv 2401.04339, table 1) on the toy world.

One *run* = one method, one subject, one seed: fine-tune the base's UNet on the
subject's 5 images, each with its caption ("a sks star on a blue floor, top left";
CompareConfig.captioned=False: the instance prompt "a sks star" for all), then
generate its 4 evaluation prompts (contexts none of its images show) and score every
image against the renderer's ground truth (metrics.py):

- subject fidelity: `subject_fidelity(image, subject).score`, the mean of colour
  (fraction of object pixels in the subject's colour), shape (1 if the subject's shape
  fits the object best) and pattern (IoU of the shaded pixels with the subject's
  pattern, best phase);
- prompt fidelity: the fraction of what the prompt asks beyond the subject that the
  image shows: its background colour and its position (the 3x3 cell), each 0 or 1.

Methods: no fine-tuning (the float base), the base told the subject in words instead
of its token ("a purple checkered star on ...": what it draws when told, a reference
for what fine-tuning adds), float and quantized with s0 scales (what quantization
alone costs before any fine-tuning),
full-precision DreamBooth (all UNet weights), LoRA r=4 on the attention projections,
PEQA (s_out) and TuneQDM (s_out, s_in, N experts), at 8, 4 and 3 bits. Scale methods
use one relative learning rate: lr_scale_out = rel_lr * mean(s0), so every bit width
takes the same relative steps (s0 grows ~2x per bit removed); s_in gets the library's
default, the same relative step.

The rows (`Method`, `paper_methods`) and their UNets live in toyworld/methods.py and
are re-exported here. `benchmarks/toyworld_table.py` runs the grid in parallel and
writes the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .evaluate import score_images
from .invert import invert_token
from .methods import (
    FLOAT_METHODS,
    RECIPES,
    SCALE_METHODS,
    UNTUNED_METHODS,
    Method,
    cached_method_unet,
    method_unet,
    paper_methods,
)
from .subjects import Subject, subject_contexts, tuning_contexts, validation_split
from .world import caption

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROMPT_SETS = ("evaluation", "tuning", "validation")


@dataclass(frozen=True)
class CompareConfig:
    """Fine-tuning and evaluation settings shared by every run."""

    # Chosen on the tuning prompts (subjects.tuning_contexts) and, since session 21,
    # the validation prompts, never the evaluation ones (docs/toyworld.md "Recipe" has
    # every sweep: captions, rates, guidance; lr_full 2e-4 since the session-23 base,
    # where 3e-4 collapsed one fold).
    steps: int = 120
    batch_size: int = 4
    # full fine-tuning's batch under the fast recipe: 8, chosen on the validation
    # prompts (session 25: +0.020, p = 0.004; level on the evaluation prompts), so the
    # reference sees twice the other rows' samples; memory_config measures it at
    # batch_size (docs/toyworld.md "Full fine-tuning's batch").
    full_batch_size: int = 8
    rel_lr: float = 1e-2  # scale methods: lr_scale_out = rel_lr * mean(s0)
    lr_full: float = 2e-4
    lr_lora: float = 3e-3
    images_per_prompt: int = 2
    inference_steps: int = 20
    guidance_scale: float = 2.0
    paper_steps: int = 400  # the paper's recipe (Method.recipe == "paper")
    paper_batch_size: int = 1
    # how the quantized rows round (tuneqdm.QuantConfig.rounding): "nearest", the
    # paper's min/max grid; "mse", a per-channel clipping search; "gptq", the same grid
    # with integers chosen by GPTQ from the base's own training data (calibrate.py;
    # chosen on the tuning prompts, docs/toyworld.md "4 bits")
    rounding: str = "gptq"
    # UNet layers the quantized rows leave in float (neither quantized nor trained), by
    # name or shell pattern: ("conv_in", "conv_out"), the first and last layers, which
    # low-bit diffusion work usually keeps in higher precision (Q-Diffusion), or
    # ("*resnets*",). Empty: every Linear and Conv2d is quantized.
    keep_float: tuple[str, ...] = ()
    # which prompts runs generate and score: "evaluation" (what the table reports),
    # "tuning" (subjects.tuning_contexts: what recipes are chosen on) or "validation"
    # (subjects.validation_split: one photo's background held out of training, fold =
    # the run's seed; sees what the tuning prompts cannot, a subject tied to its
    # photos' backgrounds)
    prompts: str = "evaluation"
    # train each photo on its caption (examples/subjects/<id>/<n>.txt: "a sks star on a
    # blue floor, top left") rather than the instance prompt alone
    captioned: bool = True
    # keep the quantized UNet's centred weights expanded in fp32 while it trains and
    # generates (tuneqdm.inference.cache_expanded_weights): 6.3 MiB, a quarter of a
    # scale method's training time, numbers moved by float rounding only; the
    # peak-memory column is measured without it (the product's lean default)
    cache_weights: bool = True
    # how training draws timesteps (tuneqdm.batches.sample_timesteps): "uniform" (the
    # paper's) or "stratified" (one t per stratum of [0, T), so a batch of 4 feeds each
    # of N=4 experts at every step; chosen on the tuning prompts, session 19)
    timestep_sampling: str = "stratified"
    # > 0: before fine-tuning, learn the token's embedding for this many steps of
    # batch_size at lr_invert, on the float base (invert.py; pivotal tuning). The
    # subject then also carries that row: its numbers count in trainable and bytes.
    # 200 at 5e-3, chosen on the validation prompts (session 26: full fine-tuning
    # +0.012, p = 0.004; TuneQDM N=4 W4 +0.047, p = 0.008; docs/toyworld.md).
    invert_steps: int = 200
    lr_invert: float = 5e-3

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_SETS:
            raise ValueError(f"CompareConfig.prompts={self.prompts!r}; allowed: "
                             f"{', '.join(PROMPT_SETS)}")
        if self.invert_steps < 0:
            raise ValueError(f"CompareConfig.invert_steps={self.invert_steps}; allowed: 0 "
                             "(no inversion) or a positive number of steps")

    def to_dict(self) -> dict:
        return asdict(self)


def load_base(path: str | Path):
    """The float toy-world pipeline (StableDiffusionPipeline.from_pretrained)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_unet(pipe, unet, text_encoder=None):
    """A pipeline sharing `pipe`'s components except the UNet (and the text encoder,
    when one is given)."""
    parts = {"unet": unet, **({} if text_encoder is None else {"text_encoder": text_encoder})}
    tuned = type(pipe)(**{**pipe.components, **parts}, requires_safety_checker=False)
    tuned.set_progress_bar_config(disable=True)
    return tuned


def training_subject(subject: Subject, examples: Path = EXAMPLES, captioned: bool = True,
                     keep: list[int] | None = None):
    """The subject as tuneqdm's Subject, its images read from examples/subjects/<id>,
    with their captions (<n>.txt beside them) unless `captioned` is False (then every
    image has the instance prompt, "a sks star"). `keep`: indices of the photos to
    train on (default: all)."""
    from tuneqdm.data import Subject as TrainSubject
    from tuneqdm.data import load_captions, load_image_folder

    folder = examples / "subjects" / subject.subject_id
    images = load_image_folder(folder)
    captions = load_captions(folder) if captioned else None
    if keep is not None:
        images = [images[i] for i in keep]
        captions = None if captions is None else [captions[i] for i in keep]
    return TrainSubject(subject.subject_id, images, subject.class_noun, token=subject.token,
                        prompt="a {token} {class_noun}", captions=captions)


def train_config(method: Method, unet: torch.nn.Module, config: CompareConfig, seed: int):
    from tuneqdm.train import TrainConfig, mean_scale0

    common = {"steps": config.steps, "batch_size": config.batch_size, "seed": seed,
              "timestep_sampling": config.timestep_sampling}
    if method.recipe == "paper":
        common.update(steps=config.paper_steps, batch_size=config.paper_batch_size)
    if method.name == "full":
        if method.recipe == "fast":
            common.update(batch_size=config.full_batch_size)
        return TrainConfig(method="full", lr=config.lr_full, **common)
    if method.name == "lora":
        return TrainConfig(method="lora", lr=config.lr_lora, **common)
    return TrainConfig(method="scales", lr_scale_out=config.rel_lr * mean_scale0(unet),
                       **common)


def memory_config(config: CompareConfig) -> CompareConfig:
    """`config` with full fine-tuning at the other rows' batch: peak training memory
    is compared at one batch size, so its column measures the methods, not the batch."""
    return replace(config, full_batch_size=config.batch_size)


def run_prompts(method: Method, subject: Subject, prompts: str = "evaluation",
                seed: int = 0) -> list[str]:
    """The prompts a run generates: the subject's evaluation (or tuning, or validation
    fold `seed`) contexts, the subject named by its token, or told in words for "words"
    ("a purple checkered star on a orange background, top" for "a sks star on ...")."""
    if prompts == "evaluation":
        scenes = subject_contexts(subject)[1]
    elif prompts == "tuning":
        scenes = tuning_contexts(subject)
    else:
        scenes = validation_split(subject, fold=seed)[1]
    token = None if method.name == "words" else subject.token
    return [caption(scene, token=token) for scene in scenes]


def personal_bytes(method: Method, unet: torch.nn.Module, result) -> int:
    """Bytes a subject adds on top of the shared base: its scale set, LoRA weights
    (fp32) or, for full fine-tuning, a whole fp32 UNet."""
    if result is None:
        return 0
    if result.scale_set is not None:
        return len(result.scale_set.to_bytes())
    if method.name == "lora":
        return 4 * sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    return 4 * sum(p.numel() for p in unet.parameters())


def subject_inversion(pipe, subject: Subject, seed: int, config: CompareConfig,
                      examples: Path = EXAMPLES):
    """The token inversion (invert.Inversion) a fine-tuned run of (subject, seed)
    starts from, or None when config.invert_steps is 0. It depends on no method (the
    float base, the run's photos, `seed`), so a grid learns it once per (subject, seed)
    and hands it to every fine-tuned row (benchmarks/toyworld_table.py)."""
    if not config.invert_steps:
        return None
    return invert_token(pipe, _run_photos(subject, seed, config, examples),
                        config.invert_steps, config.lr_invert, config.batch_size, seed,
                        config.timestep_sampling)


def _run_photos(subject: Subject, seed: int, config: CompareConfig, examples: Path):
    """The photos a run trains on: all, or on validation prompts all but fold `seed`'s."""
    keep = validation_split(subject, fold=seed)[0] if config.prompts == "validation" else None
    return training_subject(subject, examples, config.captioned, keep)


def run(pipe, method: Method, subject: Subject, seed: int, config: CompareConfig,
        examples: Path = EXAMPLES, keep_images: bool = False,
        prompts: list[str] | None = None, inversion=None) -> dict:
    """Fine-tune (unless "none" or "words"; from the token's `inversion`, or one
    learnt here, if config.invert_steps), generate config.prompts' prompts
    (run_prompts; validation: fold `seed`, trained without the left-out photo) or the
    `prompts` given, score. Returns a row: means over the images of subject fidelity
    (colour, shape, pattern) and prompt fidelity (background, position), trainable
    numbers, per-subject bytes, training seconds (inversion included; its own too)
    and the loss before/after."""
    from tuneqdm.generate import generate
    from tuneqdm.train import finetune

    trains = method.name not in UNTUNED_METHODS
    if inversion is not None and not (trains and config.invert_steps):
        raise ValueError(f"an inversion was given to a run of {method.key} with "
                         f"invert_steps={config.invert_steps}; allowed: only fine-tuned "
                         "methods, with invert_steps > 0")
    hessians = None
    if config.rounding == "gptq" and method.bits is not None:
        from .calibrate import calibration_hessians

        hessians = calibration_hessians(pipe)
    unet = cached_method_unet(pipe.unet, method, config.rounding, config.keep_float,
                              hessians)
    if config.cache_weights and method.bits is not None:
        from tuneqdm.inference import cache_expanded_weights

        cache_expanded_weights(unet)
    tuned = with_unet(pipe, unet)
    result = None
    if trains:
        inversion = inversion or subject_inversion(pipe, subject, seed, config, examples)
        if inversion is not None:
            tuned = with_unet(pipe, unet, inversion.text_encoder)
        result = finetune(tuned, [_run_photos(subject, seed, config, examples)],
                          train_config(method, unet, config, seed))
    token_numbers = inversion.numbers if inversion is not None else 0
    prompts = prompts or run_prompts(method, subject, config.prompts, seed)
    images = generate(tuned, prompts, None if result is None else result.scale_set,
                      seed=10_000 * seed, num_inference_steps=config.inference_steps,
                      guidance_scale=config.guidance_scale,
                      num_images_per_prompt=config.images_per_prompt)
    asked = [p for p in prompts for _ in range(config.images_per_prompt)]
    row = {"method": method.key, "label": method.label, "subject": subject.subject_id,
           "seed": seed, **score_images(images, asked, subject),
           "trainable": token_numbers + (0 if result is None else result.trainable_numbers),
           "personal_bytes": 4 * token_numbers + personal_bytes(method, unet, result),
           "invert_s": 0.0 if inversion is None else inversion.seconds,
           "train_s": (0.0 if result is None else result.seconds)
           + (0.0 if inversion is None else inversion.seconds),
           "loss_first": None if result is None else float(np.mean(result.losses[:10])),
           "loss_last": None if result is None else result.final_loss}
    if keep_images:
        row["images"] = [np.asarray(image) for image in images]
    return row


__all__ = ["FLOAT_METHODS", "RECIPES", "SCALE_METHODS", "UNTUNED_METHODS", "CompareConfig",
           "Method", "cached_method_unet", "load_base", "memory_config", "method_unet",
           "paper_methods", "run", "subject_inversion"]
