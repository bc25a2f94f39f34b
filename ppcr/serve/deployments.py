"""The model deployments: MLLM (stages 1 + 2) and SAM (stage 3), each batching concurrent requests.

Their options (replicas, resources, queues) are not written here: `app.make_app` applies the shipped
ppcr/serve/tiny_cpu.yaml's, and a Serve config's `deployments:` override them by name. They hold no model
logic: they call `SegmentationStage.encode` and the inference runtime's `reason_rows` / `segment_rows`
(ppcr/inference.py: `PPCRModel.reason` / `segment`, the code the batch actors, training and evaluation
run); what they keep is batching, the embedding cache, statistics and numpy <-> tensor moves.

Failure isolation: one request never fails the requests batched with it. Each batch runs through
`failures.run_isolated`: when it raises, its requests run again one by one, and only a request that
fails alone gets an error. A handler returns, per request, its result or an `ItemFailure` (never
raises for one request), which the ingress answers as 422 (the request's own input, InputError) or
500 (a fault of the service, one line without traceback). The MLLM replica applies the text rules
(`PromptTokenizer.check_expressions`) to each request before its batch runs, so a text the ingress
let through costs no retry. `stats()` counts batches and the batches that had to be split.

The MLLM replica keeps the language model's prompt prefixes of recent images (`mllm.PrefixCache`, LRU
by image content hash, `prefix_cache_images`): a request on an image seen before runs only the
expressions' suffixes, and no vision tower.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, OrderedDict

import numpy as np
import torch
from ray import serve

from ..failures import ItemFailure, item_failure, run_isolated
from ..geometry import clip_preprocess, sam_input_size, sam_preprocess
from ..inference import reason_rows, segment_rows
from ..mllm import PrefixCache
from .settings import ServeSettings, load_serving_model

logger = logging.getLogger("ppcr.serve")

# _BATCHING: the batch handlers compute on the replica's user event loop instead of in a thread.
# Serve forms the next batch as soon as one is dispatched (ray/serve/batching.py `_process_batches`),
# so with compute in a thread, requests arriving during a batch form batches of one that queue on
# `max_concurrent_batches`. Computing on the loop holds arrivals back until the batch is done, then
# takes all of them: the batch grows with the load and a lone request waits for nobody
# (batch_wait_timeout_s = 0). Serve's health checks and routing run on the replica's own loop.


class _Stats:
    """Counts of one replica's batches, by method: how many, their largest size, how many failed and
    were split to run their requests one by one, and the sizes of those (`stats()`; tests read it)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.largest: dict[str, int] = {}
        self.split_sizes: dict[str, list[int]] = {}

    def batch(self, method: str, n: int) -> None:
        self.counts[f"{method}_batches"] += 1
        self.largest[method] = max(self.largest.get(method, 0), n)

    def retry(self, method: str):
        def on_retry(exc: BaseException, n: int) -> None:
            self.counts[f"{method}_split"] += 1
            self.split_sizes.setdefault(method, []).append(n)

        return on_retry

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "largest": dict(self.largest), "split_sizes": self.split_sizes}


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    # Arrays passed between deployments arrive read-only (object store); torch needs a writable copy.
    return torch.from_numpy(np.array(a, copy=True)).to(device)


# ---------------------------------------------------------------------------------------------------
# Model deployments. Options: ppcr/serve/tiny_cpu.yaml (app.default_options), overridden by a Serve config.

# @serve.batch needs values at class definition; each replica then applies its own ServeSettings
# (set_max_batch_size / set_batch_wait_timeout_s in __init__). One source: the settings' defaults.
BATCH_DEFAULTS = dict(
    max_batch_size=ServeSettings.max_batch_size, batch_wait_timeout_s=ServeSettings.batch_wait_timeout_s
)


@serve.deployment(name="MLLM")
class MLLMDeployment:
    """Stages 1 + 2: LLaVA with LoRA A (semantic prompt) and LoRA B (box), vision features once per image."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.model = load_serving_model(self.s, parts=("mllm",))  # never builds SAM
        self.device = torch.device(self.s.device)
        self.reason.set_max_batch_size(self.s.max_batch_size)
        self.reason.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)
        self._stats = _Stats()
        # Prefixes kept across requests, when the model shares them at all (model.share_prefix false: the
        # config says so; asked for but impossible: shares_prefix logs why).
        share = self.s.prefix_cache_images > 0 and self.model.shares_prefix()
        self.prefix_cache = PrefixCache(self.s.prefix_cache_images) if share else None
        if not share:
            logger.info(
                "MLLM replica keeps no prompt prefixes (prefix_cache_images 0, or a model that shares none)"
            )

    def stats(self) -> dict:
        """Batches run and split since the replica started (`_Stats`), and the prefix cache's entries,
        hits and misses (`PrefixCache.stats`; None without one)."""
        out = self._stats.as_dict()
        out["prefix_cache"] = None if self.prefix_cache is None else self.prefix_cache.stats()
        return out

    @serve.batch(**BATCH_DEFAULTS)
    async def reason(
        self, keys: list[str], images: list[np.ndarray], expressions: list[list[str]]
    ) -> list[dict | ItemFailure]:
        """Per request: semantic prompts (E, D) float32, per expression the boxes to segment ((k, 4)
        normalized XYXY: one, or the kept box slots of a multi-target model, none for no target) or
        None without a spatial stage, the compute time and the batch's size in requests; or an
        ItemFailure."""
        return self._reason_batch(keys, images, expressions)  # blocking on purpose: see _BATCHING

    def _reason_batch(self, keys, images, expressions) -> list[dict | ItemFailure]:
        self._stats.batch("reason", len(keys))
        out: list[dict | ItemFailure | None] = [None] * len(keys)
        todo = []
        for i, (key, image, exprs) in enumerate(zip(keys, images, expressions)):
            try:  # the text rules, per request: a bad text fails its own request, before any forward
                todo.append((i, key, image, self.model.mllm.prompts.check_expressions(exprs)))
            except Exception as exc:
                out[i] = item_failure(exc)
        results = run_isolated(self._reason, todo, "MLLM batch", self._stats.retry("reason"))
        for (i, *_), result in zip(todo, results):
            if isinstance(result, dict):
                result["batch"] = len(keys)
            out[i] = result
        return out

    @torch.no_grad()
    def _reason(self, items: list[tuple]) -> list[dict]:
        """items: (index, key, image H×W×3 uint8, cleaned expressions) -> one result dict each."""
        t0 = time.perf_counter()
        expressions = [exprs for *_, exprs in items]
        per_expr = [(key, image) for _, key, image, exprs in items for _ in exprs]
        m = self.model
        sem, box = reason_rows(
            m,
            [key for key, _ in per_expr],
            [t for exprs in expressions for t in exprs],
            lambda i: clip_preprocess(per_expr[i][1], m.clip_size, m.clip_mode),
            lambda i: per_expr[i][1].shape[:2],
            max_sequences=self.s.max_sequences_per_forward,
            prefix_cache=self.prefix_cache,
        )
        ms = (time.perf_counter() - t0) * 1000
        results, start = [], 0
        for exprs in expressions:
            sl = slice(start, start + len(exprs))
            start += len(exprs)
            results.append({"semantic": sem[sl], "box": None if box is None else box[sl], "ms": ms})
        return results


@serve.deployment(name="SAM")
class SAMDeployment:
    """Stage 3: SAM image encoder (with an LRU cache of embeddings), prompt encoder and mask decoder."""

    def __init__(self, settings: dict):
        self.s = ServeSettings(**settings)
        self.model = load_serving_model(self.s, parts=("sam",))  # never builds LLaVA
        self.device = torch.device(self.s.device)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        for method in (self.encode, self.decode):
            method.set_max_batch_size(self.s.max_batch_size)
            method.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)
        self._stats = _Stats()

    def stats(self) -> dict:
        """Batches run and split since the replica started (`_Stats`)."""
        return self._stats.as_dict()

    def pid(self) -> int:
        """The replica's process id (tests kill it to check that Serve replaces the replica)."""
        return os.getpid()

    def cache_info(self) -> dict:
        return {"entries": len(self.cache), "capacity": self.s.cache_images}

    @serve.batch(**BATCH_DEFAULTS)
    async def encode(self, keys: list[str], images: list[np.ndarray]) -> list[dict | ItemFailure]:
        """Per request: the image embedding (C, h, w) float32, whether it came from the cache, timing and
        the batch's size; or an ItemFailure."""
        self._stats.batch("encode", len(keys))  # blocking below on purpose: see _BATCHING
        results = run_isolated(
            self._encode, list(zip(keys, images)), "SAM encode batch", self._stats.retry("encode")
        )
        for r in results:
            if isinstance(r, dict):
                r["batch"] = len(keys)
        return results

    @torch.no_grad()
    def _encode(self, items: list[tuple[str, np.ndarray]]) -> list[dict]:
        """items: (content hash, image H×W×3 uint8) -> one result dict each."""
        keys = [key for key, _ in items]
        images = [image for _, image in items]
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
            }
            for k, im, hit in zip(keys, images, hits)
        ]

    @serve.batch(**BATCH_DEFAULTS)
    async def decode(
        self,
        encoded: list[dict | ItemFailure],
        semantic: list[np.ndarray],
        boxes: list[np.ndarray | None],
        hws: list[tuple[int, int]],
    ) -> list[dict | ItemFailure]:
        """Per request: one answer per expression (`inference.encode_answer`: its instances, their union,
        no_target), timing and the batch sizes; or an ItemFailure (the encode call's own, when that one
        failed). An expression without boxes (no target) costs the decoder nothing."""
        self._stats.batch("decode", len(encoded))  # blocking below on purpose: see _BATCHING
        items = list(zip(encoded, semantic, boxes, hws))
        todo = [it for it in items if not isinstance(it[0], ItemFailure)]
        done = iter(run_isolated(self._decode, todo, "SAM decode batch", self._stats.retry("decode")))
        out = []
        for it in items:
            result = it[0] if isinstance(it[0], ItemFailure) else next(done)
            if isinstance(result, dict):
                result["batch"] = {"sam_encode": it[0]["batch"], "sam_decode": len(encoded)}
            out.append(result)
        return out

    @torch.no_grad()
    def _decode(self, items: list[tuple]) -> list[dict]:
        """items: (encode result, semantic prompts (E, D), E box arrays (k, 4) or None, original (H, W))."""
        encoded = [e for e, _, _, _ in items]
        semantic = [s for _, s, _, _ in items]
        boxes = [b for _, _, b, _ in items]
        hws = [hw for *_, hw in items]
        t0 = time.perf_counter()
        # No cast here: the decoder casts its inputs to its own dtype (ppcr/precision.py).
        emb = torch.stack([_tensor(e["embedding"], self.device) for e in encoded])
        index = torch.tensor([i for i, s in enumerate(semantic) for _ in range(len(s))], device=self.device)
        sem = _tensor(np.concatenate(semantic), self.device)
        box = None if boxes[0] is None else [_tensor(b, self.device) for req in boxes for b in req]
        hw = torch.tensor([tuple(hw) for hw in hws], dtype=torch.long)
        sam_hw = torch.tensor([tuple(e["sam_input_hw"]) for e in encoded], dtype=torch.long)
        found = segment_rows(self.model, (emb, hw, sam_hw), (index, sem, box))
        ms = (time.perf_counter() - t0) * 1000
        results, start = [], 0
        for e, s in zip(encoded, semantic):
            results.append(
                {
                    "results": found[start : start + len(s)],
                    "decode_ms": ms,
                    "encode_ms": e["ms"],
                    "cache_hit": e["hit"],
                }
            )
            start += len(s)
        return results
