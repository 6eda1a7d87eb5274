"""Where submit's settings come from, without Ray: options > the base's recipe >
the typed configs' defaults, CSV columns on top per subject; spec hashes stable."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner
from pipeline_testkit import copy_photos, write_csv

from pipeline.manifest import group_jobs, load_manifest
from pipeline.run import SubmitConfig, plan_submit
from pipeline.settings import TOY_BASE, TRAIN_OPTIONS
from pipeline.worker import WorkSettings, train_config_for
from tuneqdm import QuantConfig
from tuneqdm.recipe import RECIPE_FILE, RELATIVE_LR, relative_lr
from tuneqdm.train import TrainConfig
from tuneqdm_cli.main import main

PRE_RECIPE_TRAIN = {"steps": 400, "lr_scale_out": 3e-6, "lr_scale_in": None, "batch_size": 1,
                    "resolution": None, "seed": 0}  # what submit hashed before recipes


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subjects")
    photos = copy_photos("dog", folder / "dog", 1)
    return write_csv(folder / "s.csv", [
        {"subject_id": "dog", "images": str(photos), "class": "dog", "steps": ""},
        {"subject_id": "cat", "images": str(photos), "class": "cat", "steps": "9"}])


def _plan(csv, tmp_path, **options):
    said = io.StringIO()
    config = SubmitConfig(manifest=str(csv), output=str(tmp_path / "out"), **options)
    plan = plan_submit(config, lambda text: said.write(text + "\n"))
    return plan, said.getvalue()


def test_the_toy_bases_recipe_applies_and_options_override_it(csv, tmp_path):
    plan, said = _plan(csv, tmp_path)
    assert plan.base["source"] == str(TOY_BASE)
    assert plan.train == {"steps": 120, "batch_size": 4, RELATIVE_LR: 0.01,
                          "timestep_sampling": "stratified", "lr_scale_in": None,
                          "resolution": None, "seed": 0}
    assert plan.sampling == {"sample_steps": 20, "guidance_scale": 2.0}
    assert f"recipe: {TOY_BASE / RECIPE_FILE} (steps 120, batch_size 4, lr_scale_out " \
           "0.01 x mean s0, timestep_sampling stratified, guidance_scale 2.0)" in said
    again, _ = _plan(csv, tmp_path)
    assert again.spec_hashes == plan.spec_hashes  # resume sees the same subjects

    flags, _ = _plan(csv, tmp_path, steps=50, lr_scale_out=1e-4, guidance_scale=2.0)
    assert flags.train == {"steps": 50, "batch_size": 4, "lr_scale_out": 1e-4,
                           "timestep_sampling": "stratified", "lr_scale_in": None,
                           "resolution": None, "seed": 0}
    assert flags.sampling == {"sample_steps": 20, "guidance_scale": 2.0}
    assert flags.spec_hashes != plan.spec_hashes


def test_without_a_recipe_every_default_is_the_configs(csv, tmp_path, tiny_base_model):
    plan, said = _plan(csv, tmp_path, base_model=tiny_base_model)
    assert "recipe:" not in said
    defaults = TrainConfig()
    assert plan.train == {k: getattr(defaults, k) for k in TRAIN_OPTIONS} == PRE_RECIPE_TRAIN
    assert plan.base["quant_config"] == QuantConfig().to_dict()
    work = WorkSettings(run_id="", base={}, quant_config={})
    assert plan.sampling == {"sample_steps": work.sample_steps,
                             "guidance_scale": work.guidance_scale}
    config = plan.config
    assert (config.samples, config.scales_dtype, config.min_image_side) == (
        work.samples, work.scales_dtype, work.min_image_side)
    # the hash a finished subject of an earlier version was written with: it is reused
    job = plan.jobs[0]
    assert plan.spec_hashes[job.job_id] == job.spec_hash(
        {"base": plan.base["address"], "quant": plan.base["quant_config"],
         "train": PRE_RECIPE_TRAIN})
    peqa, _ = _plan(csv, tmp_path, base_model=tiny_base_model, method="peqa", bits=8)
    assert peqa.base["quant_config"] == QuantConfig.peqa(bits=8).to_dict()


def test_csv_columns_override_the_recipe_per_subject(csv, tmp_path, tiny_base_model):
    from tuneqdm.base import load_quantized_pipeline, quantize_pipeline

    base = tmp_path / "base"
    quantize_pipeline(tiny_base_model, base, QuantConfig(bits=4, num_experts=2))
    unet = load_quantized_pipeline(base).unet
    plan, _ = _plan(csv, tmp_path)  # the toy recipe: 120 steps at 0.01 x mean s0
    settings = WorkSettings(run_id="r", base={}, quant_config={}, train=plan.train)
    dog, cat = group_jobs(load_manifest(str(csv)))
    assert train_config_for(dog, settings, unet).steps == 120
    assert train_config_for(cat, settings, unet).steps == 9  # its 'steps' column
    rate = train_config_for(dog, settings, unet).lr_scale_out
    assert rate == relative_lr(0.01, unet) and rate > 0
    with_rate = replace(dog.subjects[0], overrides={"lr_scale_out": 7e-4})  # a CSV column
    assert train_config_for(replace(dog, subjects=(with_rate,)), settings,
                            unet).lr_scale_out == 7e-4


def test_a_broken_recipe_stops_submit_before_anything_starts(csv, tmp_path, tiny_base_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_base_model, model)
    (model / RECIPE_FILE).write_text(json.dumps({"train": {"stepz": 3}}))
    result = CliRunner().invoke(main, ["submit", str(csv), "--output", str(tmp_path / "out"),
                                       "--base-model", str(model)])
    assert result.exit_code == 2, result.output
    assert f"Error: {model / RECIPE_FILE}: unknown key(s) ['train.stepz']" in result.output
    assert "nothing was launched" in result.output
    assert not (tmp_path / "out").exists()


def test_help_shows_the_defaults_of_the_configs():
    from deploy.settings import ServeSettings

    runner = CliRunner()
    submit = " ".join(runner.invoke(main, ["submit", "--help"]).output.split())
    assert f"[default: the base's recipe, else {TrainConfig().steps}]" in submit
    assert f"[default: {QuantConfig().bits}]" in submit
    serve = " ".join(runner.invoke(main, ["serve", "--help"]).output.split())
    batch = ServeSettings.model_fields["max_batch_images"].default
    assert f"Images per UNet batch, across subjects. [default: {batch};" in serve
