"""A base's recipe (tuneqdm_recipe.json): read and checked, layered over TrainConfig's
defaults and under the caller's values, its relative rate resolved per base."""

from __future__ import annotations

import json

import pytest

from tuneqdm import quantized_layers
from tuneqdm.base import load_quantized_pipeline
from tuneqdm.recipe import (
    RECIPE_FILE,
    RELATIVE_LR,
    RecipeError,
    parse_recipe,
    read_recipe,
    resolve_train_config,
    train_settings,
)
from tuneqdm.train import TrainConfig

KEYS = ("steps", "lr_scale_out", "batch_size", "seed")


def test_the_bundled_toy_base_carries_the_comparisons_settings():
    from pathlib import Path

    toy = Path(__file__).resolve().parents[2] / "models" / "toyworld-base"
    recipe = read_recipe(toy)
    assert recipe is not None
    assert recipe.train == {"steps": 120, "batch_size": 4, RELATIVE_LR: 0.01,
                            "timestep_sampling": "stratified"}
    assert recipe.samples == {"guidance_scale": 2.0}
    from toyworld.compare import CompareConfig  # the recipe is the comparison's

    fast = CompareConfig()
    assert (fast.steps, fast.batch_size, fast.rel_lr, fast.timestep_sampling,
            fast.guidance_scale) == (
        recipe.train["steps"], recipe.train["batch_size"], recipe.train[RELATIVE_LR],
        recipe.train["timestep_sampling"], recipe.samples["guidance_scale"])
    assert read_recipe(toy / "unet") is None  # no recipe there


@pytest.mark.parametrize(("data", "message"), [
    ({"train": {"stepz": 3}}, r"unknown key\(s\) \['train.stepz'\]; allowed: \['train.steps'"),
    ({"training": {}}, r"unknown key\(s\) \['training'\]"),
    ({"train": {"steps": 0}}, r"TrainConfig.steps=0 is invalid"),
    ({"train": {"method": "full"}}, r"unknown key\(s\) \['train.method'\]"),
    ({"train": {RELATIVE_LR: -1}}, r"lr_scale_out_relative=-1 is invalid: must be a positive"),
    ({"train": {RELATIVE_LR: 0.1, "lr_scale_out": 1e-4}}, r"not both"),
    ({"train": {"timestep_sampling": "sobol"}}, r"TrainConfig.timestep_sampling='sobol' is "
     r"invalid: must be one of \('uniform', 'stratified'\)"),
    ({"samples": {"sample_steps": 0}}, r"samples.sample_steps=0 is invalid"),
    ({"samples": {"guidance_scale": "4"}}, r"samples.guidance_scale='4' is invalid"),
    ([1, 2], r"expected a JSON object"),
])
def test_bad_recipes_are_refused_naming_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, "m/tuneqdm_recipe.json")


def test_unreadable_recipe_file_names_the_file(tmp_path):
    (tmp_path / RECIPE_FILE).write_text("{not json")
    with pytest.raises(RecipeError, match=f"{tmp_path / RECIPE_FILE}: not readable JSON"):
        read_recipe(tmp_path)


def test_precedence_defaults_then_recipe_then_given():
    defaults = TrainConfig()
    recipe = parse_recipe({"train": {"steps": 120, "batch_size": 4, RELATIVE_LR: 0.01}})
    assert train_settings(None, {}, KEYS) == {k: getattr(defaults, k) for k in KEYS}
    assert train_settings(recipe, {}, KEYS) == {"steps": 120, "batch_size": 4,
                                                "seed": defaults.seed, RELATIVE_LR: 0.01}
    # an explicit rate beats the recipe's relative one; other recipe values stay
    assert train_settings(recipe, {"steps": 7, "lr_scale_out": 1e-3}, KEYS) == {
        "steps": 7, "lr_scale_out": 1e-3, "batch_size": 4, "seed": defaults.seed}
    absolute = parse_recipe({"train": {"lr_scale_out": 5e-5}})
    assert train_settings(absolute, {}, KEYS)["lr_scale_out"] == 5e-5


def test_the_recipes_timestep_sampling_reaches_the_train_config():
    recipe = parse_recipe({"train": {"lr_scale_out": 5e-5, "timestep_sampling": "stratified"}})
    config = resolve_train_config(train_settings(recipe, {"steps": 7}, KEYS), None)
    assert (config.timestep_sampling, config.steps, config.lr_scale_out) == ("stratified", 7, 5e-5)
    assert resolve_train_config(train_settings(None, {}, KEYS), None).timestep_sampling == "uniform"


def test_relative_rate_resolves_against_the_bases_mean_s0(tiny_base_dir):
    unet = load_quantized_pipeline(tiny_base_dir).unet
    scale0 = [layer.scale0.double() for layer in quantized_layers(unet).values()]
    mean = float(sum(s.sum() for s in scale0) / sum(s.numel() for s in scale0))
    config = resolve_train_config({"steps": 5, RELATIVE_LR: 0.01}, unet)
    assert config.steps == 5
    assert config.lr_scale_out == float(f"{0.01 * mean:.3g}")
    assert config.lr_scale_out == pytest.approx(0.01 * mean, rel=5e-3)
    again = resolve_train_config({"steps": 5, RELATIVE_LR: 0.01}, unet)
    assert again == config  # the same base always gives the same rate
    # a per-subject lr_scale_out (CSV column) wins over the relative rate
    assert resolve_train_config({RELATIVE_LR: 0.01, "lr_scale_out": 2e-3},
                                unet).lr_scale_out == 2e-3
    with pytest.raises(ValueError, match="needs the quantized UNet"):
        resolve_train_config({RELATIVE_LR: 0.01}, None)
    assert json.dumps(config.to_dict())  # what meta.json records: the resolved rate
