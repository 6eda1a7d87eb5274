"""End-to-end run of the library on embedded defaults (no GPU, no network).

Builds a tiny Stable-Diffusion-shaped pipeline offline, quantizes its UNet to 4 bits
once, fine-tunes TuneQDM scales (N = 4 experts) on one real DreamBooth subject, and
writes the scale set and generated images to the output folder.

    python scripts/quickstart.py --out outputs/quickstart
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tuneqdm import QuantConfig
from tuneqdm.base import load_quantized_pipeline, quantize_pipeline
from tuneqdm.data import Subject, load_image_folder
from tuneqdm.generate import generate
from tuneqdm.testing import save_tiny_pipeline
from tuneqdm.train import TrainConfig, finetune

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "quickstart"))
    parser.add_argument("--subject", default=str(ROOT.parent / "shared" / "dreambooth" / "dog"))
    parser.add_argument("--class-noun", default="dog")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    float_dir = out / "tiny-float"
    if not (float_dir / "model_index.json").exists():
        save_tiny_pipeline(float_dir)
    config = QuantConfig(bits=4, method="tuneqdm", num_experts=4)
    info = quantize_pipeline(float_dir, out / "base", config)
    print(
        f"quantized base: {len(info['layers'])} layers, {info['unet_tensor_bytes']:,} bytes, "
        f"fingerprint {info['fingerprint'][:12]}"
    )
    pipe = load_quantized_pipeline(out / "base")
    subject = Subject("quickstart-dog", load_image_folder(args.subject), args.class_noun)
    result = finetune(
        pipe, [subject], TrainConfig(steps=args.steps, batch_size=2, lr_scale_out=1e-3, seed=0)
    )
    path = result.scale_set.save(out / "scales.safetensors")
    print(
        f"trained {result.trainable_numbers:,} scales in {result.seconds:.1f} s: loss "
        f"{result.losses[0]:.3f} -> {result.final_loss:.3f}; scale set {path} "
        f"({path.stat().st_size:,} bytes)"
    )
    images = generate(
        pipe, [subject.instance_prompt], result.scale_set, seed=0, num_inference_steps=20
    )
    images[0].save(out / "sample.png")
    print(f"image: {out / 'sample.png'}; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
