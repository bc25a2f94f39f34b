"""One grounding ablation run of the tiny preset (docs/learning.md, findings 8-12).

    python benchmarks/grounding_ablation.py --out /tmp/abl/F --steps 2000 \
        --set '{"model": {"vision": {"num_layers": 4}}}' [--default-sizes] [--threads 1]
    python benchmarks/grounding_ablation.py --smoke   # < 1 min: 16 images, 3 steps, a temporary --out

Synthesises the demo's 900-image data (or the generator's default object sizes), trains the tiny
preset with the given overrides, and prints val mIoU / oIoU / BoxAcc@0.5 beside the all-objects
baseline and the ground-truth-box oracle, plus how often the predicted box centre lands in the
referent's box per kind of expression (which attributes it uses). Writes <out>/result.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ppcr.config import load_config
from ppcr.data.shards import ImageCache, iter_expressions, prepare_shards, shard_dir, to_item
from ppcr.data.synth import SynthConfig, synthesize
from ppcr.demo import DemoSettings
from ppcr.evaluate import evaluate_baselines, evaluate_split
from ppcr.geometry import denormalize_box
from ppcr.inputs import collate
from ppcr.train import train

_ATTRIBUTES = (
    ("size", {"small", "big"}),
    ("color", {"red", "green", "blue", "yellow"}),
    ("shape", {"circle", "square", "triangle"}),
)


@torch.no_grad()
def centre_hits_by_kind(model, split: Path, batch: int = 16) -> dict[str, float]:
    """Fraction of expressions whose predicted box centre lies in the referent's box, by attribute words."""
    model.eval()
    cache, hits = ImageCache(), collections.defaultdict(list)
    samples = list(iter_expressions(split))
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        items = [to_item(s, cache) for s in chunk]
        out = model(collate(items, model.clip_size, model.sam_size))
        for box, item, s in zip(out.box, items, chunk):
            x1, y1, x2, y2 = denormalize_box(box.numpy(), item.image.shape[:2])
            gx1, gy1, gx2, gy2 = item.gt_box
            hit = gx1 <= (x1 + x2) / 2 <= gx2 and gy1 <= (y1 + y2) / 2 <= gy2
            words = set(s.text.split())
            kind = "+".join(name for name, vocab in _ATTRIBUTES if words & vocab)
            hits[kind].append(hit)
            hits["all"].append(hit)
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="required unless --smoke")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--set", default="{}", help="config overrides as JSON, e.g. '{\"model\": {...}}'")
    ap.add_argument("--default-sizes", action="store_true", help="the generator's default object sizes")
    ap.add_argument("--images", type=int, default=900)
    ap.add_argument("--threads", type=int, default=1, help="1 lets two runs share 2 cores side by side")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): 16 images, 3 steps, a temporary --out",
    )
    args = ap.parse_args()
    if args.smoke:
        args.images, args.steps = 16, 3
        args.out = args.out or Path(tempfile.mkdtemp(prefix="ppcr_ablation_smoke_"))
    if args.out is None:
        ap.error("--out is required (unless --smoke)")
    torch.set_num_threads(args.threads)

    data = dataclasses.replace(DemoSettings().data, num_images=args.images)
    if args.default_sizes:
        defaults = SynthConfig()
        data = dataclasses.replace(data, small_size=defaults.small_size, big_size=defaults.big_size)
    synth = synthesize(args.out / "refer", data)
    shards = args.out / "shards"
    prepare_shards(synth["refer_root"], synth["images_dir"], "synthref", "unc", shards, progress=False)

    overrides = json.loads(args.set)
    overrides.setdefault("data", {})["shards_root"] = str(shards)
    overrides.setdefault("train", {})["steps"] = args.steps
    cfg = load_config("tiny", overrides=overrides)
    res = train(cfg, out_dir=args.out / "train", progress=False)

    val = shard_dir(shards, "synthref", "unc", "val")
    keep = ("mIoU", "oIoU", "BoxAcc@0.5")
    pick = lambda m: {k: round(m[k], 3) for k in keep}  # noqa: E731
    base = evaluate_baselines(shard_dir(shards, "synthref", "unc", "train"), val)
    result = {
        "overrides": overrides,
        "default_sizes": args.default_sizes,
        "steps": res.steps,
        "train_s": round(res.seconds, 1),
        "trained": pick(evaluate_split(res.model, val, progress=False)),
        "oracle": pick(evaluate_split(res.model, val, progress=False, oracle_box=True)),
        "all_objects": pick(base["baseline: all objects"]),
        "centre_in_referent_by_kind": centre_hits_by_kind(res.model, val),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
