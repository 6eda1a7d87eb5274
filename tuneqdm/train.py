"""DreamBooth-style fine-tuning of quantization scales (TuneQDM / PEQA), with
full-precision and LoRA fine-tuning through the same loop as references.

The loop only ever calls the UNet: latents and prompt embeddings are cached first
(data.py). Each step draws instance images (and, with prior preservation, as many
class images), per-sample timesteps t in [0, T) (independent or stratified; both in
batches.py) and noise, and minimises the MSE to the noise (epsilon-prediction) or to
the velocity (v-prediction, when the scheduler says so). Per-sample timesteps select
per-sample experts through the UNet's router, so each expert only learns from its own
timestep interval (TuneQDM part 2).

Learning rates (why two): s_out starts at s0 (about 1e-3 at 8 bits, 1e-2 at 4 bits)
and s_in at 1, and Adam's step is about lr in absolute size whatever the gradient,
so one rate moves s_out relatively ~1/s0 times faster than s_in (the published
implementation's s_in barely moves). We use two AdamW groups: lr_scale_out (the
paper's 3e-6) and lr_scale_in, which defaults to lr_scale_out / mean(s0), giving both
vectors the same relative step. Weight decay is 0: decaying scales to 0 is wrong.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import TIMESTEP_SAMPLING, sample_instances, sample_timesteps
from .data import Subject, TrainingData, TrainingError, class_images, prepare_data
from .device import model_device_dtype, training_autocast
from .model import enable_timestep_experts, quantized_layers, reset_scales, scale_parameters
from .scaleset import ScaleSet
from .trainstate import TrainState

METHODS = ("scales", "full", "lora")
DEFAULT_LR = {"scales": 3e-6, "full": 5e-6, "lora": 1e-4}
OPTIMIZERS = ("adamw", "adamw8bit")

__all__ = ["Resumption", "Subject", "TrainConfig", "TrainResult", "TrainState", "TrainingError",
           "finetune"]


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings; defaults follow the paper (batch 1, 400 steps, constant lr).

    method: "scales" trains the quantized UNet's scales (PEQA or TuneQDM, per its
        QuantConfig); "full" all UNet weights (float UNet); "lora" LoRA adapters (peft)
        on the attention projections of a float UNet.
    lr: learning rate for "full" / "lora" (None: 5e-6 / 1e-4).
    lr_scale_out / lr_scale_in: the two AdamW groups of "scales" (see module doc).
    resolution: training image size (None: the UNet's sample size times the VAE factor).
    prior_preservation: add class images (from class_images_dir, else generated once by
        the pipeline itself and cached in class_images_cache) with prior_loss_weight.
    optimizer: "adamw" (torch) or "adamw8bit" (bitsandbytes, 8-bit moments).
    timestep_sampling: "uniform" draws each sample's t ~ U{0..T-1} independently (the
        paper's); "stratified" splits [0, T) into B equal strata, draws one t in each
        and shuffles them over the batch (`sample_timesteps`): every t is still
        uniform, but a batch of B >= N covers every expert's interval at every step.
    """

    method: str = "scales"
    steps: int = 400
    batch_size: int = 1
    lr: float | None = None
    lr_scale_out: float = DEFAULT_LR["scales"]
    lr_scale_in: float | None = None
    lora_rank: int = 4
    resolution: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    class_images_dir: str | None = None
    class_images_cache: str | None = None
    num_class_images: int = 8
    class_image_steps: int = 25
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    timestep_sampling: str = "uniform"

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, "method", f"one of {METHODS}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.timestep_sampling in TIMESTEP_SAMPLING, "timestep_sampling",
             f"one of {TIMESTEP_SAMPLING}"),
            (self.steps >= 1, "steps", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr is None or self.lr > 0, "lr", "> 0"),
            (self.lr_scale_out > 0, "lr_scale_out", "> 0"),
            (self.lr_scale_in is None or self.lr_scale_in > 0, "lr_scale_in", "> 0"),
            (self.lora_rank >= 1, "lora_rank", ">= 1"),
            (
                self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
                "resolution",
                "a multiple of 8",
            ),
            (self.max_grad_norm > 0, "max_grad_norm", "> 0"),
            (self.num_class_images >= 1, "num_class_images", ">= 1"),
            (self.prior_loss_weight >= 0, "prior_loss_weight", ">= 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(
                    f"TrainConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """losses: per-step training loss; scale_set: the trained scales (method "scales")."""

    losses: list[float]
    seconds: float
    scale_set: ScaleSet | None = None
    trainable_numbers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(sum(tail) / len(tail))


@dataclass(frozen=True)
class Resumption:
    """Stop-and-go hooks of a training run.

    state: a TrainState to go on from (its step, scales, optimiser and generator);
    save: called with the run's TrainState after every `every` steps (not after the
    last one; every 0: never), e.g. to checkpoint it to storage.
    """

    state: TrainState | None = None
    save: Callable[[TrainState], None] | None = None
    every: int = 0


def finetune(
    pipe,
    subjects: list[Subject],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    resumption: Resumption | None = None,
    autocast: torch.dtype | str | None = "auto",
) -> TrainResult:
    """Fine-tune `pipe.unet` on `subjects` (trained jointly when there are several).

    For method "scales" the UNet must be quantized; its scales are reset to (s0, 1)
    first, so one loaded base can train many subjects in turn. Returns the losses
    and, for "scales", a ScaleSet with the subjects' ids, tokens and class nouns.
    `resumption` goes on from a saved state and saves it every K steps (Resumption);
    the result's extra["resumed_from_step"] says where it went on from. autocast: see
    `train_unet`.
    """
    if not subjects:
        raise TrainingError("finetune needs at least one subject")
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    priors = class_images(pipe, subjects, config, resolution)
    data = prepare_data(pipe, subjects, resolution, priors)
    unet = pipe.unet
    groups = _parameter_groups(unet, config)
    result = train_unet(unet, pipe.scheduler, data, config, groups, on_step,
                        resumption=resumption, autocast=autocast)
    if config.method == "scales":
        result.scale_set = ScaleSet.from_model(
            unet,
            subjects=data.subjects,
            training=config.to_dict(),
            final_loss=result.final_loss,
        )
    return result


def train_unet(
    unet: nn.Module,
    scheduler,
    data: TrainingData,
    config: TrainConfig,
    groups: list[dict[str, Any]],
    on_step: Callable[[int, float], None] | None = None,
    resumption: Resumption | None = None,
    autocast: torch.dtype | str | None = "auto",
) -> TrainResult:
    """The loop: AdamW over `groups`, constant lr, gradient clipping, seeded; going on
    from `resumption.state` and saving through `resumption.save` (Resumption).

    autocast: the forward's autocast dtype; "auto" is bf16 for an fp32 model on CUDA
    and none elsewhere (tuneqdm.device.training_autocast). Parameters, scales and
    optimiser state stay float32; the loss is computed in float32.
    """
    resumption = resumption or Resumption()
    device, compute_dtype = model_device_dtype(unet)
    if autocast == "auto":
        autocast = training_autocast(device, compute_dtype)
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, config.optimizer)
    first, losses = _resume(resumption, config, params, optimizer, generator)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    start = time.perf_counter()
    try:
        for step in range(first, config.steps):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = training_loss(unet, scheduler, data, config, generator)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm, foreach=True)
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
            done = step + 1
            if resumption.save and resumption.every and done % resumption.every == 0 \
                    and done < config.steps:
                resumption.save(TrainState.capture(done, params, optimizer, generator, losses))
    finally:
        unet.eval()
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        for p in params:
            p.grad = None
    return TrainResult(
        losses=losses,
        seconds=time.perf_counter() - start,
        trainable_numbers=sum(p.numel() for p in params),
        extra={"resumed_from_step": first},
    )


def _resume(resumption: Resumption, config: TrainConfig, params: list[nn.Parameter],
            optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> tuple[int, list[float]]:
    """(first step, losses so far): restores a saved state into the parameters, the
    optimiser and the generator, or (0, []) without one."""
    state = resumption.state
    if state is None:
        return 0, []
    if state.step >= config.steps:
        raise TrainingError(f"train state at step {state.step} is past the run's "
                            f"{config.steps} steps")
    try:
        state.restore(params, optimizer, generator)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return state.step, list(state.losses)


def make_optimizer(groups: list[dict[str, Any]], name: str) -> torch.optim.Optimizer:
    """AdamW without weight decay; "adamw8bit" keeps Adam's moments in 8 bits
    (bitsandbytes), which matters for full fine-tuning (two fp32 moments per weight
    would otherwise double the model's memory) and is harmless for small scale
    vectors (bitsandbytes keeps tensors under 4096 numbers in 32 bits). torch's AdamW is
    multi-tensor (foreach) on every device, not only CUDA: 0.56-0.61x its per-tensor time on
    the CPU, bit-equal (docs/benchmarks.md "The optimiser step")."""
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=0.0)
    return torch.optim.AdamW(groups, weight_decay=0.0, foreach=True)


def training_loss(
    unet: nn.Module, scheduler, data: TrainingData, config: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """One batch's loss: instance MSE + prior_loss_weight * class MSE."""
    instance = sample_instances(data, config.batch_size, generator)
    batch = [instance]
    if config.prior_preservation and len(data.class_indices):
        pick = torch.randint(len(data.class_indices), (config.batch_size,), generator=generator)
        batch.append(data.class_indices[pick])
    index = torch.cat(batch)  # (B,) with B = batch_size or 2 * batch_size
    prediction, target = _predict(unet, scheduler, data, index, generator,
                                  sampling=config.timestep_sampling)
    loss = F.mse_loss(prediction[: len(instance)], target[: len(instance)])
    if len(batch) > 1:
        loss = loss + config.prior_loss_weight * F.mse_loss(
            prediction[len(instance) :], target[len(instance) :]
        )
    return loss


@torch.no_grad()
def evaluation_loss(
    unet: nn.Module, scheduler, data: TrainingData, num_timesteps: int = 8, seed: int = 1234
) -> float:
    """Deterministic denoising loss over the instance images: fixed noise, and
    timesteps spread evenly over [0, T). A stable measure for "the loss went down"."""
    generator = torch.Generator().manual_seed(seed)
    total_steps = scheduler.config.num_train_timesteps
    instance = torch.nonzero(~data.is_class).flatten()
    losses = []
    for k in range(num_timesteps):
        t = int((k + 0.5) * total_steps / num_timesteps)
        timesteps = torch.full((len(instance),), t, dtype=torch.long)
        prediction, target = _predict(unet, scheduler, data, instance, generator, timesteps)
        losses.append(F.mse_loss(prediction, target).item())
    return sum(losses) / len(losses)


def _predict(
    unet,
    scheduler,
    data: TrainingData,
    index: torch.Tensor,
    generator: torch.Generator,
    timesteps: torch.Tensor | None = None,
    sampling: str = "uniform",
):
    """UNet prediction and its target for images `index`: ((B, 4, h, w), (B, 4, h, w)).
    Timesteps, unless given, are drawn after the noise (`sample_timesteps`)."""
    mean, std = data.latent_mean[index], data.latent_std[index]
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    if timesteps is None:
        timesteps = sample_timesteps(
            len(index), scheduler.config.num_train_timesteps, generator, sampling
        )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    device, dtype = model_device_dtype(unet)
    embeddings = data.embeddings[data.prompt_of[index]]  # (B, L, D)
    prediction = unet(
        noisy.to(device, dtype),
        timesteps.to(device),
        encoder_hidden_states=embeddings.to(device, dtype),
    ).sample
    return prediction.float(), target.to(prediction.device)


def _parameter_groups(unet: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups for the method; freezes everything else."""
    if config.method == "scales":
        if not quantized_layers(unet):
            raise TrainingError("method 'scales' needs a quantized UNet (tuneqdm.quantize_)")
        reset_scales(unet)
        enable_timestep_experts(unet)
        outs, ins = scale_parameters(unet)
        groups = [{"params": outs, "lr": config.lr_scale_out}]
        if ins:
            groups.append(
                {
                    "params": ins,
                    "lr": config.lr_scale_in or default_lr_scale_in(unet, config.lr_scale_out),
                }
            )
        return groups
    if quantized_layers(unet):
        raise TrainingError(f"method {config.method!r} needs a float UNet, not a quantized one")
    unet.requires_grad_(False)
    lr = config.lr or DEFAULT_LR[config.method]
    if config.method == "full":
        unet.requires_grad_(True)
        return [{"params": [p for p in unet.parameters()], "lr": lr}]
    from peft import LoraConfig

    if not getattr(unet, "peft_config", None):
        # peft draws the initial LoRA weights from torch's global generator: seed it
        # from the run's seed (and put it back after), so that a run is a function of
        # its config, not of whatever the process drew before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                )
            )
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return [{"params": params, "lr": lr}]


def mean_scale0(unet: nn.Module) -> float:
    """Mean initial output scale s0 over every output channel of a quantized model."""
    scale0 = torch.cat([layer.scale0.float() for layer in quantized_layers(unet).values()])
    return float(scale0.mean())


def default_lr_scale_in(unet: nn.Module, lr_scale_out: float) -> float:
    """lr_scale_out / mean(s0): the same relative step for s_in (init 1) as for s_out."""
    return lr_scale_out / max(mean_scale0(unet), 1e-12)
