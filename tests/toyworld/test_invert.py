"""Textual inversion of a subject's token (toyworld/invert.py) on the committed base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toyworld.compare import (
    CompareConfig,
    Method,
    load_base,
    run,
    subject_inversion,
    training_subject,
    with_unet,
)
from toyworld.invert import Inversion, invert_token, token_id
from toyworld.subjects import get_subject
from tuneqdm.data import prepare_data
from tuneqdm.train import evaluation_loss

BASE = Path(__file__).resolve().parents[2] / "models" / "toyworld-base"


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_base(BASE)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_inversion_learns_the_token_row_alone_and_lowers_the_loss(pipe):
    photos = training_subject(get_subject("checkered-star"))
    base_encoder, base_unet = _state(pipe.text_encoder), _state(pipe.unet)
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    inversion = invert_token(pipe, photos, steps=60, lr=5e-3, batch_size=4, seed=0)

    # the pipeline is untouched, bit for bit, and its UNet's flags are as they were
    assert all(torch.equal(v, base_encoder[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(v, base_unet[k]) for k, v in pipe.unet.state_dict().items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads
    # in the copy only the token's row of the input embedding moved
    row = token_id(pipe.tokenizer, "sks")
    assert inversion.token_id == row
    learnt = inversion.text_encoder.state_dict()
    table = inversion.text_encoder.get_input_embeddings().weight  # (vocab, D)
    [key] = [k for k, v in learnt.items() if v.data_ptr() == table.data_ptr()]
    changed = (learnt[key] != base_encoder[key]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [row]
    assert all(torch.equal(v, base_encoder[k]) for k, v in learnt.items() if k != key)
    # it started from the class noun's row ("star"), not the random one
    star = base_encoder[key][token_id(pipe.tokenizer, "star")]
    assert inversion.norm_before == pytest.approx(float(star.norm()))
    assert len(inversion.losses) == 60 and all(map(torch.isfinite, torch.tensor(inversion.losses)))
    # the deterministic denoising loss on the photos goes down with the learnt token
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    before = evaluation_loss(pipe.unet, pipe.scheduler, prepare_data(pipe, [photos], resolution))
    inverted = with_unet(pipe, pipe.unet, inversion.text_encoder)
    after = evaluation_loss(pipe.unet, pipe.scheduler,
                            prepare_data(inverted, [photos], resolution))
    assert after < before - 0.002, (before, after)


def test_inversion_refuses_what_it_cannot_learn(pipe):
    photos = training_subject(get_subject("checkered-star"))
    with pytest.raises(ValueError, match="steps=0; allowed: a positive number"):
        invert_token(pipe, photos, steps=0, lr=5e-3, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="single-token rare word"):
        token_id(pipe.tokenizer, "sks star")
    with pytest.raises(ValueError, match="invert_steps=-1; allowed"):
        CompareConfig(invert_steps=-1)


def test_a_run_with_inversion_leaves_the_shared_base_as_it_was(pipe):
    """compare.run inverts on a copy of the text encoder: the next run in the same
    worker starts from the base's token again."""
    base_encoder = _state(pipe.text_encoder)
    config = CompareConfig(images_per_prompt=1, steps=4, batch_size=2, full_batch_size=2,
                           invert_steps=4, prompts="validation")
    row = run(pipe, Method("full"), get_subject("striped-circle"), 0, config)
    assert 0.0 <= row["subject_fidelity"] <= 1.0
    assert all(torch.equal(v, base_encoder[k]) for k, v in pipe.text_encoder.state_dict().items())


def test_a_shared_inversion_gives_the_run_it_would_have_learnt(pipe):
    """The table learns each (subject, seed)'s inversion once, in one process, and hands
    its record to every fine-tuned row in others: the record rebuilds it bit for bit,
    and a run given it is the run that inverts for itself, number for number."""
    subject = get_subject("striped-circle")
    config = CompareConfig(images_per_prompt=1, steps=3, batch_size=2, invert_steps=3,
                           inference_steps=4, prompts="validation")
    inversion = subject_inversion(pipe, subject, 1, config)
    record = json.loads(json.dumps(inversion.to_record()))
    again = Inversion.from_record(pipe.text_encoder, record)
    learnt = inversion.text_encoder.state_dict()
    assert all(torch.equal(v, learnt[k]) for k, v in again.text_encoder.state_dict().items())
    assert (again.token_id, again.losses, again.seconds) == (
        inversion.token_id, inversion.losses, inversion.seconds)
    own = run(pipe, Method("lora"), subject, 1, config)
    shared = run(pipe, Method("lora"), subject, 1, config, inversion=again)
    timings = ("train_s", "invert_s")
    assert {k: v for k, v in shared.items() if k not in timings} == {
        k: v for k, v in own.items() if k not in timings}
    assert shared["invert_s"] == inversion.seconds > 0
    assert own["trainable"] == 28_672 + 64  # LoRA r=4 and the token's row


def test_runs_refuse_an_inversion_they_cannot_use(pipe):
    subject = get_subject("striped-circle")
    config = CompareConfig(images_per_prompt=1, steps=2, batch_size=2, invert_steps=2)
    inversion = subject_inversion(pipe, subject, 0, config)
    with pytest.raises(ValueError, match="an inversion was given to a run of words-n1-fp32"):
        run(pipe, Method("words"), subject, 0, config, inversion=inversion)
    with pytest.raises(ValueError, match="invert_steps=0; allowed: only fine-tuned"):
        run(pipe, Method("lora"), subject, 0, CompareConfig(invert_steps=0),
            inversion=inversion)
    assert subject_inversion(pipe, subject, 0, CompareConfig(invert_steps=0)) is None
    record = {**inversion.to_record(), "row": [0.0] * 3}
    with pytest.raises(ValueError, match=r"row has shape \(3,\); the text encoder's rows have"):
        Inversion.from_record(pipe.text_encoder, record)
