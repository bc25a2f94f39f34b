"""Ray Serve app vs the in-process pipeline, side by side in one run (tiny preset, CPU).

    python benchmarks/serve_bench.py                 # --requests 60 --seconds 15 --checkpoint (seeded tiny)
    python benchmarks/serve_bench.py --smoke         # < 1 min: 2 requests per variant, 1 s per level

Measures, alternating the variants request by request so that load from elsewhere hits both alike:
1. latency at concurrency 1: HTTP end to end (POST /v1/segment) vs `Segmenter.segment` in this
   process on the same encoded bytes (goal: Serve p50 ≤ 1.25× in-process);
2. throughput at concurrency 1, 4 and 16 HTTP clients (goal: 16 ≥ 1.8× of 1);
3. SAM encoding beside the MLLM vs before it, through the ingress handle (goal: ≤ 0.8×);
4. SAM embedding cache hit vs miss (same image again vs a new one), over HTTP.
Every request uses a new image unless it measures a cache hit. Replicas: one of each deployment
(2 cores), one intra-op thread each, as in-process.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

EXPR = "the red block on the left"


def image_bytes(i: int, h: int = 480, w: int = 640) -> bytes:
    """A distinct JPEG per i (RefCOCO-sized): two coloured blocks on a noisy background."""
    rng = np.random.default_rng(i)
    img = rng.integers(80, 140, size=(h, w, 3), dtype=np.uint8)
    for _ in range(2):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def post(url: str, data: bytes, expr: str = EXPR) -> dict:
    r = requests.post(
        f"{url}/v1/segment", json={"image": base64.b64encode(data).decode(), "expression": expr}, timeout=120
    )
    r.raise_for_status()
    return r.json()


def run_clients(url: str, conc: int, seconds: float, payloads: list[bytes]) -> tuple[float, list[int]]:
    """`conc` clients post one new image after another for `seconds`: (requests/s, MLLM batch sizes)."""
    it = iter(payloads)
    stop = time.perf_counter() + seconds
    batches: list[int] = []

    def client(_: int) -> int:
        n = 0
        while time.perf_counter() < stop:
            batches.append(post(url, next(it))["batch_sizes"]["mllm"])
            n += 1
        return n

    t = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        done = sum(pool.map(client, range(conc)))
    return done / (time.perf_counter() - t), batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: a seeded random tiny checkpoint")
    ap.add_argument("--requests", type=int, default=60, help="per variant, for latency comparisons")
    ap.add_argument("--seconds", type=float, default=15.0, help="per concurrency level, for throughput")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): 2 requests per variant, 1 s per concurrency level",
    )
    a = ap.parse_args()
    if a.smoke:
        a.requests, a.seconds = 2, 1.0

    import ray
    from ray import serve

    from ppcr.checkpoint import save_checkpoint
    from ppcr.config import load_config
    from ppcr.model import PPCRModel
    from ppcr.predictor import Segmenter
    from ppcr.serve import free_port, start, wait_healthy

    torch.set_num_threads(1)  # the replicas' setting (ServeSettings.torch_threads)
    ckpt = a.checkpoint
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = save_checkpoint(PPCRModel(load_config("tiny").model), Path(tempfile.mkdtemp()) / "ckpt")
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    url = start(
        {"checkpoint": str(ckpt)},
        port=free_port(),
        name="bench",
        num_cpus=4,
        options={"Ingress": one, "MLLM": one, "SAM": one},
    )
    wait_healthy(url)
    ingress = serve.get_app_handle("bench")
    seg = Segmenter.from_checkpoint(ckpt)
    counter = iter(range(10**9))
    new = lambda: image_bytes(next(counter))  # noqa: E731
    for _ in range(1 if a.smoke else 5):  # warm up both paths (first calls allocate)
        data = new()
        post(url, data)
        seg.segment(data, EXPR)
    res: dict = {"checkpoint": str(ckpt), "requests": a.requests}

    # 1. Latency at concurrency 1: HTTP vs in-process, alternating.
    served, direct, stages = [], [], []
    for _ in range(a.requests):
        data = new()
        t = time.perf_counter()
        seg.segment(data, EXPR)
        direct.append((time.perf_counter() - t) * 1000)
        data = new()
        t = time.perf_counter()
        stages.append(post(url, data)["timings_ms"])
        served.append((time.perf_counter() - t) * 1000)
    res["latency_ms"] = {
        "in_process": {"p50": pct(direct, 50), "p99": pct(direct, 99)},
        "serve_http": {"p50": pct(served, 50), "p99": pct(served, 99)},
        "ratio_p50": pct(served, 50) / pct(direct, 50),
        "ratio_p99": pct(served, 99) / pct(direct, 99),
        # Where the served time goes: the ingress's own view (decode_image, total) and replica compute.
        "serve_timings_p50": {k: statistics.median(t[k] for t in stages) for k in stages[0]},
    }

    # 2. Throughput at 1, 4, 16 concurrent HTTP clients.
    res["throughput_rps"] = {}
    res["batch_sizes_mean"] = {}
    for conc in (1, 4, 16):
        payloads = [new() for _ in range(int(a.seconds * 60))]  # more than 2 cores can answer
        rps, batches = run_clients(url, conc, a.seconds, payloads)
        res["throughput_rps"][conc] = rps
        res["batch_sizes_mean"][conc] = statistics.mean(batches)
    res["throughput_ratio_16_vs_1"] = res["throughput_rps"][16] / res["throughput_rps"][1]

    # 3. SAM encoding beside the MLLM vs before it (ingress handle; no HTTP; new images: cache misses).
    lat = {True: [], False: []}
    parts = {True: [], False: []}
    for _ in range(a.requests):
        for overlap in (True, False):
            data = new()
            t = time.perf_counter()
            js = ingress.segment.remote(data, [EXPR], overlap).result()
            lat[overlap].append((time.perf_counter() - t) * 1000)
            parts[overlap].append(js["timings_ms"])
    comp = {k: statistics.median(p[k] for p in parts[True]) for k in ("mllm", "sam_encode", "sam_decode")}
    res["overlap_ms"] = {
        "overlapped_p50": pct(lat[True], 50),
        "sequential_p50": pct(lat[False], 50),
        "ratio_p50": pct(lat[True], 50) / pct(lat[False], 50),
        "stage_compute_p50": comp,
        "bound": (max(comp["mllm"], comp["sam_encode"]) + comp["sam_decode"])
        / (comp["mllm"] + comp["sam_encode"] + comp["sam_decode"]),
    }

    # 4. Cache hit vs miss over HTTP (alternating; a hit re-sends the image of the miss before it).
    hit, miss = [], []
    for _ in range(a.requests):
        data = new()
        t = time.perf_counter()
        assert not post(url, data)["sam_cache_hit"]
        miss.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        assert post(url, data, "the other block")["sam_cache_hit"]
        hit.append((time.perf_counter() - t) * 1000)
    res["cache_ms"] = {
        "miss_p50": pct(miss, 50),
        "hit_p50": pct(hit, 50),
        "ratio_p50": pct(hit, 50) / pct(miss, 50),
    }

    serve.shutdown()
    ray.shutdown()
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
