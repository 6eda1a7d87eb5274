"""Side by side with the usual way: one LoRA (peft, r=4) per subject, switched per
request with diffusers' adapter loading and hot-swapping, against TuneQDM's scale bank,
same number of subjects (issue 5): swap latency, throughput, memory per resident
subject.

LoRA runs on the float tiny pipeline (LoRA's usual base; the same weights TuneQDM's
base quantizes), r=4 on the UNet attention projections (to_q, to_k, to_v, to_out.0),
adapters with random weights saved with `save_lora_weights`. Ways of switching:

- load per request: load_lora_weights(adapter i) + set_adapters, delete afterwards;
- hot swap: enable_lora_hotswap, then load_lora_weights(i, hotswap=True) into one slot;
- all resident: every adapter loaded once, set_adapters(i) per request.

LoRA adapters cannot share a UNet batch through diffusers' pipeline (one active
adapter set per call), so 8 requests for 8 subjects run as 8 calls; TuneQDM runs them
as one batch. Memory per resident subject is measured on the tiny UNet and computed
for SD v1.5 from its layer shapes.

    nice .venv/bin/python benchmarks/serve_lora.py --json outputs/serve_lora.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from serve_common import (
    SD15_UNET_CONFIG,
    machine_info,
    markdown_table,
    prepare_output,
    sd15_scale_skeleton,
    subject_ids,
    write_json,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _median_time(fn, repeat: int) -> float:
    seconds = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(i)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def make_adapters(pipe, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` LoRA adapters with random weights, saved the diffusers way."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                        init_lora_weights="gaussian")
    pipe.unet.add_adapter(config, adapter_name="maker")
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_" in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        state = get_peft_model_state_dict(pipe.unet, adapter_name="maker")
        path = folder / f"lora-{index:03d}"
        StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=state)
        paths.append(path)
    pipe.unet.delete_adapters("maker")
    return paths


def _load_per_request_ms(pipe, adapters: list[Path], repeat: int) -> float:
    """Median ms of load_lora_weights + set_adapters, the adapter deleted after each."""

    def load_per_request(i: int) -> None:
        pipe.load_lora_weights(adapters[i % len(adapters)], adapter_name="req")
        pipe.set_adapters("req")

    swap = []
    for i in range(repeat):
        start = time.perf_counter()
        load_per_request(i)
        swap.append(time.perf_counter() - start)
        pipe.delete_adapters("req")
    return statistics.median(swap) * 1e3


def _hot_swap(pipe, adapters: list[Path], generate, args) -> tuple[float, float, float]:
    """Hot swapping into one loaded adapter slot: (median swap s, median request s with
    the LoRA on, s for `args.concurrency` requests for as many subjects, one adapter per
    call). The LoRA weights are unloaded afterwards."""
    pipe.enable_lora_hotswap(target_rank=args.rank)
    pipe.load_lora_weights(adapters[0], adapter_name="slot")
    hot = _median_time(lambda i: pipe.load_lora_weights(
        adapters[(i + 1) % len(adapters)], adapter_name="slot", hotswap=True), args.repeat)
    generate()
    with_lora = _median_time(lambda i: generate(), args.repeat)
    # 8 requests for 8 subjects: one adapter per call
    start = time.perf_counter()
    for i in range(args.concurrency):
        pipe.load_lora_weights(adapters[i + 1], adapter_name="slot", hotswap=True)
        generate()
    eight = time.perf_counter() - start
    pipe.unload_lora_weights()
    return hot, with_lora, eight


def _all_resident(pipe, adapters: list[Path], repeat: int) -> tuple[float, float]:
    """Every adapter loaded once: (median s of set_adapters per request, UNet parameter
    bytes added per adapter)."""
    before = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    for index, path in enumerate(adapters):
        pipe.load_lora_weights(path, adapter_name=f"s{index}")
    after = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    per_subject = (after - before) / len(adapters)
    switch = _median_time(lambda i: pipe.set_adapters(f"s{i % len(adapters)}"), repeat)
    return switch, per_subject


def lora_rows(source: Path, args) -> tuple[list[dict], dict]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": args.steps, "height": args.size, "width": args.size,
              "guidance_scale": 7.5}
    facts = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(pipe, Path(tmp), args.subjects, args.rank)

        def generate(batch: int = 1) -> None:
            pipe(["a photo of sks dog"] * batch, **kwargs,
                 generator=torch.Generator().manual_seed(0))

        # float pipeline, no adapter: the request itself
        generate()
        facts["float_request_s"] = _median_time(lambda i: generate(), args.repeat)
        per_request_ms = _load_per_request_ms(pipe, adapters, args.repeat)  # 1.
        hot, with_lora, eight = _hot_swap(pipe, adapters, generate, args)  # 2.
        facts["lora_request_s"] = with_lora
        switch, per_subject = _all_resident(pipe, adapters, args.repeat)  # 3.
    rows = [
        {"method": "LoRA r=4", "switch": "load_lora_weights per request",
         "swap_ms": per_request_ms},
        {"method": "LoRA r=4", "switch": "hot swap (hotswap=True)", "swap_ms": hot * 1e3},
        {"method": "LoRA r=4", "switch": f"all {len(adapters)} resident, set_adapters",
         "swap_ms": switch * 1e3, "bytes_per_subject": int(per_subject)},
    ]
    for row in rows:
        row["request_s"] = with_lora
        row["swap_percent"] = 100 * row["swap_ms"] / 1e3 / with_lora
        row["eight_subjects_images_per_s"] = args.concurrency / eight
    return rows, facts


def tuneqdm_rows(output: Path, args) -> list[dict]:
    from deploy.engine import Engine, GenerationRequest, LoadedSubject
    from deploy.params import GenerationParams
    from deploy.store import SubjectStore

    store = SubjectStore(str(output))
    ids = subject_ids(args.subjects)
    loaded = []
    for subject_id in ids:
        scale_set, info = store.read_scale_set(subject_id)
        loaded.append(LoadedSubject(info, scale_set))
    engine = Engine(store.local_base_path(), store.base.fingerprint,
                    capacity=len(ids) + 1)
    params = GenerationParams("a photo of sks dog", num_inference_steps=args.steps,
                              height=args.size, width=args.size)
    engine.run([GenerationRequest(loaded[0], params)])
    request = _median_time(lambda i: engine.run([GenerationRequest(loaded[0], params)]),
                           args.repeat)
    small = Engine(store.local_base_path(), store.base.fingerprint, capacity=1)

    def reload(i: int) -> None:  # storage -> checked set -> rows copied into the slot
        scale_set, _ = store.read_scale_set(ids[(i + 1) % len(ids)])
        small.check_fits(scale_set)
        small.bank.acquire([((ids[i % len(ids)], i), scale_set)])

    from_storage = _median_time(reload, args.repeat)
    copy = _median_time(lambda i: small.bank.acquire(
        [((i, "copy"), loaded[i % len(ids)].scale_set)]), args.repeat)
    for subject in loaded:  # every subject resident
        engine.bank.acquire([(subject.key, subject.scale_set)])
    hit = _median_time(lambda i: engine.bank.acquire(
        [(loaded[i % len(ids)].key, loaded[i % len(ids)].scale_set)]), args.repeat)
    mixed = [GenerationRequest(loaded[i], GenerationParams(
        "a photo of sks dog", seed=i, num_inference_steps=args.steps, height=args.size,
        width=args.size)) for i in range(args.concurrency)]
    engine.run(mixed)
    eight = _median_time(lambda i: engine.run(mixed), max(3, args.repeat // 4))
    common = {"method": "TuneQDM N=4, 4-bit", "request_s": request,
              "eight_subjects_images_per_s": args.concurrency / eight}
    rows = [
        {**common, "switch": "load from storage per request", "swap_ms": from_storage * 1e3},
        {**common, "switch": "bank slot write (set in host memory)", "swap_ms": copy * 1e3},
        {**common, "switch": f"all {len(ids)} resident (slot index)", "swap_ms": hit * 1e3,
         "bytes_per_subject": engine.bank.bytes_per_slot},
    ]
    for row in rows:
        row["swap_percent"] = 100 * row["swap_ms"] / 1e3 / request
    return rows


def sd15_sizes(rank: int) -> dict:
    """Numbers per resident subject at SD v1.5 shapes (computed, no weights)."""
    from diffusers import UNet2DConditionModel
    from torch import nn

    from tuneqdm.model import quantized_layers
    from tuneqdm.scaleset import expected_shapes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    lora = sum(rank * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in TARGETS))
    skeleton = sd15_scale_skeleton(4)
    scales = sum(a * b for a, b in expected_shapes(skeleton).values())
    peqa = sum(layer.out_features for layer in quantized_layers(skeleton).values())
    return {"sd15_lora_r4_attention_numbers": lora, "sd15_lora_r4_fp32_bytes": 4 * lora,
            "sd15_tuneqdm_n4_numbers": scales, "sd15_tuneqdm_n4_fp32_bytes": 4 * scales,
            "sd15_peqa_numbers": peqa, "sd15_peqa_fp32_bytes": 4 * peqa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/serve-bench")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: 2 threads oversubscribe a shared 2-core machine)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    output = prepare_output(args.workdir, args.subjects)
    lora, facts = lora_rows(Path(args.workdir) / "tiny-sd", args)
    rows = lora + tuneqdm_rows(output, args)
    facts.update(sd15_sizes(args.rank))
    columns = [("method", "method"), ("switch", "switch"), ("swap_ms", "swap ms"),
               ("request_s", "request s"), ("swap_percent", "swap % of request"),
               ("eight_subjects_images_per_s", "8 subjects: images/s"),
               ("bytes_per_subject", "bytes per resident subject")]
    print(f"\nLoRA vs TuneQDM: tiny UNet, {args.subjects} subjects, {args.size} px, "
          f"{args.steps} steps, guidance 7.5, {args.threads} threads\n")
    print(markdown_table(rows, columns))
    print("\n" + "\n".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v:.4g}"
                           for k, v in facts.items()))
    write_json(args.json, {"benchmark": "serve_lora", "args": vars(args), "rows": rows,
                           "facts": facts, "machine": machine_info()})


if __name__ == "__main__":
    main()
