"""Textual inversion of a subject's token: the first step of pivotal tuning.

The rare token ("sks") starts at its random initialisation (world.RARE_TOKENS), so
fine-tuning alone has to bind a meaningless embedding to the subject through the UNet's
weights. Inversion first learns the token's input embedding, with the float base UNet
and every other weight frozen, on the same denoising loss and photos (Gal et al.,
arXiv 2208.01618); fine-tuning then starts from a token that already points at the
subject. Started from the class noun's embedding ("star"), as textual inversion starts
from a coarse descriptor word. docs/toyworld.md "Token inversion" has what it does on
the validation prompts.

`invert_token` never changes the pipeline it is given: it returns a copy of the text
encoder in which only the token's row of the input embedding differs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Inversion:
    """What `invert_token` learnt: `text_encoder` (a copy; only row `token_id` of its
    input embedding (vocab, D) differs from the base's), the loss per step, the row's
    norm before and after, and the seconds its steps took."""

    text_encoder: torch.nn.Module
    token_id: int
    losses: list[float]
    norm_before: float
    norm_after: float
    seconds: float

    @property
    def numbers(self) -> int:
        """Trained numbers: the row's D."""
        return self.text_encoder.get_input_embeddings().weight.shape[1]

    def to_record(self) -> dict:
        """Plain numbers (picklable, JSON-able): the learnt row (D,) as a list, and
        the rest; `from_record` rebuilds the inversion from them on any process."""
        row = self.text_encoder.get_input_embeddings().weight[self.token_id]
        return {"token_id": self.token_id, "row": row.tolist(), "losses": self.losses,
                "norm_before": self.norm_before, "norm_after": self.norm_after,
                "seconds": self.seconds}

    @classmethod
    def from_record(cls, text_encoder: torch.nn.Module, record: dict) -> Inversion:
        """The inversion `record` (to_record) describes, on a copy of `text_encoder`
        (the base's, which is not changed) whose row `record["token_id"]` is set."""
        encoder = copy.deepcopy(text_encoder).requires_grad_(False)
        weight = encoder.get_input_embeddings().weight  # (vocab, D)
        row = torch.tensor(record["row"], dtype=weight.dtype)
        if row.shape != weight.shape[1:]:
            raise ValueError(f"inversion record's row has shape {tuple(row.shape)}; the "
                             f"text encoder's rows have {tuple(weight.shape[1:])}")
        with torch.no_grad():
            weight[record["token_id"]] = row
        return cls(encoder, record["token_id"], list(record["losses"]),
                   record["norm_before"], record["norm_after"], record["seconds"])


def token_id(tokenizer, token: str) -> int:
    """The single tokenizer id of `token`; ValueError if it is several tokens."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"token {token!r} is {len(ids)} tokens of the tokenizer; "
                         "textual inversion needs a single-token rare word (e.g. 'sks')")
    return ids[0]


def invert_token(pipe, subject, steps: int, lr: float, batch_size: int, seed: int,
                 timestep_sampling: str = "stratified", init_from_class: bool = True
                 ) -> Inversion:
    """Learn `subject.token`'s input embedding on `subject`'s photos and captions
    (tuneqdm.data.Subject) against `pipe`'s UNet, frozen.

    Each step: `batch_size` photos drawn with replacement, latents sampled from their
    VAE posterior (B, 4, h, w), timesteps by `timestep_sampling`
    (tuneqdm.batches.sample_timesteps), the scheduler's target (noise or velocity),
    MSE, AdamW (no weight decay) on the one row (D,) at `lr`. `pipe.text_encoder`'s
    weights are not touched (the copy is trained).
    """
    from tuneqdm.data import prepare_data

    if steps <= 0:
        raise ValueError(f"steps={steps}; allowed: a positive number of inversion steps")
    tokenizer, unet, scheduler = pipe.tokenizer, pipe.unet, pipe.scheduler
    encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
    row = token_id(tokenizer, subject.token)
    weight = encoder.get_input_embeddings().weight  # (vocab, D)
    with torch.no_grad():
        if init_from_class:
            weight[row] = weight[token_id(tokenizer, subject.class_noun)]
    norm_before = float(weight[row].norm())
    resolution = unet.config.sample_size * pipe.vae_scale_factor
    data = prepare_data(pipe, [subject], resolution)  # latents, (M,) prompt indices
    ids = tokenizer(subject.image_prompts, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    weight.requires_grad_(True)
    # AdamW without weight decay leaves rows whose gradient is always zero exactly as
    # they were, so masking the gradient to the token's row trains that row alone
    optimiser = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)
    only_row = torch.zeros(weight.shape[0], 1)
    only_row[row] = 1.0
    frozen = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    try:
        for _ in range(steps):
            loss = _batch_loss(unet, scheduler, encoder, ids, data, batch_size, generator,
                               timestep_sampling)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            weight.grad *= only_row
            optimiser.step()
            losses.append(loss.item())
    finally:
        weight.requires_grad_(False)
        for parameter, flag in zip(unet.parameters(), frozen, strict=True):
            parameter.requires_grad_(flag)
    return Inversion(encoder, row, losses, norm_before, float(weight[row].norm()),
                     time.perf_counter() - start)


def _batch_loss(unet, scheduler, encoder, ids: torch.Tensor, data, batch_size: int,
                generator: torch.Generator, timestep_sampling: str) -> torch.Tensor:
    """The denoising loss of `batch_size` photos drawn with replacement: latents from
    their VAE posterior (B, 4, h, w), prompts `ids` (P, L) through `encoder`."""
    from tuneqdm.batches import sample_timesteps

    index = torch.randint(len(data.prompt_of), (batch_size,), generator=generator)
    mean, std = data.latent_mean[index], data.latent_std[index]
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = sample_timesteps(batch_size, scheduler.config.num_train_timesteps,
                                 generator, timestep_sampling)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = (scheduler.get_velocity(latents, noise, timesteps)
              if scheduler.config.prediction_type == "v_prediction" else noise)
    hidden = encoder(ids[data.prompt_of[index]])[0]  # (B, L, D)
    return F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, target)


__all__ = ["Inversion", "invert_token", "token_id"]
