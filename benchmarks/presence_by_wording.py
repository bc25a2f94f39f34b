"""Which synthetic expressions a trained model grounds and answers, by the attributes they name.

    python benchmarks/presence_by_wording.py --checkpoint demo_gref/checkpoint --shards demo_gref/shards
    python benchmarks/presence_by_wording.py --checkpoint demo_out/checkpoint --shards demo_out/shards \
        --dataset synthref
    python benchmarks/presence_by_wording.py --smoke   # < 1 min: `ppcr demo --grefcoco --quick`, then this

Splits one split's expressions (synthgref val by default) by the attributes they name ("the red one":
colour; "the big triangle": size+shape; "both red circles" and the like: several) and, for each
wording, prints how many name a target and how many name nothing, how often a multi-target model
answers "present" (presence >= 0.5) to each, and how often the answer's box (the most object-like
slot's, or the single-target model's one box) has IoU >= 0.5 with the referent of a single-target
expression. With 2-3 objects per scene, a random pick hits about 0.4 of the time. docs/learning.md
("No target and several targets") quotes its tables; writes the rows as JSON with --json.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from ppcr.checkpoint import load_checkpoint
from ppcr.data.shards import ImageCache, iter_expressions, shard_dir, to_item
from ppcr.data.synth import COLORS, SHAPES
from ppcr.inputs import collate

_WORDS = (("size", {"small", "big"}), ("colour", set(COLORS)), ("shape", set(SHAPES)), ("one", {"one"}))


def wording(text: str, targets: int) -> str:
    """'several' for an expression naming two targets or more, else the attributes it names joined by
    '+' (size, colour, shape, or 'one' where no shape is named)."""
    if targets > 1:
        return "several"
    words = set(text.split())
    return "+".join(name for name, vocab in _WORDS if words & vocab)


@torch.no_grad()
def by_wording(model, split: Path, batch: int = 32) -> list[dict]:
    """One row per wording: counts, presence >= 0.5 rates (multi-target models) and box hits."""
    model.eval()
    cache, rows = ImageCache(256), collections.defaultdict(lambda: {"target": [], "none": [], "hit": []})
    samples = list(iter_expressions(split))
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        out = model(
            collate([to_item(s, cache) for s in chunk], model.clip_size, model.sam_size, model.clip_mode),
            rng=random.Random(0),
        )
        present = (out.slots.presence.float() >= 0).tolist() if out.slots is not None else [None] * len(chunk)
        for j, s in enumerate(chunk):
            row = rows[wording(s.text, len(s.targets))]
            row["none" if s.no_target else "target"].append(present[j])
            if not s.no_target and len(s.targets) == 1:
                size = torch.tensor([s.width, s.height, s.width, s.height], dtype=torch.float32)
                gt = torch.as_tensor(s.bbox_xyxy, dtype=torch.float32)[None] / size
                row["hit"].append(float(box_iou(out.box[j].float()[None], gt)[0, 0] >= 0.5))

    def rate(v: list) -> float | None:
        return None if not v or v[0] is None else round(float(np.mean(v)), 3)

    return [
        {
            "wording": k,
            "targets": len(v["target"]),
            "nothing": len(v["none"]),
            "present_target": rate(v["target"]),
            "present_nothing": rate(v["none"]),
            "box_hit": round(float(np.mean(v["hit"])), 3) if v["hit"] else None,
        }
        for k, v in sorted(rows.items())
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="a ppcr checkpoint folder (required unless --smoke)")
    ap.add_argument(
        "--shards", type=Path, help="the shards root it is evaluated on (required unless --smoke)"
    )
    ap.add_argument("--dataset", default="synthgref", choices=("synthgref", "synthref"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--smoke", action="store_true", help="check that it runs (< 1 min): a quick demo, then this"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        from ppcr.demo import run_grefcoco_demo

        out = Path(tempfile.mkdtemp(prefix="ppcr_wording_smoke_"))
        run_grefcoco_demo(out, quick=True)
        args.checkpoint, args.shards = out / "checkpoint", out / "shards"
    if args.checkpoint is None or args.shards is None:
        ap.error("--checkpoint and --shards are required (unless --smoke)")
    split = shard_dir(args.shards, args.dataset, "unc", args.split)
    if not split.is_dir():
        ap.error(f"no {args.dataset} {args.split} split under {args.shards}")
    rows = by_wording(load_checkpoint(args.checkpoint), split)
    print(f"{args.checkpoint} on {args.dataset} {args.split}")
    print(
        f"{'names':20s} {'targets':>7s} {'nothing':>7s} {'present|target':>15s} {'present|nothing':>16s} {'box hit':>8s}"
    )
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        print(
            f"{r['wording']:20s} {r['targets']:7d} {r['nothing']:7d} {fmt(r['present_target']):>15s}"
            f" {fmt(r['present_nothing']):>16s} {fmt(r['box_hit']):>8s}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
