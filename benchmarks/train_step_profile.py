"""Where the time of one tiny-preset training step goes, component by component (forward and backward).

    python benchmarks/train_step_profile.py [--images 900] [--steps 12] [--warmup 3] [--set JSON]
    python benchmarks/train_step_profile.py --smoke   # < 1 min: 16 images in a temporary folder, 1 + 1 steps

Synthesises the demo's data (or reuses --data DIR), takes real training batches (the demo's
`group_by_image` batches of 32 expressions) and runs the tiny preset's step split at the stage
boundaries: each component's inputs are detached leaves, so its forward and its backward are timed on
their own, and the backward is then pushed through the components in reverse order — the same
arithmetic as one `loss.backward()`. Components: data (decode + preprocess + collate), CLIP tower +
projector, the semantic LLM pass (LoRA A) + projection, the spatial LLM pass (LoRA B), the box heads
(spatial + semantic grounding), the SAM image encoder (frozen: train() encodes each image once, so
the profile times that steady state, every image already encoded, and prints the one-off encode cost),
the SAM prompt encoder + mask decoder, the mask upscale to the original size, the losses, clip +
AdamW. Prints the median per component and the median of the real `train_step` for comparison (the
split adds little overhead). `--clock cpu --threads 1` measures CPU time, which another process on
the machine barely moves; wall time needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ppcr.config import load_config
from ppcr.data.shards import ImageCache, prepare_shards, shard_dir, to_item
from ppcr.data.synth import synthesize
from ppcr.demo import DemoSettings
from ppcr.geometry import normalized_to_sam_frame, order_box
from ppcr.inputs import collate
from ppcr.losses import ppcr_loss
from ppcr.model import PPCRModel, PPCROutput, _inverse_order
from ppcr.prompts import BOX_TOKEN, SPATIAL_ANSWER, spatial_question
from ppcr.train import (
    SamEmbeddingCache,
    batch_image_keys,
    batches_forever,
    build_optimizer,
    gt_box_probability,
    load_training_samples,
    train_step,
)

# Wall time by default; --clock cpu counts this process's CPU time (robust on a shared machine).
CLOCK = time.perf_counter


class Split:
    """Detach points between components: forward timings per component, then backward in reverse."""

    def __init__(self) -> None:
        self.fwd: dict[str, float] = defaultdict(float)
        self.bwd: dict[str, float] = defaultdict(float)
        self.cuts: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (producer, original, leaf)
        self.order: list[str] = []

    def run(self, name: str, fn, *args):
        if name not in self.order:
            self.order.append(name)
        t = CLOCK()
        out = fn(*args)
        self.fwd[name] += CLOCK() - t
        return out

    def cut(self, producer: str, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return x
        leaf = x.detach().requires_grad_(True)
        self.cuts.append((producer, x, leaf))
        return leaf

    def backward(self, loss: torch.Tensor, loss_name: str) -> None:
        t = CLOCK()
        loss.backward()
        self.bwd[loss_name] += CLOCK() - t
        for name in reversed(self.order):
            pairs = [(o, leaf.grad) for p, o, leaf in self.cuts if p == name and leaf.grad is not None]
            if not pairs:
                continue
            t = CLOCK()
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self.bwd[name] += CLOCK() - t


def split_step(
    model: PPCRModel, cfg, chunk, cache, sam_cache, opt, rng, step: int
) -> dict[str, tuple[float, float]]:
    """One training step with the same arithmetic as `train_step`, timed per component."""
    s = Split()
    model.train()
    items = s.run("data", lambda: [to_item(x, cache) for x in chunk])
    batch = s.run("data", collate, items, model.clip_size, model.sam_size)
    mllm, sem_stage, spa_stage = model.mllm, model.semantic, model.spatial
    feats = s.run("CLIP tower + projector", mllm.image_features, batch.clip_pixels)
    idx, hw = batch.image_index, batch.original_hw[batch.image_index]

    def semantic(f):
        return sem_stage(mllm, f[idx], batch.expressions, rng)

    sem = s.run("LLM pass 1 (semantic, LoRA A)", semantic, s.cut("CLIP tower + projector", feats))

    def spatial(f, h):
        questions = [spatial_question(e, spa_stage.mode, rng) for e in batch.expressions]
        inserted = spa_stage.semantic_in(h)
        return mllm.run_stage("spatial", questions, SPATIAL_ANSWER, BOX_TOKEN, f[idx], inserted)

    p1 = "LLM pass 1 (semantic, LoRA A)"
    st = s.run(
        "LLM pass 2 (spatial, LoRA B)", spatial, s.cut("CLIP tower + projector", feats), s.cut(p1, sem.hidden)
    )
    p2 = "LLM pass 2 (spatial, LoRA B)"

    def heads(tok, img, sem_tok, sem_img):
        box, heat = spa_stage.head(tok, img, hw)
        sem_box, sem_heat = spa_stage.head(sem_tok, sem_img, hw)
        return box, heat, sem_box, sem_heat

    box, heat, sem_box, sem_heat = s.run(
        "box heads (spatial + semantic grounding)",
        heads,
        s.cut(p2, st.token),
        s.cut(p2, st.image),
        s.cut(p1, sem.hidden),
        s.cut(p1, sem.image_states),
    )
    keys = batch_image_keys(items)
    emb = s.run("SAM image encoder (frozen; cached per image)", sam_cache.get, batch, keys)
    pheads = "box heads (spatial + semantic grounding)"

    def sam_box_of(b):
        gt = batch.gt_boxes
        wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        gt = order_box((gt + torch.randn_like(gt) * cfg.train.gt_box_jitter * wh).clamp(0, 1))
        use_gt = torch.rand(len(batch)) < gt_box_probability(step, cfg.train)
        return torch.where(use_gt.unsqueeze(1), gt, b)

    groups = [(img, (idx == img).nonzero().flatten()) for img in idx.unique().tolist()]
    order = torch.cat([rows for _, rows in groups])

    def decode(prompt, b):
        frames = [
            normalized_to_sam_frame(b[rows], tuple(batch.original_hw[img].tolist()), model.sam_size)
            for img, rows in groups
        ]
        return model.segmentation.decode(emb, idx, prompt, torch.cat(frames)[_inverse_order(order)])

    low, iou = s.run(
        "SAM prompt encoder + mask decoder",
        decode,
        s.cut(p1, sem.prompt),
        sam_box_of(s.cut(pheads, box)),
    )

    def upscale(low_):
        return [
            model.segmentation.upscale(
                low_[rows], tuple(batch.sam_input_hw[img].tolist()), tuple(batch.original_hw[img].tolist())
            )
            for img, rows in groups
        ]

    masks = s.run("mask upscale to original size", upscale, s.cut("SAM prompt encoder + mask decoder", low))
    pdec, pup = "SAM prompt encoder + mask decoder", "mask upscale to original size"
    out = PPCROutput(
        semantic_prompt=sem.prompt,
        box=s.cut(pheads, box),
        sam_box=None,
        low_res_masks=low,
        mask_logits=[],
        mask_groups=[(rows, s.cut(pup, m)) for (_, rows), m in zip(groups, masks)],
        iou_pred=s.cut(pdec, iou),
        ce=(s.cut(p1, sem.ce) + s.cut(p2, st.ce)) / 2,
        heatmap=s.cut(pheads, heat),
        semantic_box=s.cut(pheads, sem_box),
        semantic_heatmap=s.cut(pheads, sem_heat),
    )
    loss, _ = s.run("losses", ppcr_loss, out, batch, cfg.loss, model.patch_centers())
    opt.zero_grad(set_to_none=True)
    s.backward(loss, "losses")
    t = CLOCK()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
    opt.step()
    s.fwd["grad clip + AdamW"] = CLOCK() - t
    s.order.append("grad clip + AdamW")
    return {k: (s.fwd.get(k, 0.0), s.bwd.get(k, 0.0)) for k in s.order}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/ppcr_profile_data"))
    ap.add_argument("--images", type=int, default=900)
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", default="{}", help="config overrides as JSON")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time, use with --threads 1"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check that it runs (< 1 min on 2 cores): 16 images in a temporary --data, "
        "1 warm-up and 1 timed step, 1 thread",
    )
    args = ap.parse_args()
    if args.smoke:
        args.images, args.steps, args.warmup, args.threads = 16, 1, 1, 1
        args.data = Path(tempfile.mkdtemp(prefix="ppcr_profile_smoke_"))
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    shards = args.data / "shards"
    if not shard_dir(shards, "synthref", "unc", "train").exists():
        synth = synthesize(args.data / "refer", replace(DemoSettings().data, num_images=args.images))
        prepare_shards(synth["refer_root"], synth["images_dir"], "synthref", "unc", shards, progress=False)
    overrides = json.loads(args.set)
    overrides.setdefault("data", {})["shards_root"] = str(shards)
    cfg = load_config("tiny", overrides=overrides)
    torch.manual_seed(0)
    model = PPCRModel(cfg.model)
    opt, _ = build_optimizer(model, cfg.train)
    samples = load_training_samples(shard_dir(shards, "synthref", "unc", "train"))
    batches = batches_forever(samples, cfg.train.batch_size, 0, cfg.train.group_by_image)
    rng, cache = random.Random(0), ImageCache()
    # train() encodes each image once (SamEmbeddingCache); after the first epoch every lookup hits.
    # Profile that steady state: encode every training image first, and time the encode itself.
    sam_cache = SamEmbeddingCache(model)
    by_image = list({x.image_id: x for x in samples}.values())
    t = CLOCK()
    for i in range(0, len(by_image), 16):
        items = [to_item(x, cache) for x in by_image[i : i + 16]]
        sam_cache.get(collate(items, model.clip_size, model.sam_size), batch_image_keys(items))
    encode_ms = (CLOCK() - t) * 1e3 / len(by_image)
    step = cfg.train.gt_box_warmup_steps  # the steady state: GT box for gt_box_min_prob of the prompts

    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    whole, imgs = [], []
    for r in range(args.warmup + args.steps):
        chunk = next(batches)
        times = split_step(model, cfg, chunk, cache, sam_cache, opt, rng, step)
        chunk = next(batches)
        t = CLOCK()
        items = [to_item(x, cache) for x in chunk]
        batch = collate(items, model.clip_size, model.sam_size)
        emb = sam_cache.get(batch, batch_image_keys(items))
        train_step(model, batch, cfg, opt, rng, step, image_embeddings=emb)
        if r >= args.warmup:
            whole.append(CLOCK() - t)
            imgs.append(batch.clip_pixels.shape[0])
            for k, v in times.items():
                per[k].append(v)

    med = {
        k: (float(np.median([f for f, _ in v])), float(np.median([b for _, b in v]))) for k, v in per.items()
    }
    total = sum(f + b for f, b in med.values())
    print(
        f"tiny preset, batch {cfg.train.batch_size} expressions on {np.mean(imgs):.1f} images, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, median of {args.steps} steps (ms)"
    )
    print(f"{'component':44s} {'forward':>8s} {'backward':>8s} {'total':>8s} {'share':>6s}")
    for k, (f, b) in med.items():
        print(f"{k:44s} {f * 1e3:8.1f} {b * 1e3:8.1f} {(f + b) * 1e3:8.1f} {(f + b) / total:6.1%}")
    print(f"{'sum of components':44s} {'':8s} {'':8s} {total * 1e3:8.1f}")
    print(
        f"(SAM encoder, first sight of an image: {encode_ms:.1f} ms per image incl. decode + preprocess; "
        f"{len(by_image)} training images, i.e. {encode_ms * len(by_image) / 1e3:.1f} s once per run)"
    )
    print(f"{'real train_step (data + step)':44s} {'':8s} {'':8s} {float(np.median(whole)) * 1e3:8.1f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "components_ms": {k: [f * 1e3, b * 1e3] for k, (f, b) in med.items()},
                    "train_step_ms": float(np.median(whole)) * 1e3,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
