"""benchmarks/optimizer_step.py: it times the loop's real trainable tensors, each
variant steps its own copy, and the two variants agree bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from tuneqdm.testing import load_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]


def test_groups_are_the_methods_trainable_tensors_with_gradients():
    bench = load_script(ROOT / "benchmarks" / "optimizer_step.py")
    unet = UNet2DConditionModel.from_pretrained(ROOT / "models" / "toyworld-base",
                                                subfolder="unet")
    peqa = [p for g in bench.method_groups(unet, "peqa-n1-w4") for p in g["params"]]
    tuneqdm = bench.method_groups(unet, "tuneqdm-n4-w4")
    # PEQA: one s_out per layer; TuneQDM: an s_out group and an s_in group
    assert len(tuneqdm) == 2 and len(peqa) == len(tuneqdm[0]["params"])
    assert all(p.grad is not None and p.grad.shape == p.shape for p in peqa)
    # each variant steps its own clone: the clones move, the originals do not
    groups = bench.clone_groups(tuneqdm)
    before = [p.detach().clone() for g in tuneqdm for p in g["params"]]
    bench.optimiser_step(groups, True)()
    after = [p for g in groups for p in g["params"]]
    originals = [p for g in tuneqdm for p in g["params"]]
    assert all(torch.equal(a, p) for a, p in zip(before, originals, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert bench.bit_equal(tuneqdm, steps=3)


def test_main_prints_and_writes_the_table(tmp_path, capsys):
    bench = load_script(ROOT / "benchmarks" / "optimizer_step.py")
    out = tmp_path / "opt.json"
    assert bench.main(["--methods", "peqa-n1-w4", "--rounds", "2", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert [row["method"] for row in written["table"]] == ["peqa-n1-w4"]
    assert written["table"][0]["bit_equal"] is True
    assert written["table"][0]["tensors"] > 100
    assert "foreach ms/step" in capsys.readouterr().out
