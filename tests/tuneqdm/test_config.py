"""QuantConfig: validation names the bad field, dict round trip, derived values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tuneqdm import QuantConfig

BAD_FIELDS = [
    ("bits", 1),
    ("bits", 5),
    ("bits", 16),
    ("bits", 4.0),
    ("bits", "4"),
    ("bits", True),
    ("bits", None),
    ("symmetric", 1),
    ("symmetric", "yes"),
    ("method", "lora"),
    ("method", "PEQA"),
    ("num_experts", 0),
    ("num_experts", -2),
    ("num_experts", 2.0),
    ("num_experts", True),
    ("num_train_timesteps", 0),
    ("num_train_timesteps", 3),  # fewer than the 4 default experts
    ("num_train_timesteps", 1000.0),
    ("num_train_timesteps", None),
    ("rounding", "floor"),
    ("rounding", None),
    ("mse_grid", 1),
    ("mse_grid", 0),
    ("mse_grid", 80.0),
    ("mse_grid", True),
    ("mse_min_ratio", 0.0),
    ("mse_min_ratio", 1.0),
    ("mse_min_ratio", 1.5),
    ("mse_min_ratio", -0.1),
    ("mse_min_ratio", float("nan")),
    ("mse_min_ratio", None),
    ("mse_min_ratio", "0.5"),
    ("mse_min_ratio", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field}="):
        QuantConfig(**{field: value})


def test_peqa_needs_one_expert():
    with pytest.raises(ValueError, match=r"QuantConfig\.num_experts=4 .*peqa"):
        QuantConfig(method="peqa", num_experts=4)
    assert QuantConfig.peqa().num_experts == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_limits(bits):
    config = QuantConfig(bits=bits)
    assert config.qmin == -(2 ** (bits - 1))
    assert config.qmax == 2 ** (bits - 1) - 1
    assert config.qmax - config.qmin == 2**bits - 1


def test_scale_in_only_for_tuneqdm():
    assert QuantConfig().train_scale_in
    assert not QuantConfig.peqa(bits=8).train_scale_in


def test_accepts_valid_edges():
    QuantConfig(num_experts=1, num_train_timesteps=1)
    QuantConfig(num_experts=1000, num_train_timesteps=1000)
    QuantConfig(rounding="mse", mse_grid=2, mse_min_ratio=1e-3)
    QuantConfig(mse_min_ratio=0.999)


CONFIGS = [
    QuantConfig(),
    QuantConfig.peqa(bits=8, symmetric=True),
    QuantConfig(
        bits=3,
        num_experts=2,
        num_train_timesteps=500,
        rounding="mse",
        mse_grid=7,
        mse_min_ratio=0.5,
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_dict_round_trip(config):
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(QuantConfig)}
    assert QuantConfig.from_dict(data) == config
    assert QuantConfig.from_dict(json.loads(json.dumps(data))) == config


def test_to_dict_is_a_copy():
    config = QuantConfig()
    data = config.to_dict()
    data["bits"] = 8
    assert config.bits == 4


def test_from_dict_refuses_unknown_keys():
    data = QuantConfig().to_dict() | {"group_size": 128, "alpha": 1}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['alpha', 'group_size'\]"):
        QuantConfig.from_dict(data)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match=r"QuantConfig\.bits=6"):
        QuantConfig.from_dict({"bits": 6})


def test_frozen():
    config = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 8  # type: ignore[misc]
