"""Mixed batches: throughput of 8 concurrent requests for 8 different subjects against 8
for one subject (issue 5; target: at least 0.9 of it).

1. engine (one process): one UNet batch of 8 requests, 8 subjects vs 1 subject, and
   for reference the same 8 requests one at a time;
2. HTTP through Serve on 127.0.0.1, one replica (batch up to 8): rounds of 8
   concurrent requests, 8 subjects vs 1 subject; the batch sizes the replica formed
   are read from the X-Batch-Images header.

    nice .venv/bin/python benchmarks/serve_mixed.py --json outputs/serve_mixed.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from serve_common import (
    local_serve,
    machine_info,
    markdown_table,
    prepare_output,
    subject_ids,
    write_json,
)


def engine_rows(output, args) -> list[dict]:
    import torch

    from deploy.engine import Engine, GenerationRequest, LoadedSubject
    from deploy.params import GenerationParams
    from deploy.store import SubjectStore

    torch.set_num_threads(args.threads)
    store = SubjectStore(str(output))
    engine = Engine(store.local_base_path(), store.base.fingerprint, capacity=16)
    ids = subject_ids(args.concurrency)
    loaded = []
    for subject_id in ids:
        scale_set, info = store.read_scale_set(subject_id)
        loaded.append(LoadedSubject(info, scale_set))
    params = [GenerationParams("a photo of sks dog", seed=i, num_inference_steps=args.steps,
                               height=args.size, width=args.size)
              for i in range(args.concurrency)]
    cases = {
        "mixed": [GenerationRequest(s, p) for s, p in zip(loaded, params, strict=True)],
        "same": [GenerationRequest(loaded[0], p) for p in params],
    }
    engine.run(cases["mixed"])  # warm: every subject resident, kernels warm

    def batch_seconds(requests) -> float:
        start = time.perf_counter()
        engine.run(requests)
        return time.perf_counter() - start

    def sequential_seconds(requests) -> float:
        start = time.perf_counter()
        for request in requests:
            engine.run([request])
        return time.perf_counter() - start

    rows = []
    timings = {name: [] for name in ("mixed", "same")}
    for _ in range(args.rounds):  # interleaved, so machine load hits both alike
        for name in ("mixed", "same"):
            timings[name].append(batch_seconds(cases[name]))
    for name, label in (("same", f"{args.concurrency} requests, 1 subject"),
                        ("mixed", f"{args.concurrency} requests, "
                                  f"{args.concurrency} subjects")):
        seconds = statistics.median(timings[name])
        rows.append({"layer": "engine, one UNet batch", "case": label,
                     "images_per_s": args.concurrency / seconds, "round_s": seconds})
    seq = statistics.median(sequential_seconds(cases["mixed"]) for _ in range(2))
    rows.append({"layer": "engine, one at a time", "case": f"{args.concurrency} requests, "
                 f"{args.concurrency} subjects", "images_per_s": args.concurrency / seq,
                 "round_s": seq})
    rows[1]["ratio"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return rows


async def _round(client: httpx.AsyncClient, subjects: list[str], steps: int, size: int):
    body = {"prompt": "a photo of {token} {class_noun}", "num_inference_steps": steps,
            "height": size, "width": size}
    start = time.perf_counter()
    responses = await asyncio.gather(*[
        client.post(f"/v1/subjects/{s}/images", json={**body, "seed": i})
        for i, s in enumerate(subjects)])
    seconds = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    return seconds, [int(r.headers["x-batch-images"]) for r in responses]


def http_rows(output, args) -> list[dict]:
    ids = subject_ids(args.concurrency)
    cases = {"same": [ids[0]] * args.concurrency, "mixed": ids}
    timings = {name: [] for name in cases}
    batches = {name: [] for name in cases}
    with local_serve(output, port=args.port, replicas=1, num_cpus_per_replica=1.8,
                     torch_threads=args.threads, max_subjects_per_replica=16,
                     max_batch_images=args.concurrency, limits={"max_side": 256}) as url:
        async def run() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                await _round(client, ids, args.steps, args.size)  # warm: load subjects
                for _ in range(args.rounds):
                    for name, subjects in cases.items():
                        seconds, sizes = await _round(client, subjects, args.steps, args.size)
                        timings[name].append(seconds)
                        batches[name] += sizes

        asyncio.run(run())
    rows = []
    for name, label in (("same", f"{args.concurrency} concurrent, 1 subject"),
                        ("mixed", f"{args.concurrency} concurrent, "
                                  f"{args.concurrency} subjects")):
        seconds = statistics.median(timings[name])
        rows.append({"layer": "HTTP via Serve, 1 replica", "case": label,
                     "images_per_s": args.concurrency / seconds, "round_s": seconds,
                     "mean_batch": statistics.mean(batches[name])})
    rows[1]["ratio"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/serve-bench")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: 2 threads oversubscribe a shared 2-core machine)")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    output = prepare_output(args.workdir, max(args.subjects, args.concurrency))
    rows = engine_rows(output, args)
    if not args.skip_http:
        rows += http_rows(output, args)
    columns = [("layer", "layer"), ("case", "case"), ("images_per_s", "images/s"),
               ("round_s", "s per round"), ("mean_batch", "mean batch"),
               ("ratio", "mixed / same")]
    print(f"\nmixed batches: tiny UNet, {args.size} px, {args.steps} steps, guidance 7.5, "
          f"{args.threads} threads, median of {args.rounds} rounds\n")
    print(markdown_table(rows, columns))
    write_json(args.json, {"benchmark": "serve_mixed", "args": vars(args), "rows": rows,
                           "machine": machine_info()})


if __name__ == "__main__":
    main()
