"""Thousands of subjects (issue 12): what storage size and bank capacity cost a request.

One output folder holds the tiny test base and the largest number of subjects asked
for (synthetic scale sets written with pipeline.store.write_subject, exactly as
`submit` writes trained ones, 10,000 in about 40 s; serve_common.prepare_output).
Then, without Ray:

1. added latency per request: for each bank capacity C (16 .. 1,024) and each number
   of subjects n (1 .. 10,000), sequential single-image requests cycle over n subjects
   through an Engine whose bank has C slots, behind a host LRU of C loaded scale sets
   (Serve's multiplexed cache in a replica: a miss reads, checks and parses the
   subject's scale set from storage). Cycling is the LRU's worst case: with n > C
   every request misses. Reported against n = 1 at the same C; cases are interleaved
   request by request so machine load hits them alike. Besides the whole request's
   latency, each request times its serving path before the UNet (host LRU, storage
   read + checks on a miss, bank slot): the added work itself, which machine noise
   on a shared host does not drown as it does the difference of two medians;
2. memory per resident subject: the bank's table bytes / C, and a loaded scale set's
   host tensors, each against the subject's scales.safetensors bytes;
3. GET /v1/subjects?limit=100&offset=k over every subject, through the ingress's own
   backend (deploy.app.ServeBackend: SubjectCatalog) in-process (FastAPI TestClient):
   the first (cold) call, and warm calls at random offsets.

    nice .venv/bin/python benchmarks/serve_scale.py --root /tmp/scale --steps 1 \\
        --requests 20 --json outputs/serve_scale.json --plot docs/serve_scale.png  # docs
    .venv/bin/python benchmarks/serve_scale.py --quick      # seconds; run by the tests
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from serve_common import (
    machine_info,
    markdown_table,
    percentile,
    prepare_output,
    subject_ids,
    write_json,
)

SUBJECTS = (1, 10, 100, 1000, 10_000)
CAPACITIES = (16, 64, 256, 1024)


class _Replicas:
    """At one bank capacity: an engine per subject count, each behind its own host LRU
    (what Serve's multiplexed loader does), so the counts do not share a cache."""

    def __init__(self, store, ids: list[str], capacity: int, counts) -> None:
        from deploy.engine import Engine

        self.store, self.ids, self.capacity = store, ids, capacity
        self.engines = {n: Engine(store.local_base_path(), store.base.fingerprint, capacity)
                        for n in counts}
        self.caches: dict[int, OrderedDict] = {n: OrderedDict() for n in counts}
        self.loads = dict.fromkeys(counts, 0)

    def load(self, n: int, i: int):
        """The subject of request i, through the host LRU and into the bank."""
        from deploy.engine import LoadedSubject

        subject_id, cache, engine = self.ids[i % n], self.caches[n], self.engines[n]
        loaded = cache.get(subject_id)
        if loaded is None:  # the multiplexed loader: storage -> checked ScaleSet
            scale_set, info = self.store.read_scale_set(subject_id)
            engine.check_fits(scale_set)
            loaded = cache[subject_id] = LoadedSubject(info, scale_set)
            self.loads[n] += 1
            if len(cache) > self.capacity:
                cache.popitem(last=False)
        cache.move_to_end(subject_id)
        return loaded

    def one(self, n: int, i: int, params) -> float:
        """One request; returns the seconds of its serving-path work before the UNet
        (host LRU, storage on a miss, bank slot): the added latency itself."""
        from deploy.engine import GenerationRequest

        start = time.perf_counter()
        loaded = self.load(n, i)
        self.engines[n].bank.acquire([(loaded.key, loaded.scale_set)])  # run's is a hit
        overhead = time.perf_counter() - start
        self.engines[n].run([GenerationRequest(loaded, params)])
        return overhead

    def warm(self, n: int, params) -> None:
        """Every subject resident when they all fit (else cycling misses anyway)."""
        for i in range(n if n <= self.capacity else 0):
            loaded = self.load(n, i)
            self.engines[n].bank.acquire([(loaded.key, loaded.scale_set)])
        self.one(n, 0, params)


def latency_rows(output: Path, args) -> list[dict]:
    """One row per (capacity, subjects): median ms, p90 ms, added ms and % vs n = 1."""
    import torch

    from deploy.params import GenerationParams
    from deploy.store import SubjectStore

    torch.set_num_threads(args.threads)
    store = SubjectStore(str(output))
    ids = subject_ids(max(args.subjects))
    params = GenerationParams("a photo of sks dog", num_inference_steps=args.steps,
                              height=args.size, width=args.size)
    rows = []
    for capacity in args.capacities:
        replicas = _Replicas(store, ids, capacity, args.subjects)
        for n in args.subjects:
            replicas.warm(n, params)
        seconds = {n: [] for n in args.subjects}
        overheads = {n: [] for n in args.subjects}
        start_loads = dict(replicas.loads)
        for i in range(args.requests):
            for n in args.subjects:
                start = time.perf_counter()
                overheads[n].append(replicas.one(n, (n if n <= capacity else 1) + i, params))
                seconds[n].append(time.perf_counter() - start)
        baseline = statistics.median(seconds[args.subjects[0]])
        for n in args.subjects:
            median = statistics.median(seconds[n])
            rows.append({"capacity": capacity, "subjects": n, "requests": args.requests,
                         "median_ms": median * 1e3, "p90_ms": percentile(seconds[n], 90) * 1e3,
                         "added_ms": (median - baseline) * 1e3,
                         "added_percent": 100 * (median - baseline) / baseline,
                         "path_ms": statistics.median(overheads[n]) * 1e3,
                         "path_percent": 100 * statistics.median(overheads[n]) / baseline,
                         "loads_per_request":
                             (replicas.loads[n] - start_loads[n]) / args.requests})
        print(markdown_table(rows[-len(args.subjects):], LATENCY_COLUMNS), flush=True)
    return rows


def memory_rows(output: Path, capacities) -> list[dict]:
    """Bank bytes per slot and host bytes per loaded set, against the file's bytes."""
    from deploy.engine import Engine
    from deploy.store import SubjectStore

    store = SubjectStore(str(output))
    subject_id = subject_ids(1)[0]
    file_bytes = (output / "subjects" / subject_id / "scales.safetensors").stat().st_size
    scale_set, _ = store.read_scale_set(subject_id)
    host = sum(t.numel() * t.element_size() for t in scale_set.tensors.values())
    rows = []
    for capacity in capacities:
        engine = Engine(store.local_base_path(), store.base.fingerprint, capacity)
        tables = [getattr(layer, attr) for layer in engine.bank.table.layers.values()
                  for attr in ("scale_out", "scale_in") if getattr(layer, attr) is not None]
        device = sum(t.untyped_storage().nbytes() for t in tables)
        rows.append({"capacity": capacity, "file_bytes": file_bytes,
                     "bank_bytes_per_slot": device / capacity,
                     "bank_ratio": device / capacity / file_bytes,
                     "host_bytes_per_set": host, "host_ratio": host / file_bytes})
    return rows


def listing_rows(output: Path, requests: int, seed: int = 0) -> list[dict]:
    """GET /v1/subjects?limit=100 through the ingress's backend: cold, warm, stale."""
    from fastapi.testclient import TestClient

    from deploy.app import ServeBackend
    from deploy.http import create_api
    from deploy.params import Limits
    from deploy.store import SubjectStore

    backend = ServeBackend(None, SubjectStore(str(output)), ttl_s=10.0)
    rng = random.Random(seed)
    rows = []
    with TestClient(create_api(backend, Limits())) as client:
        def get(offset: int) -> tuple[float, dict]:
            start = time.perf_counter()
            response = client.get("/v1/subjects", params={"limit": 100, "offset": offset})
            elapsed = time.perf_counter() - start
            assert response.status_code == 200, response.text
            return elapsed, response.json()

        cold, body = get(0)
        total = body["total"]
        rows.append({"case": "first call (reads every subject)", "subjects": total,
                     "median_ms": cold * 1e3, "p90_ms": cold * 1e3})
        warm = [get(rng.randrange(0, max(1, total - 100)))[0] for _ in range(requests)]
        rows.append({"case": "cached listing, random pages", "subjects": total,
                     "median_ms": statistics.median(warm) * 1e3,
                     "p90_ms": percentile(warm, 90) * 1e3})
        backend.catalog.ttl_s = 0.001  # expired: answered from the cache, refreshed behind
        time.sleep(0.01)
        stale = [get(rng.randrange(0, max(1, total - 100)))[0] for _ in range(requests)]
        rows.append({"case": "expired listing (refresh in background)", "subjects": total,
                     "median_ms": statistics.median(stale) * 1e3,
                     "p90_ms": percentile(stale, 90) * 1e3})
    return rows


LATENCY_COLUMNS = [("capacity", "bank slots"), ("subjects", "subjects"),
                   ("requests", "requests"), ("median_ms", "median ms"), ("p90_ms", "p90 ms"),
                   ("added_ms", "added ms"), ("added_percent", "added %"),
                   ("path_ms", "serving path ms"), ("path_percent", "serving path %"),
                   ("loads_per_request", "loads / request")]
MEMORY_COLUMNS = [("capacity", "bank slots"), ("file_bytes", "scale-set file bytes"),
                  ("bank_bytes_per_slot", "bank bytes / slot"), ("bank_ratio", "bank / file"),
                  ("host_bytes_per_set", "host bytes / loaded set"), ("host_ratio", "host / file")]
LISTING_COLUMNS = [("case", "GET /v1/subjects?limit=100"), ("subjects", "subjects"),
                   ("median_ms", "median ms"), ("p90_ms", "p90 ms")]


def plot(rows: list[dict], path: Path) -> None:
    """Serving-path time (% of a one-subject request) against subjects, a line per
    capacity."""
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
        for capacity in sorted({r["capacity"] for r in rows}):
            mine = [r for r in rows if r["capacity"] == capacity]
            ax.plot([r["subjects"] for r in mine], [r["path_percent"] for r in mine],
                    marker="o", label=f"bank {capacity}")
        ax.set_xscale("log")
        ax.set_xlabel("subjects in storage (requests cycle over all)")
        ax.set_ylabel("serving path, % of a request")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        return
    from serve_scale_plot import draw_lines

    series = {f"bank {c}": [(r["subjects"], r["path_percent"]) for r in rows
                            if r["capacity"] == c]
              for c in sorted({r["capacity"] for r in rows})}
    draw_lines(series, path, "subjects in storage (log)", "serving path, % of a request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=list(SUBJECTS))
    parser.add_argument("--capacities", type=int, nargs="+", default=list(CAPACITIES))
    parser.add_argument("--requests", type=int, default=20, help="timed requests per case")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", help="folder for the output (reused); default: temporary")
    parser.add_argument("--quick", action="store_true", help="1, 10, 30 subjects, banks 4 "
                        "and 16, 3 requests of 1 step: a smoke run (the tests use it)")
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--plot", help="write the latency curve as a PNG")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.capacities, args.requests, args.steps = [1, 10, 30], [4, 16], 3, 1
    if args.subjects[0] != 1:
        parser.error("--subjects must start with 1 (the baseline)")
    with tempfile.TemporaryDirectory() as tmp:
        output = prepare_output(args.root or tmp, max(args.subjects))
        latency = latency_rows(output, args)
        memory = memory_rows(output, args.capacities)
        listing = listing_rows(output, args.requests)
    print(markdown_table(latency, LATENCY_COLUMNS))
    print(markdown_table(memory, MEMORY_COLUMNS))
    print(markdown_table(listing, LISTING_COLUMNS))
    write_json(args.json, {"machine": machine_info(), "args": vars(args),
                           "latency": latency, "memory": memory, "listing": listing})
    if args.plot:
        plot(latency, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
