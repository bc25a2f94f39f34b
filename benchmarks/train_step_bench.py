"""Side-by-side timing of the tiny preset's training step: SAM decoding one image at a time (the way
segment-anything's MaskDecoder repeats one image per call) vs ppcr's batched per-prompt decode.

    python benchmarks/train_step_bench.py [--batch 32] [--repeats 5]
    python benchmarks/train_step_bench.py --smoke   # < 1 min: batch 4, one timed repeat

Prints samples/s of both and their ratio, measured alternately in one run (this machine is noisy).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from ppcr.config import load_config
from ppcr.inputs import Item, collate
from ppcr.losses import ppcr_loss
from ppcr.model import PPCRModel
from ppcr.segmentation_stage import SegmentationStage


def per_image_decode(self, image_embeddings, image_index, semantic_prompt, box_sam):
    """The library's call pattern: one MaskDecoder call per image (its prompts batched)."""
    pe = self.sam.prompt_encoder
    masks, ious = [None] * len(image_index), [None] * len(image_index)
    for img in torch.unique(image_index).tolist():
        rows = (image_index == img).nonzero().flatten()
        sparse, dense = pe(points=None, boxes=box_sam[rows], masks=None)
        sparse = torch.cat([sparse, semantic_prompt[rows].unsqueeze(1)], dim=1)
        low, iou = self.sam.mask_decoder(
            image_embeddings[img : img + 1], pe.get_dense_pe(), sparse, dense, False
        )
        for j, r in enumerate(rows.tolist()):
            masks[r], ious[r] = low[j, 0], iou[j, 0]
    return torch.stack(masks), torch.stack(ious)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--smoke", action="store_true", help="check that it runs (< 1 min on 2 cores): batch 4, one repeat"
    )
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.repeats = 4, 1
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = PPCRModel(cfg.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    items = []
    for i in range(args.batch):  # one expression per image, as random training batches are
        img = rng.integers(
            0, 255, size=(int(rng.integers(160, 256)), int(rng.integers(160, 256)), 3), dtype=np.uint8
        )
        mask = np.zeros(img.shape[:2], bool)
        mask[20:80, 30:90] = True
        items.append(Item(i, img, "the small red circle", mask, np.array([30.0, 20, 90, 80])))
    batch = collate(items, model.clip_size, model.sam_size)

    def step() -> None:
        out = model(batch, rng=random.Random(0), gt_box_prob=0.5)
        loss, _ = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
        opt.zero_grad()
        loss.backward()
        opt.step()

    batched = SegmentationStage.decode
    times = {"per-image decode": [], "batched decode": []}
    for r in range(args.repeats + 1):
        for name, fn in (("per-image decode", per_image_decode), ("batched decode", batched)):
            SegmentationStage.decode = fn
            t = time.perf_counter()
            step()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    SegmentationStage.decode = batched
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:18s} {v * 1000:8.1f} ms/step  {args.batch / v:6.1f} samples/s")
    print(f"speed-up (per-image / batched): {med['per-image decode'] / med['batched decode']:.2f}x")


if __name__ == "__main__":
    main()
