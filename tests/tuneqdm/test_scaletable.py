"""The scale table (tuneqdm/scaletable.py): allocation, initial values, in-place slot
writes, per-sample row selection, and generate(..., slots=) on a table filled slot by
slot giving the images of generate(..., scale_sets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tuneqdm import QuantConfig, get_router, quantize_, quantized_layers
from tuneqdm.scaleset import ScaleSet, install_scale_sets
from tuneqdm.scaletable import ScaleTable

N = 2


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.SiLU(), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 1), nn.Flatten()
    )
    return quantize_(model, QuantConfig(bits=4, num_experts=N))


def random_tensors(table: ScaleTable, seed: int) -> dict[str, torch.Tensor]:
    """A slot's worth of scales: name -> (N, channels), all distinct from the defaults."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: 1 + torch.rand(shape, generator=generator)
        for name, shape in table.slot_shapes().items()
    }


def test_allocate_gives_slots_times_experts_rows_initialised():
    model = mlp()
    table = ScaleTable(model)
    assert table.num_slots == 1 and table.num_experts == N
    table.allocate(3, trainable=False)
    assert table.num_slots == 3
    for layer in quantized_layers(model).values():
        assert layer.scale_out.shape == (3 * N, layer.out_features)
        assert layer.scale_in.shape == (3 * N, layer.in_features)
        assert layer.scale_out.dtype == torch.float32 and not layer.scale_out.requires_grad
        assert torch.equal(layer.scale_out, layer.scale0.expand(3 * N, -1))  # s_out = s0
        assert torch.equal(layer.scale_in, torch.ones(3 * N, layer.in_features))  # s_in = 1
    # (out + in) per expert: (8 + 6) + (3 + 2) numbers, 4 bytes each
    assert table.bytes_per_slot == N * 4 * (8 + 6 + 3 + 2)
    assert table.slot_shapes() == {
        "0.scale_out": (N, 8), "0.scale_in": (N, 6), "3.scale_out": (N, 3), "3.scale_in": (N, 2),
    }  # fmt: skip


def test_allocate_back_to_one_trainable_slot_and_errors():
    model = mlp()
    table = ScaleTable(model)
    table.allocate(2, trainable=False)
    get_router(model).slots = torch.tensor([1])
    table.allocate(1, trainable=True)
    assert get_router(model).slots is None  # slot indices of the old table are forgotten
    for layer in quantized_layers(model).values():
        assert layer.scale_out.shape[0] == N and layer.scale_out.requires_grad
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"slots .* is invalid: must be an int >= 1"):
            table.allocate(bad, trainable=False)
    with pytest.raises(ValueError, match=r"not quantized with tuneqdm\.quantize_"):
        ScaleTable(nn.Sequential(nn.Linear(2, 2)))


def test_allocate_reuses_fitting_tables_in_place():
    model = mlp()
    layer = quantized_layers(model)["0"]
    pointer = layer.scale_out.data_ptr()
    with torch.no_grad():
        layer.scale_out.mul_(3)
    ScaleTable(model).allocate(1, trainable=True)  # already N rows: kept, re-initialised
    assert layer.scale_out.data_ptr() == pointer
    assert torch.equal(layer.scale_out, layer.scale0.expand(N, -1))


def test_write_is_in_place_and_touches_only_its_slot():
    model = mlp()
    table = ScaleTable(model)
    table.allocate(3, trainable=False)
    layers = quantized_layers(model)
    pointers = {n: (m.scale_out.data_ptr(), m.scale_in.data_ptr()) for n, m in layers.items()}
    base = {k: v.clone() for k, v in model.state_dict().items() if "scale_" not in k}
    first, second = random_tensors(table, 1), random_tensors(table, 2)
    table.write(1, first)
    table.write(2, second)
    table.write(1, second)  # overwrite a slot
    for name, layer in layers.items():
        assert (layer.scale_out.data_ptr(), layer.scale_in.data_ptr()) == pointers[name]
        assert torch.equal(layer.scale_out[N : 2 * N], second[f"{name}.scale_out"])
        assert torch.equal(layer.scale_in[2 * N :], second[f"{name}.scale_in"])
        assert torch.equal(layer.scale_out[:N], layer.scale0.expand(N, -1))  # slot 0 untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    read = table.read(2)
    assert read.keys() == second.keys()
    assert all(torch.equal(read[k], second[k]) for k in read)
    table.reset(1)
    assert torch.equal(layers["0"].scale_out[N : 2 * N], layers["0"].scale0.expand(N, -1))
    assert torch.equal(layers["3"].scale_in[2 * N :], second["3.scale_in"])  # slot 2 kept
    with pytest.raises(ValueError, match="slot 3 is invalid: the tables hold 3 slots"):
        table.write(3, first)


def test_select_routes_each_sample_to_its_slot_and_expert():
    model = mlp()
    table = ScaleTable(model)
    table.allocate(3, trainable=False)
    sets = [random_tensors(table, seed) for seed in range(3)]
    for slot, tensors in enumerate(sets):
        table.write(slot, tensors)
    router = get_router(model)
    x = torch.randn(4, 6)
    timesteps = torch.tensor([10, 900, 600, 100])  # experts 0, 1, 1, 0
    with table.select([2, 0]):  # tiled over the batch of 4: slots 2, 0, 2, 0
        router.route_timesteps(timesteps, batch=4)
        assert router.rows.tolist() == [2 * N + 0, 0 * N + 1, 2 * N + 1, 0 * N + 0]
        batched = model(x)
    assert router.slots is None  # restored on exit
    # each sample alone, on a model holding only its slot's set, at its expert
    for i, (slot, expert) in enumerate([(2, 0), (0, 1), (2, 1), (0, 0)]):
        alone = mlp()
        ScaleTable(alone).write(0, sets[slot])
        get_router(alone).rows = torch.tensor([expert])
        with torch.no_grad():  # float32: batched and single products round differently
            expected = alone(x[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], expected, rtol=1e-5, atol=1e-4)
    with (
        pytest.raises(ValueError, match=r"slots \[3\] are invalid: .*\[0, 3\)"),
        table.select([0, 3]),
    ):
        pass


def test_rows_made_once_on_the_inputs_device():
    router = get_router(mlp())
    router.route_timesteps(torch.tensor([10, 900]), batch=2, device="meta")
    assert router.rows.device.type == "meta"
    assert router.rows_for(2, torch.device("meta")) is router.rows  # no copy per layer
    router.rows = torch.tensor([1, 0])
    copy = router.rows_for(2, torch.device("meta"))
    assert copy.device.type == "meta"
    assert router.rows_for(2, torch.device("meta")) is copy  # one copy, shared by layers


# ----------------------------------------------------------------------------- generate


def _as_array(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def _subject_set(unet, seed: int) -> ScaleSet:
    table = ScaleTable(unet)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: 1 + 0.3 * torch.randn(shape, generator=generator)
        for name, shape in table.slot_shapes().items()
    }
    for name, layer in quantized_layers(unet).items():
        tensors[f"{name}.scale_out"] *= layer.scale0
    subjects = [{"subject_id": f"s{seed}", "token": "sks", "class_noun": "dog"}]
    return ScaleSet(tensors, "tuneqdm", N, 1000, unet.tuneqdm_base_fingerprint, subjects)


def test_generate_with_slots_matches_generate_with_scale_sets(tiny_base_dir):
    from tuneqdm.base import load_quantized_pipeline
    from tuneqdm.generate import generate

    pipe = load_quantized_pipeline(tiny_base_dir)
    pipe.set_progress_bar_config(disable=True)
    a, b = _subject_set(pipe.unet, 1), _subject_set(pipe.unet, 2)
    prompts = ["a photo of sks dog", "a photo of sks dog on the grass", "a sks dog"]
    kwargs = {"seed": [5, 6, 7], "num_inference_steps": 3, "num_images_per_prompt": 2}
    from_sets = _as_array(generate(pipe, prompts, [b, a, b], **kwargs))
    table = ScaleTable(pipe.unet)
    table.allocate(3, trainable=False)  # a bank of 3 slots: b in slot 2, a in slot 0
    table.write(2, b.tensors)
    table.write(0, a.tensors)
    from_slots = _as_array(generate(pipe, prompts, slots=[2, 0, 2], **kwargs))
    assert np.array_equal(from_slots, from_sets)
    assert get_router(pipe.unet).slots is None
    with pytest.raises(ValueError, match="2 slots for 3 prompts"):
        generate(pipe, prompts, slots=[0, 1])
    with pytest.raises(ValueError, match="scale_sets or slots, not both"):
        generate(pipe, prompts[:1], a, slots=[0])
    with pytest.raises(ValueError, match=r"slots \[3\] are invalid"):
        generate(pipe, prompts[:1], slots=[3])
    install_scale_sets(pipe.unet, [a])  # back to one trainable slot
    assert ScaleTable(pipe.unet).num_slots == 1
