"""The committed toy-world base (models/toyworld-base) and the script that trains it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from toyworld.base import (
    REPORT_NAME,
    BaseConfig,
    build_unet,
    colour_accuracy,
    encode_dataset,
    generate,
    held_out_prompts,
    images_to_tensor,
    object_weights,
    sample_timesteps,
    train_base,
)
from toyworld.split import held_out_scenes
from toyworld.text import build_text_encoder, build_tokenizer
from toyworld.vae import COLOUR_TO_LATENT
from toyworld.world import IMAGE_SIZE, RARE_TOKENS, VOCABULARY, caption, render, sample_scene

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "models" / "toyworld-base"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipeline = StableDiffusionPipeline.from_pretrained(BASE)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_committed_base_is_small_and_loads_as_a_stable_diffusion_pipeline(pipe):
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.vae_scale_factor == 1
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE
    tokenizer = pipe.tokenizer
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in VOCABULARY)
    report = json.loads((BASE / REPORT_NAME).read_text())
    stage1, stage2 = (json.loads((BASE / f"toyworld_stage{i}.json").read_text()) for i in (1, 2))
    assert not stage1["config"].get("resume_from")
    assert stage2["config"]["resume_from"] and report["config"]["resume_from"]
    assert (stage2["config"]["steps"], report["config"]["steps"]) == (5000, 1000)
    assert (report["config"]["lr"], report["config"]["high_noise_fraction"]) == (1e-3, 0.0)
    accuracy = report["held_out_accuracy"]
    # issue 13's targets on 128 held-out prompts (stage 3 reached 1.0, 0.953, 0.930,
    # 1.0); docs/toyworld.md has the numbers
    assert accuracy["both_colours"] >= 0.95 and accuracy["shape"] >= 0.90, accuracy
    assert accuracy["pattern"] >= 0.80 and accuracy["position"] >= 0.80, accuracy
    # issue 13: one script (scripts/train_toyworld_base.sh) in at most 100 minutes
    # wall on 2 threads on 2 cores, all three stages with their held-out evaluations
    seconds = sum(r["timings"]["train_s"] + r["timings"]["eval_s"]
                  for r in (stage1, stage2, report))
    assert seconds < 100 * 60


def test_vae_is_an_exact_colour_transform(pipe):
    rng = np.random.default_rng(0)
    images = images_to_tensor([render(sample_scene(rng)).image for _ in range(8)])
    noise = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    images = torch.cat([images, noise])  # (10, 3, 32, 32)
    with torch.no_grad():
        posterior = pipe.vae.encode(images).latent_dist
        decoded = pipe.vae.decode(posterior.mean).sample
    expected = torch.einsum("kc,bchw->bkhw", COLOUR_TO_LATENT, images)
    assert (posterior.mean - expected).abs().max() < 1e-5
    assert posterior.std.max() < 1e-4
    assert (decoded - images).abs().max() < 1e-5


def test_rare_tokens_keep_their_initial_embeddings(pipe, tmp_path):
    """The subject tokens are valid single tokens whose embeddings training never moved."""
    report = json.loads((BASE / REPORT_NAME).read_text())
    torch.manual_seed(report["config"]["seed"])
    initial = build_text_encoder(build_tokenizer(tmp_path))
    ids = pipe.tokenizer.convert_tokens_to_ids([t + "</w>" for t in RARE_TOKENS])
    assert pipe.tokenizer.unk_token_id not in ids
    trained = pipe.text_encoder.get_input_embeddings().weight.detach()
    drawn = initial.get_input_embeddings().weight.detach()
    assert torch.equal(trained[ids], drawn[ids])
    common = pipe.tokenizer.convert_tokens_to_ids(["red</w>", "star</w>"])
    assert not torch.equal(trained[common], drawn[common])


def test_base_draws_held_out_colour_pairs(pipe):
    """Caption colour pairs never seen in training, fixed seed: >= 90% both colours right,
    and issue 13's bars for shape, pattern and position (the committed base: 0.958, 0.875,
    1.0 on these 24)."""
    prompts = held_out_prompts(24, seed=7)
    images = generate(pipe, prompts, seed=3, num_inference_steps=20, guidance_scale=4.0)
    assert images[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    accuracy = colour_accuracy(images, prompts)
    assert accuracy["both_colours"] >= 0.9, accuracy
    assert accuracy["shape"] >= 0.9 and accuracy["position"] >= 0.8, accuracy
    assert accuracy["pattern"] >= 0.8, accuracy


def test_train_base_is_reproducible_and_saves_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny = replace(BaseConfig(), dataset_size=16, steps=3,
                   batch_size=4, warmup_steps=1, eval_images=2, eval_inference_steps=2,
                   threads=2, log_every=1000)  # the committed model's thread count
    first = train_base(tiny, tmp_path / "a", log=lambda _: None)
    train_base(tiny, tmp_path / "b", log=lambda _: None)
    assert first["config"]["seed"] == 0 and set(first["held_out_accuracy"]) >= {"both_colours"}
    for component in ("unet", "vae", "text_encoder"):
        files = sorted((tmp_path / "a" / component).glob("*.safetensors"))
        assert files and all(
            f.read_bytes() == (tmp_path / "b" / component / f.name).read_bytes() for f in files)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert loaded.vae.config.scaling_factor == pytest.approx(
        json.loads((tmp_path / "a" / "vae" / "config.json").read_text())["scaling_factor"])
    assert np.isfinite(first["final_loss"])


def test_resume_from_continues_a_saved_base_keeping_its_vae_and_tokenizer(tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny = replace(BaseConfig(), dataset_size=16, steps=2, batch_size=4, warmup_steps=1,
                   eval_images=2, eval_inference_steps=2, log_every=1000)
    train_base(tiny, tmp_path / "stage1", log=lambda _: None)
    stage2 = replace(tiny, resume_from=str(tmp_path / "stage1"), high_noise_fraction=0.5,
                     block_out_channels=(8, 8))  # ignored: the saved UNet is loaded
    report = train_base(stage2, tmp_path / "stage2", log=lambda _: None)
    assert report["config"]["resume_from"] == str(tmp_path / "stage1")
    first = StableDiffusionPipeline.from_pretrained(tmp_path / "stage1")
    second = StableDiffusionPipeline.from_pretrained(tmp_path / "stage2")
    assert second.unet.config.block_out_channels == first.unet.config.block_out_channels
    assert second.vae.config.scaling_factor == first.vae.config.scaling_factor
    for name in ("vae", "unet", "text_encoder"):
        old = getattr(first, name).state_dict()
        new = getattr(second, name).state_dict()
        same = all(torch.equal(old[k], new[k]) for k in old)
        assert same == (name == "vae"), name  # the VAE is kept, the rest trained on
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_train_base_cli_names_a_bad_resume_folder(tmp_path):
    from toyworld.train_base import main

    with pytest.raises(SystemExit, match=r"--resume-from .*nothing.*toyworld\.json"):
        main(["--out", str(tmp_path / "out"), "--resume-from", str(tmp_path / "nothing")])


def test_colour_accuracy_is_one_on_rendered_images_and_reads_patterns():
    scenes = held_out_scenes(40, seed=5)
    prompts = held_out_prompts(40, seed=5)
    assert [caption(s) for s in scenes] == prompts
    images = [render(scene).image for scene in scenes]
    accuracy = colour_accuracy(images, prompts)
    assert accuracy == {"background": 1.0, "object_colour": 1.0, "both_colours": 1.0,
                        "position": 1.0, "shape": 1.0, "pattern": 1.0, "images": 40}
    shuffled = colour_accuracy(images[1:] + images[:1], prompts)  # each image a wrong prompt
    assert shuffled["both_colours"] == 0.0
    assert shuffled["pattern"] < 0.8 and shuffled["position"] < 0.5


def test_build_unet_puts_cross_attention_on_the_coarsest_levels():
    unet = build_unet((16, 32, 64, 64, 64), attention_levels=4)
    kinds = [type(block).__name__ for block in unet.down_blocks]
    assert kinds == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 4
    assert unet(torch.randn(1, 4, IMAGE_SIZE, IMAGE_SIZE), 10,
                encoder_hidden_states=torch.randn(1, 24, 64)).sample.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet((16, 32, 64, 64), attention_levels=5)
    with pytest.raises(ValueError, match="divisible"):
        build_unet((16,) * 7, attention_levels=2)


def test_sample_timesteps_moves_the_chosen_fraction_to_high_noise():
    uniform = replace(BaseConfig(), batch_size=4000)
    plain = torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(3))
    # fraction 0 draws exactly what torch.randint draws (older bases reproduce)
    assert torch.equal(sample_timesteps(uniform, 1000, torch.Generator().manual_seed(3)), plain)
    high = replace(uniform, high_noise_fraction=0.25, high_noise_from=900)
    drawn = sample_timesteps(high, 1000, torch.Generator().manual_seed(3))
    assert drawn.min() >= 0 and drawn.max() <= 999 and drawn.dtype == torch.int64
    # 25% from [900, 1000) plus 10% of the uniform 75%: 0.325 of all at t >= 900
    assert float((drawn >= 900).float().mean()) == pytest.approx(0.325, abs=0.025)
    everything = sample_timesteps(replace(high, high_noise_fraction=1.0), 1000,
                                  torch.Generator().manual_seed(3))
    assert everything.min() >= 900


def test_object_weights_add_the_pattern_weight_on_patterned_objects_only():
    from toyworld.vae import build_vae

    scenes = [sample_scene(np.random.default_rng(0), pattern="plain"),
              sample_scene(np.random.default_rng(1), pattern="dotted")]
    _, _, masks = encode_dataset(build_vae(), scenes)
    assert masks.shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE) and masks.dtype == torch.bool
    objects = [torch.from_numpy(render(scene).object_mask) for scene in scenes]
    assert torch.equal(masks[0, 0], objects[0]) and not masks[0, 1].any()
    assert torch.equal(masks[1, 0], objects[1]) and torch.equal(masks[1, 1], objects[1])
    old = object_weights(masks, 4.0)  # pattern weight 0: the weights of earlier bases
    grown = torch.nn.functional.max_pool2d(masks[:, :1].float(), 3, stride=1, padding=1)
    assert torch.equal(old, 1.0 + 4.0 * grown)
    new = object_weights(masks, 4.0, pattern_weight=8.0)
    assert torch.equal(new[0], old[0])  # a plain object weighs as before
    assert set(new[1].unique().tolist()) == {1.0, 13.0}  # background 1, object 1 + 4 + 8
    assert torch.equal(new[1] > 1, old[1] > 1)
