"""benchmarks/serve_scale.py --quick runs end to end (so the benchmark cannot rot) and
its numbers mean what they say: misses only when the subjects outnumber the bank,
memory per resident subject at most its scale-set bytes, a paginated listing, and its
fast-written synthetic subjects are valid finished subjects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipeline.store import Storage, verify_subject

ROOT = Path(__file__).resolve().parents[2]


def test_serve_scale_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_scale.py"), "--quick",
         "--root", str(tmp_path), "--json", str(tmp_path / "scale.json"),
         "--plot", str(tmp_path / "scale.png")],
        env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    cases = {(r["capacity"], r["subjects"]): r for r in data["latency"]}
    assert set(cases) == {(c, n) for c in (4, 16) for n in (1, 10, 30)}
    for (capacity, subjects), row in cases.items():
        # cycling over more subjects than slots misses every time; else never
        assert row["loads_per_request"] == (1 if subjects > capacity else 0), row
        assert row["median_ms"] > 0 and row["requests"] == 3
        assert (row["added_ms"] == 0) == (subjects == 1)
    for row in data["memory"]:
        assert 0.5 < row["bank_ratio"] <= 1.1 and 0.5 < row["host_ratio"] <= 1.1, row
    listing = {r["case"]: r for r in data["listing"]}
    assert all(r["subjects"] == 30 for r in listing.values()) and len(listing) == 3
    with Image.open(tmp_path / "scale.png") as plot:
        assert plot.format == "PNG" and plot.width >= 300
    assert "| bank slots | subjects |" in result.stdout
    # the synthetic subjects (tensors drawn once per pool entry, written by threads) are
    # each a finished subject of their own that the store's verifier accepts
    storage = Storage(str(tmp_path / "out"))
    verdicts = [verify_subject(storage, f"subject-{i:03d}") for i in range(30)]
    assert all(v.done and v.scale_set.subject_ids == [v.subject_id] for v in verdicts)
    assert len({v.files["scales.safetensors"] for v in verdicts}) == 30
