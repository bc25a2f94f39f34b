"""Wall-clock seconds per training step of tiny-preset variants, side by side in one process.

    python benchmarks/preset_step_bench.py [--steps 120] [--repeats 2] [--threads 2] \
        [--variant NAME=JSON ...]
    python benchmarks/preset_step_bench.py --smoke   # < 1 min: 16 images, 1 step per variant, once

Synthesises the demo's data once (or reuses --data DIR), then runs `ppcr.train.train` for `--steps`
steps of the demo's batch (32, grouped by image) for each variant in turn, `--repeats` times,
alternating, so a machine whose speed drifts affects every variant alike. Default variants: the
preset (2 language layers) against 3 language layers (docs/learning.md, finding 14). The time
includes train()'s one-off SAM-embedding cache (~5 s), the same for every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ppcr.config import deep_merge, load_config
from ppcr.data.shards import prepare_shards
from ppcr.data.synth import synthesize
from ppcr.demo import DemoSettings
from ppcr.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a folder holding shards/ from an earlier run")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", default=None, help="NAME=JSON config overrides")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): 16 images, 1 step per variant on 1 thread, one repeat",
    )
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.repeats, a.threads = 1, 1, 1
    torch.set_num_threads(a.threads)
    variants = (
        dict(v.split("=", 1) for v in a.variant)
        if a.variant
        else {
            "preset (2 LM layers)": "{}",
            "3 LM layers": '{"model": {"language": {"num_layers": 3}}}',
        }
    )
    root = Path(a.data or tempfile.mkdtemp(prefix="ppcr_preset_bench_"))
    if not (root / "shards").exists():
        data = dataclasses.replace(DemoSettings().data, num_images=16) if a.smoke else DemoSettings().data
        synth = synthesize(root / "refer", data)
        prepare_shards(
            root / "refer", synth["images_dir"], "synthref", "unc", root / "shards", progress=False
        )
    base = {
        "data": {"shards_root": str(root / "shards")},
        "train": {"steps": a.steps, "batch_size": 32, "log_every": a.steps},
    }
    results: dict[str, list[float]] = {}
    for rep in range(a.repeats):
        for name, ov in variants.items():
            cfg = load_config("tiny", overrides=deep_merge(base, json.loads(ov)))
            r = train(cfg, out_dir=root / f"run_{rep}", progress=False)
            results.setdefault(name, []).append(r.seconds / r.steps)
            print(f"{name}: {r.seconds / r.steps:.3f} s/step (repeat {rep + 1})", flush=True)
    ref = min(results[next(iter(variants))])
    for name, times in results.items():
        print(f"{name:>24}: best {min(times):.3f} s/step, ratio to the first {min(times) / ref:.2f}")


if __name__ == "__main__":
    main()
