"""The comparison runs (toyworld/compare.py) on the committed toy-world base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toyworld.calibrate import calibration_hessians
from toyworld.compare import (
    CompareConfig,
    Method,
    cached_method_unet,
    load_base,
    method_unet,
    paper_methods,
    run,
)
from toyworld.subjects import get_subject
from toyworld.text import tokenize
from tuneqdm import enable_timestep_experts, quantized_layers
from tuneqdm.testing import load_script

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "models" / "toyworld-base"


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_base(BASE)


def test_paper_methods_are_the_tables_rows():
    methods = paper_methods()
    labels = [m.label for m in methods]
    assert labels[:4] == ["no fine-tuning", "no fine-tuning, subject in words",
                          "full-precision DreamBooth", "LoRA r=4"]
    assert labels[4:7] == ["PEQA W8", "TuneQDM N=1 W8", "TuneQDM N=4 W8"]
    assert labels[-1] == "TuneQDM N=4 W4 (paper: 400 x 1)"
    assert len(methods) == 4 + 3 * 3 + 1
    assert all(Method.from_key(m.key) == m for m in methods)
    assert Method.from_key("tuneqdm-n4-w4-paper") == Method("tuneqdm", 4, 4, "paper")


def test_the_extended_table_adds_the_quantized_words_and_full_fine_tuning_400_x_1():
    extended = paper_methods(extended=True)
    added = [m for m in extended if m not in paper_methods()]
    assert [m.label for m in added] == ["no fine-tuning, subject in words (W8)",
                                        "no fine-tuning, subject in words (W4)",
                                        "no fine-tuning, subject in words (W3)",
                                        "full-precision DreamBooth (paper: 400 x 1)"]
    assert [m for m in extended if m in paper_methods()] == paper_methods()
    assert extended[-2:] == [Method("full", recipe="paper"), Method("tuneqdm", 4, 4, "paper")]


def test_the_paper_recipe_trains_400_steps_of_batch_1(pipe):
    from toyworld.compare import train_config

    unet = method_unet(pipe.unet, Method("tuneqdm", 4, 4))
    fast = train_config(Method("tuneqdm", 4, 4), unet, CompareConfig(), seed=3)
    paper = train_config(Method("tuneqdm", 4, 4, "paper"), unet, CompareConfig(), seed=3)
    assert (fast.steps, fast.batch_size) == (120, 4)
    assert (paper.steps, paper.batch_size, paper.seed) == (400, 1, 3)
    assert paper.lr_scale_out == fast.lr_scale_out


def test_full_fine_tuning_trains_at_its_own_batch_and_is_measured_at_the_common_one(pipe):
    """The fast recipe gives full fine-tuning full_batch_size (8); the paper's recipe
    is batch 1 for every method; memory_config puts full fine-tuning back at the other
    rows' batch so the memory column compares methods at one batch."""
    from toyworld.compare import memory_config, train_config

    config = CompareConfig()
    assert (config.batch_size, config.full_batch_size) == (4, 8)
    full = train_config(Method("full"), pipe.unet, config, seed=0)
    paper = train_config(Method("full", recipe="paper"), pipe.unet, config, seed=0)
    lora = train_config(Method("lora"), pipe.unet, config, seed=0)
    assert (full.method, full.steps, full.batch_size, full.lr) == ("full", 120, 8, 2e-4)
    assert (paper.steps, paper.batch_size) == (400, 1)
    assert lora.batch_size == 4
    measured = memory_config(config)
    assert train_config(Method("full"), pipe.unet, measured, seed=0).batch_size == 4
    assert measured.steps == config.steps and measured.lr_full == config.lr_full


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "qlora"}, "allowed: none, words, full, lora, peqa, tuneqdm"),
    ({"name": "peqa"}, "needs bits"),
    ({"name": "lora", "bits": 4}, "bits must be None"),
    ({"name": "full", "recipe": "slow"}, "allowed: fast, paper"),
    ({"name": "none", "recipe": "paper"}, "fast only for no fine-tuning"),
    ({"name": "words", "recipe": "paper"}, "fast only for no fine-tuning"),
])
def test_method_refuses_what_it_cannot_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Method(**kwargs)


def test_the_words_row_prompts_the_subject_in_words(pipe):
    """"words" trains nothing and asks for the subject by colour, pattern and shape in
    the same contexts (background, position) as the token prompts."""
    from toyworld.subjects import described_prompts, evaluation_prompts

    subject = get_subject("checkered-star")
    told, named = described_prompts(subject), evaluation_prompts(subject)
    assert told[0] == "a purple checkered star on a orange background, top"
    assert [p.replace("purple checkered star", "sks star") for p in told] == named
    row = run(pipe, Method("words"), subject, 0, CompareConfig(images_per_prompt=1,
                                                               inference_steps=10),
              keep_images=True)
    assert row["trainable"] == 0 and row["train_s"] == 0.0 and row["loss_last"] is None
    assert row["label"] == "no fine-tuning, subject in words"
    # told its colour, the base draws it (0.73 over the table's 3 seeds, session 13)
    assert row["subject_colour"] >= 0.5, row
    # at a bit width: the same prompts to the quantized base with its s0 scales
    quantized = method_unet(pipe.unet, Method("words", 3))
    layers = quantized_layers(quantized)
    assert layers and all(layer.bits == 3 and layer.scale_in is None
                          for layer in layers.values())
    row3 = run(pipe, Method("words", 3), subject, 0, CompareConfig(images_per_prompt=1,
                                                                   inference_steps=10),
               keep_images=True)
    assert row3["label"] == "no fine-tuning, subject in words (W3)"
    assert row3["trainable"] == 0 and row3["personal_bytes"] == 0
    # the same seed, prompts and steps: 3-bit rounding alone changes the images
    assert len(row3["images"]) == len(row["images"]) == 4
    assert all((a != b).any() for a, b in zip(row["images"], row3["images"], strict=True))


def test_runs_score_the_tuning_prompts_when_told():
    from toyworld.compare import run_prompts
    from toyworld.subjects import evaluation_prompts, tuning_prompts

    subject = get_subject("dotted-cross")
    assert run_prompts(Method("full"), subject) == evaluation_prompts(subject)
    assert run_prompts(Method("full"), subject, "tuning") == tuning_prompts(subject)
    told = run_prompts(Method("words"), subject, "tuning")
    assert [p.replace("red dotted cross", "vjd cross") for p in told] == tuning_prompts(subject)
    with pytest.raises(ValueError, match=r"CompareConfig\.prompts='test'; allowed: evaluation"):
        CompareConfig(prompts="test")


def test_validation_runs_train_without_the_photo_they_score():
    """prompts="validation": fold = the run's seed; the run trains on the 4 photos
    validation_split keeps (with their own captions) and prompts the left-out
    background."""
    from toyworld.compare import run_prompts, training_subject
    from toyworld.subjects import validation_split
    from toyworld.world import caption

    subject = get_subject("checkered-star")
    everything = training_subject(subject)
    for seed in range(3):
        keep, scenes = validation_split(subject, fold=seed)
        prompts = run_prompts(Method("full"), subject, "validation", seed)
        assert prompts == [caption(s, token=subject.token) for s in scenes]
        held = scenes[0].background
        assert all(f"on a {held} " in p for p in prompts)
        trained = training_subject(subject, keep=keep)
        assert len(trained.images) == 4 and len(everything.images) == 5
        assert trained.captions == [everything.captions[i] for i in keep]
        assert not any(f"on a {held} " in c for c in trained.captions)
        assert [im.tobytes() for im in trained.images] == [
            everything.images[i].tobytes() for i in keep]


def test_method_unet_copies_and_quantizes_without_touching_the_base(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unet = method_unet(pipe.unet, Method("tuneqdm", 3, 2))
    layers = quantized_layers(unet)
    assert layers and all(layer.bits == 3 for layer in layers.values())
    assert next(iter(layers.values())).scale_out.shape[0] == 2
    assert not quantized_layers(pipe.unet)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())


def test_method_unet_keeps_the_named_layers_float(pipe):
    unet = method_unet(pipe.unet, Method("tuneqdm", 4, 4), keep_float=("conv_in", "conv_out"))
    layers = quantized_layers(unet)
    assert "conv_in" not in layers and "conv_out" not in layers
    assert len(layers) == len(quantized_layers(method_unet(pipe.unet, Method("peqa", 4)))) - 2
    for name in ("conv_in", "conv_out"):
        kept = unet.get_submodule(name)
        assert type(kept) is torch.nn.Conv2d and not kept.weight.requires_grad
        assert torch.equal(kept.weight, pipe.unet.get_submodule(name).weight)
    resnets = quantized_layers(method_unet(pipe.unet, Method("peqa", 4),
                                           keep_float=("*resnets*",)))
    assert resnets and not any("resnets" in name for name in resnets)
    with pytest.raises(ValueError, match=r"keep_float: \['conv_middle'\] match no Linear"):
        method_unet(pipe.unet, Method("peqa", 4), keep_float=("conv_in", "conv_middle"))


def test_method_unet_rounds_as_the_config_says(pipe):
    # rounding="mse" searches each row's clipping: never a larger weight error than the
    # min/max grid, and smaller on the whole UNet at 3 bits
    float_modules = dict(pipe.unet.named_modules())
    errors = {}
    for rounding in ("nearest", "mse"):
        layers = quantized_layers(method_unet(pipe.unet, Method("peqa", 3), rounding))
        errors[rounding] = {name: (layer.dequantized_weight()
                                   - float_modules[name].weight).pow(2).sum().item()
                            for name, layer in layers.items()}
    assert errors["nearest"].keys() == errors["mse"].keys()
    assert all(errors["mse"][n] <= errors["nearest"][n] * (1 + 1e-5) for n in errors["mse"])
    assert sum(errors["mse"].values()) < 0.9 * sum(errors["nearest"].values())


def test_gptq_rows_keep_the_grid_and_draw_closer_to_the_float_base(pipe):
    """rounding="gptq" (the table's default): round-to-nearest's grid, other integers,
    chosen from the base's own training data; the UNet's output then stays closer to
    the float base's on fresh training-split inputs."""
    hessians = calibration_hessians(pipe)
    assert calibration_hessians(pipe) is hessians  # once per base and process
    assert CompareConfig().rounding == "gptq"
    unets = {"nearest": method_unet(pipe.unet, Method("tuneqdm", 4, 2)),
             "gptq": method_unet(pipe.unet, Method("tuneqdm", 4, 2), "gptq",
                                 hessians=hessians)}
    nearest, gptq = (quantized_layers(unets[r]) for r in ("nearest", "gptq"))
    assert nearest.keys() == gptq.keys() == hessians.keys()
    for name, layer in gptq.items():
        assert torch.equal(layer.scale0, nearest[name].scale0)
        assert torch.equal(layer.zero, nearest[name].zero)
    changed = sum(not torch.equal(layer.packed, nearest[n].packed) for n, layer in gptq.items())
    assert changed > 0.9 * len(gptq)
    generator = torch.Generator().manual_seed(7)
    noisy = torch.randn(8, 4, 32, 32, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    hidden = pipe.text_encoder(tokenize(pipe.tokenizer, ["a red striped star on a blue "
                                                         "background, top left"] * 8))[0]
    with torch.no_grad():
        reference = pipe.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        error = {r: (u(noisy, timesteps, encoder_hidden_states=hidden).sample
                     - reference).pow(2).mean().item() for r, u in unets.items()}
    assert error["gptq"] < 0.8 * error["nearest"]
    with pytest.raises(ValueError, match="rounding='gptq' needs hessians"):
        method_unet(pipe.unet, Method("peqa", 4), "gptq")


def test_cached_quantized_bases_are_bit_identical_fresh_copies(pipe):
    """Runs quantize each base once per process (GPTQ ~2.5 s) and train a copy: the
    copy equals a fresh quantization bit for bit, routes its own experts, and what a
    run trains never reaches the next run's copy."""
    method = Method("tuneqdm", 4, 4)
    hessians = calibration_hessians(pipe)
    fresh = method_unet(pipe.unet, method, "gptq", hessians=hessians)
    first = cached_method_unet(pipe.unet, method, "gptq", hessians=hessians)
    assert first is not cached_method_unet(pipe.unet, method, "gptq", hessians=hessians)
    assert fresh.state_dict().keys() == first.state_dict().keys()
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in fresh.state_dict().items())
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(4, 4, 32, 32, generator=generator)
    timesteps = torch.tensor([10, 300, 600, 990])  # one sample per expert
    hidden = pipe.text_encoder(tokenize(pipe.tokenizer, ["a red striped star"] * 4))[0]
    with torch.no_grad():
        for unet in (fresh, first):  # expert e of every layer scaled by 1 + e / 10
            for layer in quantized_layers(unet).values():
                layer.scale_out.mul_(torch.arange(1, 1.4, 0.1)[:4].view(4, *[1] * (
                    layer.scale_out.dim() - 1)))
        enable_timestep_experts(first)  # replaces the copy's own hook, not a doubled one
        assert len(first._forward_pre_hooks) == len(fresh._forward_pre_hooks)
        expected = fresh(noisy, timesteps, encoder_hidden_states=hidden).sample
        assert torch.equal(first(noisy, timesteps, encoder_hidden_states=hidden).sample,
                           expected)
    again = cached_method_unet(pipe.unet, method, "gptq", hessians=hessians)
    untouched = method_unet(pipe.unet, method, "gptq", hessians=hessians)
    assert all(torch.equal(v, untouched.state_dict()[k]) for k, v in again.state_dict().items())
    float_copy = cached_method_unet(pipe.unet, Method("full"))
    assert not quantized_layers(float_copy) and float_copy is not pipe.unet


def test_a_run_learns_the_subject_and_reports_its_costs(pipe):
    """A short TuneQDM W4 fine-tune draws the subject's colour far more often than the
    untuned base, and the row's sizes are those of the scale set it trained."""
    subject = get_subject("striped-diamond")  # yellow; the untuned base rarely draws it so
    config = CompareConfig(images_per_prompt=1)  # the table's settings: 120 steps, batch 4
    untuned = run(pipe, Method("none"), subject, 0, config)
    tuned = run(pipe, Method("tuneqdm", 4, 2), subject, 0, config, keep_images=True)
    assert untuned["trainable"] == 0 and untuned["personal_bytes"] == 0
    assert tuned["trainable"] > 0
    # scale set: 2 experts x (out + in) floats of every layer, plus the header
    assert 4 * tuned["trainable"] < tuned["personal_bytes"] < 4 * tuned["trainable"] + 65_536
    assert tuned["loss_last"] < tuned["loss_first"]
    assert len(tuned["images"]) == 4 and tuned["images"][0].shape == (32, 32, 3)
    for row in (untuned, tuned):
        for key in ("subject_fidelity", "prompt_fidelity", "background", "position"):
            assert 0.0 <= row[key] <= 1.0
    # on the committed base (session 12): 0.02 untuned, 0.75 tuned
    assert tuned["subject_colour"] >= untuned["subject_colour"] + 0.25, (untuned, tuned)


def _benchmark_module():
    return load_script(ROOT / "benchmarks" / "toyworld_table.py")


def test_table_is_the_mean_over_runs_with_an_interval_over_subjects():
    bench = _benchmark_module()
    method = Method("peqa", 4)
    rows = [{"method": method.key, "seed": seed, "subject": subject, "subject_fidelity": value,
             "subject_colour": value, "subject_shape": 1.0, "subject_pattern": 0.0,
             "prompt_fidelity": 0.5, "background": 1.0, "position": 0.0, "trainable": 10,
             "personal_bytes": 1234, "train_s": 2.0}
            for seed, values in ((0, (0.2, 0.4)), (1, (0.6, 0.8)))
            for subject, value in zip(("a", "b"), values, strict=True)]
    table = bench.summarise(rows, [method], {method.key: {"peak_train_bytes": 3 * 2**20}})
    # subject means 0.4 (a) and 0.6 (b): resampling two subjects gives 0.4, 0.5 or 0.6
    assert table[0]["subject"] == "0.500 [0.400, 0.600]"
    assert table[0]["prompt"] == "0.500 [0.500, 0.500]"
    assert table[0]["shape"] == "1.00" and table[0]["runs"] == "4"
    assert table[0]["bytes"] == "1,234" and table[0]["peak"] == "3.0"


def test_per_subject_table_names_the_weakest_subject_and_reads_interiors_if_run():
    bench = _benchmark_module()
    methods = [Method("full"), Method("tuneqdm", 4, 4)]
    rows = [{"method": "full-n1-fp32", "seed": seed, "subject": subject,
             "subject_fidelity": value + 0.02 * seed, "subject_fidelity_interior": 0.95}
            for seed in (0, 1) for subject, value in (("star", 0.82), ("circle", 0.9))]
    rows += [{"method": "tuneqdm-n4-w4", "seed": 0, "subject": subject,
              "subject_fidelity": 0.7} for subject in ("star", "circle")]  # an older run
    table = bench.per_subject(rows, methods, ["star", "circle"])
    assert table == [
        {"method": "full-precision DreamBooth", "star": "0.830", "circle": "0.910",
         "weakest": "0.830 (star)"},
        {"method": "TuneQDM N=4 W4", "star": "0.700", "circle": "0.700",
         "weakest": "0.700 (star)"}]
    interior = bench.per_subject(rows, methods, ["star", "circle"], "subject_fidelity_interior")
    assert [r["method"] for r in interior] == ["full-precision DreamBooth"]
    text = bench.subject_tables(rows, methods, ["star", "circle"])
    assert "| method | star | circle | weakest |" in text and "interior" in text
    assert "interior" not in bench.subject_tables(rows[4:], methods, ["star", "circle"])


def test_table_options_set_the_recipe_and_the_prompts():
    bench = _benchmark_module()
    default = bench.config_from_args(bench.parse_args([]))
    assert default == CompareConfig() and default.captioned and default.prompts == "evaluation"
    tuned = bench.config_from_args(bench.parse_args(
        ["--prompts", "tuning", "--no-captioned", "--lr-full", "1e-4", "--rel-lr", "0.02",
         "--guidance-scale", "3", "--steps", "60", "--batch-size", "2",
         "--inference-steps", "40", "--full-batch-size", "16"]))
    assert (tuned.prompts, tuned.captioned, tuned.lr_full, tuned.rel_lr) == (
        "tuning", False, 1e-4, 0.02)
    assert (tuned.guidance_scale, tuned.steps, tuned.batch_size) == (3.0, 60, 2)
    assert tuned.full_batch_size == 16 and default.full_batch_size == 8
    assert tuned.inference_steps == 40
    inverted = bench.config_from_args(bench.parse_args(["--invert-steps", "50",
                                                        "--lr-invert", "1e-3"]))
    assert (inverted.invert_steps, inverted.lr_invert) == (50, 1e-3)
    assert default.invert_steps == 200
    assert default.keep_float == ()
    kept = bench.config_from_args(bench.parse_args(["--keep-float", "conv_in", "*resnets*"]))
    assert kept.keep_float == ("conv_in", "*resnets*")


def test_claims_are_paired_tests_over_subjects():
    bench = _benchmark_module()
    methods = [Method("full"), Method("peqa", 4), Method("tuneqdm", 4, 1),
               Method("tuneqdm", 4, 4)]
    value = {"full-n1-fp32": 0.80, "peqa-n1-w4": 0.50, "tuneqdm-n1-w4": 0.78,
             "tuneqdm-n4-w4": 0.78}
    rows = [{"method": key, "subject": f"s{i}", "seed": seed,
             "subject_fidelity": v + 0.01 * i + 0.001 * seed}
            for key, v in value.items() for i in range(8) for seed in range(3)]
    claims = {c["claim"]: c for c in bench.check_claims(rows, methods)}
    assert set(claims) == {"TuneQDM N=4 > PEQA at W4", "N=4 > N=1 at W4",
                           "TuneQDM N=4 W4 >= 95% of full fine-tuning (fast)"}
    beats = claims["TuneQDM N=4 > PEQA at W4"]
    assert beats["wins"] == "24/24" and beats["p"] == f"{1 / 256:.4f}"
    assert beats["verdict"] == "holds"
    tie = claims["N=4 > N=1 at W4"]  # equal runs: no evidence either way
    assert tie["wins"] == "0/24" and tie["p"] == "1.0000" and tie["verdict"] == "not shown"
    # 0.78 against 0.95 x 0.80 = 0.76 in every pair: within the 5% margin
    assert claims["TuneQDM N=4 W4 >= 95% of full fine-tuning (fast)"]["verdict"] == "holds"


def test_methods_flag_picks_table_rows_by_key():
    bench = _benchmark_module()
    args = bench.parse_args(["--methods", "full-n1-fp32", "tuneqdm-n4-w4", "full-n1-fp32"])
    assert args.methods == ["full-n1-fp32", "tuneqdm-n4-w4", "full-n1-fp32"]
    assert [Method.from_key(k) for k in dict.fromkeys(args.methods)] == [
        Method("full"), Method("tuneqdm", 4, 4)]
    # the quantized base prompted with the token: not a default row, still runnable
    assert bench.parse_args(["--methods", "none-n1-w4"]).methods == ["none-n1-w4"]
    assert "none-n1-w4" not in [m.key for m in paper_methods()]
    # the extended table's rows, one by one or all with --extended
    assert bench.parse_args(["--methods", "full-n1-fp32-paper"]).methods == [
        "full-n1-fp32-paper"]
    assert bench.parse_args(["--extended"]).extended
    assert not bench.parse_args([]).extended
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "tuneqdm-n4-w5"])


def test_summarise_rewrites_the_table_from_a_runs_json(tmp_path):
    """--summarise runs nothing: the markdown and JSON it writes from a finished run's
    JSON hold that run's rows, command, seconds and machine, and the same table."""
    bench = _benchmark_module()
    methods = [Method("full"), Method("tuneqdm", 4, 4)]
    rows = [{"method": m.key, "seed": seed, "subject": f"s{i}",
             "subject_fidelity": 0.8 + 0.01 * i, "subject_colour": 0.9,
             "subject_shape": 1.0, "subject_pattern": 0.7, "prompt_fidelity": 1.0,
             "background": 1.0, "position": 1.0, "trainable": 5, "personal_bytes": 20,
             "train_s": 1.5} for m in methods for i in range(6) for seed in range(2)]
    run = {"config": CompareConfig().to_dict(), "seeds": [0, 1],
           "subjects": [f"s{i}" for i in range(6)], "methods": [m.key for m in methods],
           "memory": {}, "machine": {"cpu_count": 2}, "seconds": {"runs": 600, "total": 660},
           "command": "python benchmarks/toyworld_table.py --seeds 0 1", "rows": rows}
    (tmp_path / "run.json").write_text(json.dumps(run))
    bench.main(["--summarise", str(tmp_path / "run.json"), "--markdown",
                str(tmp_path / "table.md"), "--json", str(tmp_path / "again.json")])
    text = (tmp_path / "table.md").read_text()
    assert text.startswith("Made by `HF_HUB_OFFLINE=1 python benchmarks/toyworld_table.py "
                           "--seeds 0 1` in 11.0 min (24 runs)")
    assert "Summarised again from its JSON" in text
    assert bench.markdown_table(bench.summarise(rows, methods, {}), bench.COLUMNS) in text
    assert "TuneQDM N=4 W4 >= 95% of full fine-tuning (fast)" in text
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: again[k] for k in run} == {**run, "config": again["config"]}
    assert again["config"] == json.loads(json.dumps(
        CompareConfig().to_dict()))
    # a run from before full_batch_size existed trained full fine-tuning at batch_size,
    # and one from before invert_steps existed inverted no token
    older = {**run, "config": {k: v for k, v in run["config"].items()
                               if k not in ("full_batch_size", "invert_steps")}}
    (tmp_path / "older.json").write_text(json.dumps(older))
    bench.main(["--summarise", str(tmp_path / "older.json"), "--json",
                str(tmp_path / "older_again.json")])
    older_config = json.loads((tmp_path / "older_again.json").read_text())["config"]
    assert older_config["full_batch_size"] == CompareConfig().batch_size
    assert older_config["invert_steps"] == 0  # and it inverted no token
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit, match=r"--summarise .*bad\.json: not a finished run's "
                                         r"JSON of this script \(KeyError"):
        bench.main(["--summarise", str(tmp_path / "bad.json")])


def test_the_grid_inverts_each_subject_and_seed_once_for_all_fine_tuned_rows(tmp_path):
    """The table on two worker processes: one inversion per (subject, seed), whose
    seconds every fine-tuned row of that pair carries; the untuned rows invert nothing."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "toyworld_table.py"), "--methods",
         "words-n1-fp32", "full-n1-fp32", "lora-n1-fp32", "--subjects", "striped-circle",
         "--seeds", "0", "1", "--steps", "2", "--batch-size", "2", "--full-batch-size", "2",
         "--invert-steps", "2", "--inference-steps", "2", "--prompts", "validation",
         "--no-memory", "--json", str(tmp_path / "run.json")],
        capture_output=True, text=True, check=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    inverted = [line.split(":")[0] for line in out.stdout.splitlines()
                if line.startswith("inverted ")]
    assert sorted(inverted) == ["inverted striped-circle seed 0",
                                "inverted striped-circle seed 1"]
    rows = json.loads((tmp_path / "run.json").read_text())["rows"]
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (key, seed) for key in ("words-n1-fp32", "full-n1-fp32", "lora-n1-fp32")
        for seed in (0, 1))
    for seed in (0, 1):
        tuned = [r for r in rows if r["seed"] == seed and r["method"] != "words-n1-fp32"]
        assert len({r["invert_s"] for r in tuned}) == 1 and tuned[0]["invert_s"] > 0
        assert all(r["train_s"] > r["invert_s"] for r in tuned)
    assert all(r["invert_s"] == 0 for r in rows if r["method"] == "words-n1-fp32")
    assert "Every fine-tuned row starts from its subject's token inversion" in out.stdout
