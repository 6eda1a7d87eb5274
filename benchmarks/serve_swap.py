"""Swap cost: requests cycling over 100 subjects against requests for one subject,
on the same replica (issue 5; target: added latency under 1% of a request's time).

Three layers, each timed on sequential requests (no batching effects):

1. engine (one process, no Serve): one subject / 100 resident in a bank of 128 (a swap
   is an index) / 100 through a bank of 8 (every request copies its rows into a slot)
   / 100 reloaded from storage every time (read, sha256, parse, check, copy);
2. HTTP through Serve on 127.0.0.1, one replica: one subject / 100 subjects with 128
   resident / 100 with 8 resident (Serve's multiplexed LRU reloads from storage);
3. the swap's pieces at SD v1.5 size (612,744 scales per expert, N=4, 9.8 MB fp32):
   row copy into a bank slot, parse + checks, storage read + sha256. No forward pass.

    nice .venv/bin/python benchmarks/serve_swap.py --json outputs/serve_swap.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from serve_common import (
    local_serve_apps,
    machine_info,
    markdown_table,
    percentile,
    prepare_output,
    sd15_scale_skeleton,
    subject_ids,
    write_json,
)


def _summary(name: str, seconds: list[float], baseline: float | None) -> dict:
    median = statistics.median(seconds)
    row = {"case": name, "requests": len(seconds), "median_ms": median * 1e3,
           "p90_ms": percentile(seconds, 90) * 1e3}
    if baseline is not None:
        row["added_ms"] = (median - baseline) * 1e3
        row["added_percent"] = 100 * (median - baseline) / baseline
    return row


def _engine_case_fns(store, ids: list[str], loaded: dict, params, big, small) -> dict:
    """The four engine cases by name, each a function of the request index: one subject,
    all resident in `big`, through the 8-slot `small` bank, reloaded from storage."""
    from deploy.engine import GenerationRequest, LoadedSubject

    def one(i: int) -> None:
        big.run([GenerationRequest(loaded[ids[0]], params)])

    def resident(i: int) -> None:
        big.run([GenerationRequest(loaded[ids[i % len(ids)]], params)])

    def small_bank(i: int) -> None:
        small.run([GenerationRequest(loaded[ids[i % len(ids)]], params)])

    def from_storage(i: int) -> None:
        scale_set, info = store.read_scale_set(ids[i % len(ids)])
        small.check_fits(scale_set)
        small.run([GenerationRequest(LoadedSubject(info, scale_set), params)])

    return {"engine: one subject": one,
            f"engine: {len(ids)} subjects, all resident (bank 128)": resident,
            f"engine: {len(ids)} subjects, bank 8 (rows copied per request)": small_bank,
            f"engine: {len(ids)} subjects, reloaded from storage each time": from_storage}


def _engine_pieces(store, ids: list[str], loaded: dict, big, small, baseline: float,
                   requests: int) -> list[dict]:
    """The swap's pieces on their own (the differences between the engine cases are
    within the noise), each as a percentage of the one-subject request `baseline` (s)."""
    rows = []

    def piece(name: str, fn) -> None:
        values = []
        for i in range(requests):
            start = time.perf_counter()
            fn(i)
            values.append(time.perf_counter() - start)
        row = _summary(f"tiny: {name}", values, None)
        row["added_percent"] = 100 * row["median_ms"] / 1e3 / baseline
        rows.append(row)

    piece("copy rows into a bank slot", lambda i: small.bank.acquire(
        [((i, "piece"), loaded[ids[i % len(ids)]].scale_set)]))
    piece("slot lookup, subject resident", lambda i: big.bank.acquire(
        [(loaded[ids[i % len(ids)]].key, loaded[ids[i % len(ids)]].scale_set)]))
    piece("read + sha256 + parse + check_fits from storage",
          lambda i: small.check_fits(store.read_scale_set(ids[i % len(ids)])[0]))
    rows[-1]["bytes"] = small.bank.bytes_per_slot
    return rows


def engine_cases(output: Path, args) -> list[dict]:
    """The four engine cases, interleaved request by request (machine load then hits
    every case alike)."""
    import torch

    from deploy.engine import Engine, LoadedSubject
    from deploy.params import GenerationParams
    from deploy.store import SubjectStore

    torch.set_num_threads(args.threads)
    store = SubjectStore(str(output))
    ids = subject_ids(args.subjects)
    loaded = {}
    for subject_id in ids:
        scale_set, info = store.read_scale_set(subject_id)
        loaded[subject_id] = LoadedSubject(info, scale_set)
    params = GenerationParams("a photo of sks dog", num_inference_steps=args.steps,
                              height=args.size, width=args.size, guidance_scale=7.5)
    big = Engine(store.local_base_path(), store.base.fingerprint, capacity=128)
    small = Engine(store.local_base_path(), store.base.fingerprint, capacity=8)
    for subject_id in ids:  # warm: every subject resident in the big bank
        big.bank.acquire([(loaded[subject_id].key, loaded[subject_id].scale_set)])

    cases = _engine_case_fns(store, ids, loaded, params, big, small)
    for fn in cases.values():
        fn(0)
    seconds = {name: [] for name in cases}
    writes = small.bank.writes
    for i in range(args.requests):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn(i + 1)
            seconds[name].append(time.perf_counter() - start)
    baseline = statistics.median(seconds["engine: one subject"])
    rows = [_summary(name, values, None if name == "engine: one subject" else baseline)
            for name, values in seconds.items()]
    rows[2]["bank_writes"] = small.bank.writes - writes
    return rows + _engine_pieces(store, ids, loaded, big, small, baseline, args.requests)


def http_cases(output: Path, args) -> list[dict]:
    """One Serve, two apps of one replica each: /big (128 resident) and /small (8),
    requests interleaved one at a time."""
    ids = subject_ids(args.subjects)
    body = {"prompt": "a photo of {token} {class_noun}", "num_inference_steps": args.steps,
            "height": args.size, "width": args.size, "seed": 0}
    common = {"replicas": 1, "num_cpus_per_replica": 0.9, "torch_threads": args.threads,
              "limits": {"max_side": 256}}
    apps = {"/big": {**common, "max_subjects_per_replica": 128},
            "/small": {**common, "max_subjects_per_replica": 8}}
    with local_serve_apps(output, apps, port=args.port) as url, \
            httpx.Client(base_url=url, timeout=300) as client:
        def post(prefix: str, subject_id: str) -> None:
            response = client.post(f"{prefix}/v1/subjects/{subject_id}/images", json=body)
            response.raise_for_status()

        for subject_id in ids:  # warm: all loaded into the big replica
            post("/big", subject_id)
        post("/small", ids[0])
        cases = {"HTTP: one subject": lambda i: post("/big", ids[0]),
                 f"HTTP: {len(ids)} subjects, 128 resident per replica":
                     lambda i: post("/big", ids[i % len(ids)]),
                 f"HTTP: {len(ids)} subjects, 8 resident (reload from storage)":
                     lambda i: post("/small", ids[i % len(ids)])}
        seconds = {name: [] for name in cases}
        for i in range(args.requests):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn(i + 1)
                seconds[name].append(time.perf_counter() - start)
    baseline = statistics.median(seconds["HTTP: one subject"])
    return [_summary(name, values, None if name == "HTTP: one subject" else baseline)
            for name, values in seconds.items()]


def sd15_pieces(args) -> list[dict]:
    """Swap pieces at SD v1.5 size; 'of request' columns are left empty (no SD forward
    on this CPU)."""
    import hashlib

    import torch

    from deploy.bank import ScaleBank
    from tuneqdm.scaleset import ScaleSet, expected_shapes

    torch.set_num_threads(args.threads)
    unet = sd15_scale_skeleton(num_experts=4)
    generator = torch.Generator().manual_seed(0)
    sets = []
    for index in range(4):
        tensors = {name: 1 + 0.05 * torch.randn(shape, generator=generator)
                   for name, shape in expected_shapes(unet).items()}
        sets.append(ScaleSet(tensors, "tuneqdm", 4, 1000, "sd15-skeleton",
                             subjects=[{"subject_id": f"s{index}"}]))
    data = sets[0].to_bytes()
    bank = ScaleBank(unet, capacity=8)
    rows = []

    def time_it(name: str, fn, repeat: int = 20) -> None:
        fn()
        seconds = []
        for i in range(repeat):
            start = time.perf_counter()
            fn(i)
            seconds.append(time.perf_counter() - start)
        rows.append({"case": f"SD v1.5 size: {name}", "requests": repeat,
                     "median_ms": statistics.median(seconds) * 1e3,
                     "p90_ms": percentile(seconds, 90) * 1e3})

    counter = iter(range(10**9))
    time_it("copy rows into a bank slot (9.8 MB)",
            lambda i=0: bank.acquire([(next(counter), sets[i % 4])]))
    time_it("slot lookup, subject resident",
            lambda i=0: bank.acquire([("resident", sets[0])]))
    time_it("parse safetensors + check_fits", lambda i=0: ScaleSet.from_bytes(data).check_fits(
        unet))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scales.safetensors"
        path.write_bytes(data)
        time_it("read file + sha256", lambda i=0: hashlib.sha256(path.read_bytes()).hexdigest())
    rows.append({"case": "SD v1.5 size: bank bytes per resident subject",
                 "requests": "", "median_ms": "", "p90_ms": "",
                 "bytes": bank.bytes_per_slot})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/serve-bench")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: 2 threads oversubscribe a shared 2-core machine)")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    output = prepare_output(args.workdir, args.subjects)
    rows = engine_cases(output, args)
    if not args.skip_http:
        rows += http_cases(output, args)
    rows += sd15_pieces(args)
    columns = [("case", "case"), ("requests", "n"), ("median_ms", "median ms"),
               ("p90_ms", "p90 ms"), ("added_ms", "added ms"),
               ("added_percent", "added % of request"), ("bank_writes", "row copies"),
               ("bytes", "bytes per subject")]
    print(f"\nswap cost: tiny UNet, {args.size} px, {args.steps} steps, guidance 7.5, "
          f"{args.threads} threads\n")
    print(markdown_table(rows, columns))
    write_json(args.json, {"benchmark": "serve_swap", "args": vars(args), "rows": rows,
                           "machine": machine_info()})


if __name__ == "__main__":
    main()
