"""Data stall of distributed training: the Ray Data pipeline vs the same rows already in memory, and
samples/s with 1 vs 2 workers — all runs side by side in one process, on one local Ray cluster.

    python benchmarks/train_data_bench.py [--images 120] [--steps 60]
    python benchmarks/train_data_bench.py --smoke   # < 1 min: 16 images, one streamed 1-worker run of 2 steps

Data stall = time a worker waits for its next micro-batch / step time (Ray Train reports it as
`data_wait_fraction`); the first report (pipeline start-up, DeepSpeed warm-up) is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ppcr.config import load_config
from ppcr.data.shards import prepare_shards
from ppcr.data.streaming import training_dataset
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.distributed_train import run_training
from ppcr.ray_cluster import init_ray


def steady(run_dir: Path) -> dict:
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()][1:]
    return {
        "data_wait_fraction": statistics.mean(r["data_wait_fraction"] for r in log),
        "samples_per_s": statistics.mean(r["samples_per_s"] for r in log),
        "reports": len(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): 16 images, one streamed 1-worker run of 2 steps "
        "of batch 4; no comparison",
    )
    a = ap.parse_args()
    if a.smoke:
        a.images, a.steps, a.batch = 16, 2, 4
    work = Path(tempfile.mkdtemp(prefix="ppcr-train-bench-"))
    synth = synthesize(work / "refer", SynthConfig(num_images=a.images, seed=0, relations=False))
    prepare_shards(
        synth["refer_root"], synth["images_dir"], "synthref", "unc", work / "shards", progress=False
    )
    init_ray(num_cpus=4, quiet=True)

    def cfg(name: str, workers: int):
        return load_config(
            "tiny",
            overrides={
                "data": {"shards_root": str(work / "shards")},
                "train": {"steps": a.steps, "batch_size": a.batch, "log_every": 1 if a.smoke else 10},
                "distributed": {
                    "num_workers": workers,
                    "micro_batch_size": a.batch // workers,
                    "checkpoint_every": 10**6,
                    "storage_path": str(work / "runs"),
                    "name": name,
                },
            },
        )

    if a.smoke:
        run_training(cfg("streamed-1w", 1))
        print(
            "streamed-1w",
            json.dumps({k: round(v, 4) for k, v in steady(work / "runs" / "streamed-1w").items()}),
        )
        return
    base = cfg("x", 2)
    t0 = time.perf_counter()
    in_memory = training_dataset(base, base.model.vision.image_size, base.model.sam.image_size).materialize()
    print(f"materialised {in_memory.count()} rows in {time.perf_counter() - t0:.1f}s")
    results = {}
    for name, workers, ds in (
        ("streamed-2w", 2, None),
        ("in-memory-2w", 2, in_memory),
        ("streamed-1w", 1, None),
    ):
        t0 = time.perf_counter()
        run_training(cfg(name, workers), dataset=ds)
        results[name] = {**steady(work / "runs" / name), "wall_s": time.perf_counter() - t0}
        print(name, json.dumps({k: round(v, 4) for k, v in results[name].items()}))
    s2, m2, s1 = results["streamed-2w"], results["in-memory-2w"], results["streamed-1w"]
    print("\n| run | data stall | samples/s |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['data_wait_fraction']:.1f}% | {r['samples_per_s']:.1f} |")
    print(
        f"\nstreamed / in-memory samples/s (2 workers): {s2['samples_per_s'] / m2['samples_per_s']:.2f}; "
        f"2 / 1 workers samples/s (streamed): {s2['samples_per_s'] / s1['samples_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
