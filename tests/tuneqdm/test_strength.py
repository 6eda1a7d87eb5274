"""Per-sample strength alpha (ScaleTable.select / generate(..., strengths=)): a sample's
scales are s0 + alpha (s - s0) and 1 + alpha (s_in - 1), so alpha 0 is exactly the
untuned base, alpha 1 exactly the subject, and one batch mixes subjects at different
strengths without copying any table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_scaletable import N, _as_array, _subject_set, mlp, random_tensors

from tuneqdm import get_router, quantized_layers
from tuneqdm.scaletable import ScaleTable


def test_layer_scales_interpolate_between_base_and_subject():
    model = mlp()
    table = ScaleTable(model)
    table.allocate(2, trainable=False)
    tensors = random_tensors(table, 3)
    table.write(1, tensors)
    router = get_router(model)
    layer = quantized_layers(model)["0"]
    storage = layer.scale_out.data_ptr()
    with table.select([1, 1, 1], strengths=[0.0, 1.0, 0.5]):
        router.route_timesteps(torch.tensor([10, 10, 900]), batch=3)
        scale_in, scale_out = layer._scales(3, torch.device("cpu"))
    assert torch.equal(scale_out[0], layer.scale0)  # alpha 0: the base's s0 exactly
    assert torch.equal(scale_in[0], torch.ones_like(scale_in[0]))
    assert torch.equal(scale_out[1], tensors["0.scale_out"][0])  # alpha 1: the row exactly
    assert torch.equal(scale_in[1], tensors["0.scale_in"][0])
    half = layer.scale0 + 0.5 * (tensors["0.scale_out"][1] - layer.scale0)
    torch.testing.assert_close(scale_out[2], half)
    torch.testing.assert_close(scale_in[2], 1 + 0.5 * (tensors["0.scale_in"][1] - 1))
    assert layer.scale_out.data_ptr() == storage and table.num_slots == 2  # no copies
    assert router.strengths is None  # restored on exit
    with pytest.raises(ValueError, match="2 strengths for 3 slots"), table.select(
            [0, 1, 1], strengths=[1.0, 0.5]):
        pass
    with pytest.raises(ValueError, match="must be finite"), table.select(
            [0], strengths=[float("nan")]):
        pass


@pytest.fixture(scope="module")
def pipe(tiny_base_dir):
    from tuneqdm.base import load_quantized_pipeline

    pipe = load_quantized_pipeline(tiny_base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_strength_zero_is_the_base_and_one_is_the_subject(pipe):
    from tuneqdm.generate import generate

    kwargs = {"seed": [5, 6], "num_inference_steps": 3}
    prompts = ["a photo of sks dog", "a sks dog"]
    a, b = _subject_set(pipe.unet, 1), _subject_set(pipe.unet, 2)
    table = ScaleTable(pipe.unet)
    table.allocate(3, trainable=False)  # slot 2 stays the untuned base
    table.write(0, a.tensors)
    table.write(1, b.tensors)
    base = _as_array(generate(pipe, prompts, slots=[2, 2], **kwargs))
    subject = _as_array(generate(pipe, prompts, slots=[0, 1], **kwargs))
    assert np.array_equal(_as_array(generate(pipe, prompts, slots=[0, 1], strengths=0.0,
                                             **kwargs)), base)
    assert np.array_equal(_as_array(generate(pipe, prompts, slots=[0, 1], strengths=[1, 1],
                                             **kwargs)), subject)
    assert np.abs(base - subject).mean() > 1  # the check above is discriminating

    # two subjects at two strengths in one batch == each generated alone
    mixed = _as_array(generate(pipe, prompts, slots=[0, 1], strengths=[0.5, 1.5], **kwargs))
    alone = np.concatenate([
        _as_array(generate(pipe, prompts[:1], slots=[0], strengths=0.5, seed=[5],
                           num_inference_steps=3)),
        _as_array(generate(pipe, prompts[1:], slots=[1], strengths=1.5, seed=[6],
                           num_inference_steps=3)),
    ])
    assert np.abs(mixed - alone).max() <= 2  # batched matmuls may round differently
    assert np.abs(mixed[0] - subject[0]).mean() > 0.5 and np.abs(mixed[0] - base[0]).mean() > 0.5
    assert get_router(pipe.unet).strengths is None
    with pytest.raises(ValueError, match="3 strengths for 2 prompts"):
        generate(pipe, prompts, slots=[0, 1], strengths=[1, 1, 0.5])
    assert table.num_experts == N
