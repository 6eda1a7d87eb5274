"""Fine-tuning: loss goes down, methods rank as expected, runs are reproducible."""

from __future__ import annotations

import pytest
import torch

from tuneqdm import QuantConfig, get_router, quantized_layers
from tuneqdm.base import load_float_pipeline, load_quantized_pipeline
from tuneqdm.batches import sample_timesteps
from tuneqdm.data import Subject, prepare_data
from tuneqdm.experts import expert_index
from tuneqdm.train import (
    TrainConfig,
    TrainingError,
    evaluation_loss,
    finetune,
    training_loss,
)

FAST = {"steps": 40, "batch_size": 2, "lr_scale_out": 1e-3, "resolution": 16}


@pytest.fixture
def dog(dog_images):
    return Subject("dog", dog_images, "dog")


def _eval(pipe, subjects):
    data = prepare_data(pipe, subjects, 16)
    return evaluation_loss(pipe.unet, pipe.scheduler, data)


@pytest.mark.parametrize(("method", "margin"), [("tuneqdm", 0.75), ("peqa", 0.9)])
def test_loss_drops_below_the_untuned_quantized_model(tiny_base_dir, dog, method, margin):
    override = QuantConfig.peqa(bits=4) if method == "peqa" else None
    pipe = load_quantized_pipeline(tiny_base_dir, config_override=override)
    before = _eval(pipe, [dog])
    result = finetune(pipe, [dog], TrainConfig(**FAST))
    after = _eval(pipe, [dog])
    # the fixed-noise denoising loss on the subject's images falls: by a quarter or more
    # for TuneQDM, by a tenth or more for PEQA (fewer scales, same steps)
    assert after < margin * before, (before, after)
    assert result.final_loss < result.losses[0]
    assert result.scale_set.method == method
    assert result.trainable_numbers == result.scale_set.num_scales


def test_same_seed_same_run(tiny_base_dir, dog):
    runs = []
    for _ in range(2):
        pipe = load_quantized_pipeline(tiny_base_dir)
        runs.append(finetune(pipe, [dog], TrainConfig(**{**FAST, "steps": 5})))
    assert runs[0].losses == runs[1].losses
    assert runs[0].scale_set.to_bytes() == runs[1].scale_set.to_bytes()


def test_uniform_timesteps_are_the_plain_independent_draws():
    drawn = sample_timesteps(6, 1000, torch.Generator().manual_seed(3), "uniform")
    plain = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, plain)


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_stratified_timesteps_hold_one_per_stratum_and_stay_uniform(batch):
    generator, T = torch.Generator().manual_seed(0), 1000
    draws = torch.stack([sample_timesteps(batch, T, generator, "stratified")
                         for _ in range(4000)])  # (4000, batch)
    assert draws.dtype == torch.int64 and draws.min() >= 0 and draws.max() < T
    strata = torch.div(draws * batch, T, rounding_mode="floor").sort(dim=1).values
    assert torch.equal(strata, torch.arange(batch).expand_as(strata))
    # each position is still uniform on [0, T): 10 bins of 4000 draws, ~400 +- 20 each
    for column in draws.T:
        counts = torch.bincount(torch.div(column, 100, rounding_mode="floor"), minlength=10)
        assert counts.min() > 320 and counts.max() < 480, counts
    if batch == 4:  # N = 4 experts: every step feeds each of them exactly once
        experts = expert_index(draws, 4, T).sort(dim=1).values
        assert torch.equal(experts, torch.arange(4).expand_as(experts))


def test_stratified_training_runs_and_is_reproducible(tiny_base_dir, dog):
    config = TrainConfig(**{**FAST, "steps": 4, "timestep_sampling": "stratified"})
    runs = [finetune(load_quantized_pipeline(tiny_base_dir), [dog], config) for _ in range(2)]
    plain = finetune(load_quantized_pipeline(tiny_base_dir), [dog],
                     TrainConfig(**{**FAST, "steps": 4}))
    assert runs[0].losses == runs[1].losses != plain.losses
    assert runs[0].scale_set.to_bytes() == runs[1].scale_set.to_bytes()


def test_each_expert_learns_only_its_interval(tiny_base_dir):
    unet = load_quantized_pipeline(tiny_base_dir).unet  # N = 2, T = 1000
    sample, text = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    unet(
        sample, torch.tensor([0, 250, 499]), encoder_hidden_states=text
    ).sample.square().sum().backward()
    for layer in quantized_layers(unet).values():
        assert layer.scale_out.grad[0].abs().sum() > 0
        assert torch.all(layer.scale_out.grad[1] == 0) and torch.all(layer.scale_in.grad[1] == 0)


def test_prior_preservation_generates_and_caches_class_images(tiny_base_dir, dog, tmp_path):
    pipe = load_quantized_pipeline(tiny_base_dir)
    config = TrainConfig(
        **{**FAST, "steps": 3},
        prior_preservation=True,
        num_class_images=2,
        class_image_steps=2,
        class_images_cache=str(tmp_path / "cls"),
    )
    result = finetune(pipe, [dog], config)
    cached = sorted((tmp_path / "cls").rglob("*.png"))
    assert len(cached) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    stamps = [p.stat().st_mtime_ns for p in cached]
    finetune(pipe, [dog], config)  # second run reuses the cache
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_prior_batch_uses_per_sample_experts(tiny_base_dir, dog, tmp_path):
    pipe = load_quantized_pipeline(tiny_base_dir)
    data = prepare_data(pipe, [dog], 16, class_images=[dog.images[:2]])
    config = TrainConfig(**FAST, prior_preservation=True)
    loss = training_loss(pipe.unet, pipe.scheduler, data, config, torch.Generator().manual_seed(3))
    assert loss.isfinite()
    assert get_router(pipe.unet).rows.shape == (4,)  # 2 instance + 2 class samples


def test_several_subjects_train_jointly(tiny_base_dir, dog_images):
    pipe = load_quantized_pipeline(tiny_base_dir)
    subjects = [
        Subject("dog-a", dog_images[:3], "dog", token="sks"),
        Subject("dog-b", dog_images[3:], "dog", token="zwx"),
    ]
    result = finetune(pipe, subjects, TrainConfig(**{**FAST, "steps": 4}))
    assert [s["subject_id"] for s in result.scale_set.subjects] == ["dog-a", "dog-b"]
    assert [s["token"] for s in result.scale_set.subjects] == ["sks", "zwx"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reference_methods_through_the_same_loop(tiny_pipeline_dir, dog, method):
    pipe = load_float_pipeline(tiny_pipeline_dir)
    total = sum(p.numel() for p in pipe.unet.parameters())
    lr = 1e-3 if method == "full" else 1e-2
    result = finetune(pipe, [dog], TrainConfig(**{**FAST, "method": method, "lr": lr}))
    assert result.scale_set is None
    assert result.final_loss < result.losses[0]
    if method == "full":
        assert result.trainable_numbers == total
    else:
        assert 0 < result.trainable_numbers < 0.05 * total


def test_lora_runs_depend_on_their_seed_not_on_the_global_generator(tiny_pipeline_dir, dog):
    """peft initialises LoRA from torch's global generator; a run seeds it from its own
    seed, so two runs with one seed agree whatever the process drew before, and the
    caller's global generator is left as it was."""
    config = TrainConfig(**{**FAST, "method": "lora", "lr": 1e-2, "steps": 2, "seed": 5})
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(finetune(load_float_pipeline(tiny_pipeline_dir), [dog], config).losses)
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # the global generator is untouched
    assert runs[0] == runs[1]
    other = finetune(load_float_pipeline(tiny_pipeline_dir), [dog],
                     TrainConfig(**{**config.to_dict(), "seed": 6}))
    assert other.losses != runs[0]


def test_gradient_checkpointing_gives_the_same_losses(tiny_base_dir, dog):
    runs = []
    for checkpointing in (False, True):
        pipe = load_quantized_pipeline(tiny_base_dir)
        config = TrainConfig(**{**FAST, "steps": 3}, gradient_checkpointing=checkpointing)
        runs.append(finetune(pipe, [dog], config).losses)
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), rtol=1e-5, atol=0)


def test_non_finite_loss_stops_with_a_clear_error(tiny_base_dir, dog):
    pipe = load_quantized_pipeline(tiny_base_dir)
    with pytest.raises(TrainingError, match="loss became"):
        finetune(
            pipe,
            [dog],
            TrainConfig(
                **{**FAST, "lr_scale_out": 1e30, "max_grad_norm": 1e30, "lr_scale_in": 1e30}
            ),
        )


def test_method_and_model_must_agree(tiny_pipeline_dir, tiny_base_dir, dog):
    with pytest.raises(TrainingError, match="needs a quantized UNet"):
        finetune(load_float_pipeline(tiny_pipeline_dir), [dog], TrainConfig(**FAST))
    with pytest.raises(TrainingError, match="needs a float UNet"):
        finetune(load_quantized_pipeline(tiny_base_dir), [dog], TrainConfig(method="full"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("method", "dora"), ("resolution", 30), ("lr_scale_in", -1.0),
     ("timestep_sampling", "sobol")],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**{field: value})


def test_subject_prompt_template_is_checked(dog_images):
    with pytest.raises(ValueError, match="allowed placeholders"):
        Subject("x", dog_images, "dog", prompt="a photo of {name}")
    with pytest.raises(ValueError, match="no images"):
        Subject("x", [], "dog")


def test_captions_give_each_image_its_own_prompt(tiny_base_dir, dog_images, tmp_path):
    """Subject.captions: one template per image (None: the instance prompt), encoded
    once each; load_captions reads them from <image>.txt beside the images."""
    from tuneqdm.data import load_captions, load_image_folder

    for i, image in enumerate(dog_images[:3]):
        image.save(tmp_path / f"{i}.png")
    assert load_captions(tmp_path) is None
    (tmp_path / "0.txt").write_text("a photo of {token} {class_noun} on grass\n")
    (tmp_path / "2.txt").write_text("{token} asleep")
    captions = load_captions(tmp_path)
    assert captions == ["a photo of {token} {class_noun} on grass", None, "{token} asleep"]
    dog = Subject("dog", load_image_folder(tmp_path), "dog", token="zwx", captions=captions)
    assert dog.image_prompts == ["a photo of zwx dog on grass", "a photo of zwx dog",
                                 "zwx asleep"]
    pipe = load_quantized_pipeline(tiny_base_dir)
    data = prepare_data(pipe, [dog], 16)
    assert data.embeddings.shape[0] == 3 and data.prompt_of.tolist() == [0, 1, 2]
    plain = prepare_data(pipe, [Subject("dog", dog.images, "dog", token="zwx")], 16)
    assert plain.prompt_of.tolist() == [0, 0, 0]
    torch.testing.assert_close(plain.embeddings[0], data.embeddings[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        Subject("dog", dog.images, "dog", captions=captions[:2])
    with pytest.raises(ValueError, match="allowed placeholders"):
        Subject("dog", dog.images, "dog", captions=["{name}", None, None])


def test_8bit_adam_trains_the_full_reference(tiny_pipeline_dir, dog):
    pipe = load_float_pipeline(tiny_pipeline_dir)
    config = TrainConfig(**{**FAST, "method": "full", "lr": 1e-3, "optimizer": "adamw8bit"})
    result = finetune(pipe, [dog], config)
    assert result.final_loss < result.losses[0]


def test_multi_tensor_optimiser_trains_bit_equal_to_per_tensor(tiny_base_dir, dog, monkeypatch):
    """The loop's AdamW and clipping run foreach on the CPU (faster, benchmarks/
    optimizer_step.py): the run must be bit-equal to torch's per-tensor CPU default."""
    def run():
        pipe = load_quantized_pipeline(tiny_base_dir)
        return finetune(pipe, [dog], TrainConfig(**{**FAST, "steps": 8}))

    fast = run()
    adamw, clip = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_
    seen = []

    def per_tensor_adamw(groups, **options):
        seen.append(options.pop("foreach"))
        return adamw(groups, **options, foreach=False)

    monkeypatch.setattr(torch.optim, "AdamW", per_tensor_adamw)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm, foreach: clip(params, norm, foreach=False))
    plain = run()
    assert seen == [True]
    assert fast.losses == plain.losses
    assert fast.scale_set.to_bytes() == plain.scale_set.to_bytes()
