"""What one training step draws: its instance images and its timesteps.

`sample_instances` balances subjects (a subject uniformly, then one of its images);
`sample_timesteps` draws each sample's t in [0, T), independently (the paper's) or one
per stratum of [0, T) (docs/design.md §1, "timestep experts"). Both take the run's
generator, so a seed fixes the whole batch sequence.
"""

from __future__ import annotations

import torch

from .data import TrainingData

TIMESTEP_SAMPLING = ("uniform", "stratified")


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, how: str = "uniform"
) -> torch.Tensor:
    """(batch,) int64 training timesteps in [0, T).

    "uniform": independent draws. "stratified": t_i = floor((k_i + u_i) T / B) with
    u_i ~ U[0, 1) and k a random permutation of 0..B-1, so each t_i is still uniform
    on [0, T) but the batch holds one t per stratum (the low-discrepancy sampler of
    Kingma et al., Variational Diffusion Models, 2021). With B a multiple of N every
    expert interval gets B / N samples per step instead of a binomial share.
    """
    if how == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    strata = torch.randperm(batch, generator=generator).double()
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    t = torch.floor((strata + u) * num_train_timesteps / batch).long()
    return t.clamp(0, num_train_timesteps - 1)


def sample_instances(
    data: TrainingData, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Balanced over subjects: pick a subject uniformly, then one of its images."""
    per_subject = data.instance_indices
    subject = torch.randint(len(per_subject), (batch_size,), generator=generator)
    picks = []
    for s in subject.tolist():
        images = per_subject[s]
        picks.append(images[torch.randint(len(images), (1,), generator=generator)])
    return torch.cat(picks)
