"""The model deployments: MLLM (stages 1 + 2) and SAM (stage 3), each batching concurrent requests.

Default options are the tiny CPU ones; serve_configs/*.yaml override them by name. They hold no model
logic: they call `PPCRModel.reason`, `SegmentationStage.encode` and `PPCRModel.segment` through the
inference runtime (ppcr/inference.py), the code that training and evaluation run.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np
import torch
from ray import serve

from ..data.refer import encode_mask
from ..geometry import clip_preprocess, sam_input_size, sam_preprocess
from ..inference import group_images, segmentations
from .settings import ServeSettings, load_serving_model

# _BATCHING: the batch handlers compute on the replica's user event loop instead of in a thread.
# Serve forms the next batch as soon as one is dispatched (ray/serve/batching.py `_process_batches`),
# so with compute in a thread, requests arriving during a batch form batches of one that queue on
# `max_concurrent_batches`. Computing on the loop holds arrivals back until the batch is done, then
# takes all of them: the batch grows with the load and a lone request waits for nobody
# (batch_wait_timeout_s = 0). Serve's health checks and routing run on the replica's own loop.


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    # Arrays passed between deployments arrive read-only (object store); torch needs a writable copy.
    return torch.from_numpy(np.array(a, copy=True)).to(device)


# ---------------------------------------------------------------------------------------------------
# Model deployments. Default options are the tiny CPU ones; serve_configs/*.yaml override them by name.

# @serve.batch needs values at class definition; each replica then applies its own ServeSettings
# (set_max_batch_size / set_batch_wait_timeout_s in __init__). One source: the settings' defaults.
BATCH_DEFAULTS = dict(
    max_batch_size=ServeSettings.max_batch_size, batch_wait_timeout_s=ServeSettings.batch_wait_timeout_s
)

MODEL_DEPLOYMENT_DEFAULTS = dict(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    max_queued_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
    health_check_period_s=2,
)


@serve.deployment(name="MLLM", **MODEL_DEPLOYMENT_DEFAULTS)
class MLLMStage:
    """Stages 1 + 2: LLaVA with LoRA A (semantic prompt) and LoRA B (box), vision features once per image."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.model = load_serving_model(self.s, parts=("mllm",))  # never builds SAM
        self.device = torch.device(self.s.device)
        self.reason.set_max_batch_size(self.s.max_batch_size)
        self.reason.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    @serve.batch(**BATCH_DEFAULTS)
    async def reason(
        self, keys: list[str], images: list[np.ndarray], expressions: list[list[str]]
    ) -> list[dict]:
        """Per request: semantic prompts (E, D) float32, boxes (E, 4) normalized XYXY or None."""
        return self._reason(keys, images, expressions)  # blocking on purpose: see _BATCHING

    @torch.no_grad()
    def _reason(self, keys, images, expressions) -> list[dict]:
        t0 = time.perf_counter()
        per_expr = [(key, image) for key, image, exprs in zip(keys, images, expressions) for _ in exprs]
        first, index = group_images([key for key, _ in per_expr])
        distinct = [per_expr[i][1] for i in first]
        out = self.model.reason(
            torch.stack(
                [clip_preprocess(im, self.model.clip_size, self.model.clip_mode) for im in distinct]
            ).to(self.device),
            index.to(self.device),
            [t for exprs in expressions for t in exprs],
            torch.tensor([im.shape[:2] for im in distinct], dtype=torch.long),
            max_sequences=self.s.max_sequences_per_forward,
        )
        sem = out.semantic_prompt.float().cpu().numpy()
        box = None if out.box is None else out.box.float().cpu().numpy()
        ms = (time.perf_counter() - t0) * 1000
        results, start = [], 0
        for exprs in expressions:
            sl = slice(start, start + len(exprs))
            start += len(exprs)
            results.append(
                {
                    "semantic": sem[sl],
                    "box": None if box is None else box[sl],
                    "ms": ms,
                    "batch": len(keys),
                }
            )
        return results


@serve.deployment(name="SAM", **MODEL_DEPLOYMENT_DEFAULTS)
class SAMStage:
    """Stage 3: SAM image encoder (with an LRU cache of embeddings), prompt encoder and mask decoder."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.model = load_serving_model(self.s, parts=("sam",))  # never builds LLaVA
        self.device = torch.device(self.s.device)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        for method in (self.encode, self.decode):
            method.set_max_batch_size(self.s.max_batch_size)
            method.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    def pid(self) -> int:
        """The replica's process id (tests kill it to check that Serve replaces the replica)."""
        return os.getpid()

    def cache_info(self) -> dict:
        return {"entries": len(self.cache), "capacity": self.s.cache_images}

    @serve.batch(**BATCH_DEFAULTS)
    async def encode(self, keys: list[str], images: list[np.ndarray]) -> list[dict]:
        """Per request: the image embedding (C, h, w) float32, whether it came from the cache, and timing."""
        return self._encode(keys, images)  # blocking on purpose: see _BATCHING

    @torch.no_grad()
    def _encode(self, keys, images) -> list[dict]:
        t0 = time.perf_counter()
        hits = [k in self.cache for k in keys]
        todo = {k: im for k, im in zip(keys, images) if k not in self.cache}  # each new image once
        if todo:
            pixels = torch.stack([sam_preprocess(im, self.model.sam_size) for im in todo.values()])
            emb = self.model.segmentation.encode(pixels.to(self.device))
            for k, e in zip(todo, emb):
                self.cache[k] = e
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > self.s.cache_images:
            self.cache.popitem(last=False)
        ms = (time.perf_counter() - t0) * 1000
        return [
            {
                "embedding": self.cache[k].float().cpu().numpy(),
                "sam_input_hw": sam_input_size(im.shape[:2], self.model.sam_size),
                "hit": hit,
                "ms": ms,
                "batch": len(keys),
            }
            for k, im, hit in zip(keys, images, hits)
        ]

    @serve.batch(**BATCH_DEFAULTS)
    async def decode(
        self,
        encoded: list[dict],
        semantic: list[np.ndarray],
        boxes: list[np.ndarray | None],
        hws: list[tuple[int, int]],
    ) -> list[dict]:
        """Per request: one {"mask": COCO RLE, "box": pixel XYXY, "score"} per expression, and timing."""
        return self._decode(encoded, semantic, boxes, hws)  # blocking on purpose: see _BATCHING

    @torch.no_grad()
    def _decode(self, encoded, semantic, boxes, hws) -> list[dict]:
        t0 = time.perf_counter()
        # No cast here: the decoder casts its inputs to its own dtype (ppcr/precision.py).
        emb = torch.stack([_tensor(e["embedding"], self.device) for e in encoded])
        index = torch.tensor([i for i, s in enumerate(semantic) for _ in range(len(s))], device=self.device)
        sem = _tensor(np.concatenate(semantic), self.device)
        box = None if boxes[0] is None else _tensor(np.concatenate(boxes), self.device)
        low, iou, masks = self.model.segment(
            emb,
            index,
            sem,
            box,
            torch.tensor([tuple(hw) for hw in hws], dtype=torch.long),
            torch.tensor([tuple(e["sam_input_hw"]) for e in encoded], dtype=torch.long),
        )
        found = [
            {"box": seg.box, "mask": encode_mask(seg.mask), "score": seg.score}
            for seg in segmentations(masks, box, iou)
        ]
        ms = (time.perf_counter() - t0) * 1000
        results, start = [], 0
        for e, s in zip(encoded, semantic):
            results.append(
                {
                    "results": found[start : start + len(s)],
                    "decode_ms": ms,
                    "encode_ms": e["ms"],
                    "cache_hit": e["hit"],
                    "batch": {"sam_encode": e["batch"], "sam_decode": len(encoded)},
                }
            )
            start += len(s)
        return results
