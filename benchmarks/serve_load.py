"""Load test: 64 concurrent clients, mixed subjects, 60 s, HTTP on 127.0.0.1 (issue 5):
errors, p50/p99 latency, throughput.

Serve runs on a local Ray (2 CPUs): two model replicas (0.9 CPU, one torch thread
each), 32 resident subjects per replica out of 100, batches of up to 8 images. Each
client sends one request at a time for a random subject with a random seed, for
`--seconds`; requests in flight at the end are awaited and counted.

    nice .venv/bin/python benchmarks/serve_load.py --json outputs/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter

import httpx
from serve_common import (
    local_serve,
    machine_info,
    markdown_table,
    percentile,
    prepare_output,
    replica_stats,
    subject_ids,
    write_json,
)


async def client_loop(client: httpx.AsyncClient, ids: list[str], stop_at: float,
                      rng: random.Random, args, log: list[dict]) -> None:
    while time.monotonic() < stop_at:
        subject = rng.choice(ids)
        body = {"prompt": "a photo of {token} {class_noun}", "seed": rng.randrange(10**9),
                "num_inference_steps": args.steps, "height": args.size, "width": args.size}
        start = time.monotonic()
        try:
            response = await client.post(f"/v1/subjects/{subject}/images", json=body)
            status = response.status_code
            batch = int(response.headers.get("x-batch-images", 0))
            loaded = response.headers.get("x-scale-set") == "loaded"
        except httpx.HTTPError as err:
            status, batch, loaded = type(err).__name__, 0, False
        log.append({"status": status, "seconds": time.monotonic() - start, "batch": batch,
                    "loaded": loaded, "end": time.monotonic()})


async def run_load(url: str, args) -> tuple[list[dict], float]:
    ids = subject_ids(args.subjects)
    log: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + 8,
                          max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        warm = await client.post(f"/v1/subjects/{ids[0]}/images",
                                 json={"prompt": "x", "num_inference_steps": args.steps,
                                       "height": args.size, "width": args.size})
        warm.raise_for_status()
        start = time.monotonic()
        stop_at = start + args.seconds
        await asyncio.gather(*[
            client_loop(client, ids, stop_at, random.Random(index), args, log)
            for index in range(args.clients)])
        return log, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/serve-bench")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--resident", type=int, default=32)
    parser.add_argument("--port", type=int, default=8792)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    output = prepare_output(args.workdir, args.subjects)
    with local_serve(output, port=args.port, replicas=args.replicas,
                     num_cpus_per_replica=round(1.8 / args.replicas, 2), torch_threads=1,
                     max_subjects_per_replica=args.resident, max_batch_images=8,
                     max_queued_images=64, max_ongoing_requests=64) as url:
        log, wall = asyncio.run(run_load(url, args))
        stats = replica_stats()
    ok = [r for r in log if r["status"] == 200]
    latencies = [r["seconds"] for r in ok]
    statuses = Counter(str(r["status"]) for r in log)
    row = {
        "clients": args.clients, "seconds": round(wall, 1), "requests": len(log),
        "ok": len(ok), "errors": len(log) - len(ok),
        "p50_s": percentile(latencies, 50), "p90_s": percentile(latencies, 90),
        "p99_s": percentile(latencies, 99), "max_s": max(latencies, default=float("nan")),
        "requests_per_s": len(ok) / wall,
        "mean_batch": statistics.mean(r["batch"] for r in ok) if ok else float("nan"),
        "loaded_share": sum(r["loaded"] for r in ok) / max(1, len(ok)),
    }
    columns = [("clients", "clients"), ("seconds", "s"), ("requests", "requests"),
               ("errors", "errors"), ("p50_s", "p50 s"), ("p90_s", "p90 s"),
               ("p99_s", "p99 s"), ("requests_per_s", "req/s"), ("mean_batch", "mean batch"),
               ("loaded_share", "share loading a scale set")]
    print(f"\nload test: {args.clients} clients, {args.subjects} subjects, {args.replicas} "
          f"replicas x {args.resident} resident, {args.size} px, {args.steps} steps, "
          f"guidance 7.5\n")
    print(markdown_table([row], columns))
    print(f"statuses: {dict(statuses)}")
    for replica in stats:
        print(f"replica {replica['replica']}: {replica['images']} images in "
              f"{replica['batches']} batches (largest {replica['largest_batch']}), "
              f"{replica['loads']} scale-set loads, {replica['bank_writes']} slot writes")
    write_json(args.json, {"benchmark": "serve_load", "args": vars(args), "result": row,
                           "statuses": dict(statuses), "replicas": stats,
                           "machine": machine_info()})


if __name__ == "__main__":
    main()
