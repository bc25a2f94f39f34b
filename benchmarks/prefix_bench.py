"""Shared prompt prefix: language-model tokens and wall time per expression, shared vs unshared, at 1, 2,
4, 8 expressions per image, side by side in one process; and a prefix-cache hit vs a miss.

    python benchmarks/prefix_bench.py            # the configuration below, ~5 min on 2 cores
    python benchmarks/prefix_bench.py --smoke    # 64 image tokens, 128 wide, 1 and 2 expressions: < 1 min
    flock /tmp/ppcr-heavy.lock python benchmarks/prefix_bench.py --real-size   # ~15 GB, ~15 min

--real-size: the `llava-1.5-7b` preset (bf16, random weights, only the "mllm" part, as an MLLM replica
builds it) and `PPCRModel.reason` on 1 and 7 expressions of one image (RefCOCO's evaluation splits carry
~7 per image), shared and unshared, one run each.

Configuration (random init; what the language model costs dominates, as at real size): the production
prompt layout (`image_position: before`, LLaVA-1.5's system prompt), 576 image tokens (CLIP at 336 px,
patch 14, a narrow 2-layer tower), a Llama language model 1024 wide × 4 layers, the tiny SAM. Each
point is `Segmenter.segment_batch([image] * k, k expressions)`, the median of `--repeats` runs, with
`model.share_prefix` off and on alternately on the same model. Tokens are those the language model runs (prefix
and suffix forwards, padding included), counted at its forward. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ppcr.config import ModelConfig, load_config
from ppcr.inputs import Item, collate
from ppcr.mllm import PrefixCache
from ppcr.model import PPCRModel
from ppcr.predictor import Segmenter

EXPRESSIONS = [
    "the man in the yellow shirt on the left",
    "bottle of water",
    "the woman holding an umbrella",
    "dog lying on the grass near the bench",
    "second car from the right",
    "the small red sign",
    "person in the back wearing a black hat",
    "the table in the middle",
]


def config(smoke: bool) -> ModelConfig:
    """The benchmark's model: tiny's SAM and tokenizer, the production prompt layout, 576 image tokens
    (smoke: 64, and a 128-wide language model)."""
    width, layers, side = (128, 2, 112) if smoke else (1024, 4, 336)
    return load_config(
        "tiny",
        {
            "model": {
                "image_position": "before",
                "system_prompt": ModelConfig.system_prompt,
                "vision": {
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_layers": 2,
                    "num_heads": 2,
                    "image_size": side,
                    "patch_size": 14,
                    "feature_layer": -2,
                },
                "language": {
                    "hidden_size": width,
                    "intermediate_size": width * 11 // 4,
                    "num_layers": layers,
                    "num_heads": width // 64,
                    "max_position_embeddings": 1024,
                    "initializer_range": 0.02,
                },
            }
        },
    ).model


class TokenCount:
    """Tokens (sequences × length) through the language model's forward."""

    def __init__(self, model: PPCRModel):
        self.n = 0
        lm = model.mllm.llava.model.language_model
        forward = lm.forward

        def counted(*args, **kwargs):
            self.n += int(np.prod(kwargs["inputs_embeds"].shape[:2]))
            return forward(*args, **kwargs)

        lm.forward = counted


def measure(seg: Segmenter, count: TokenCount, image: np.ndarray, k: int, repeats: int) -> dict:
    """{share: {"s": median wall seconds, "tokens_per_expr"}} of `segment_batch` on k expressions of one
    image, unshared and shared runs alternating (after one warm-up run of each)."""
    texts = EXPRESSIONS[:k]
    times: dict[bool, list[float]] = {False: [], True: []}
    tokens: dict[bool, int] = {}
    for r in range(repeats + 1):
        for share in (False, True):
            seg.model.cfg.share_prefix = share
            count.n = 0
            t0 = time.perf_counter()
            seg.segment_batch([image] * k, texts)
            if r:  # run 0 warms up
                times[share].append(time.perf_counter() - t0)
            tokens[share] = count.n
    return {
        share: {"s": statistics.median(times[share]), "tokens_per_expr": tokens[share] / k} for share in times
    }


def cache_hit(model: PPCRModel, image: np.ndarray, repeats: int) -> tuple[float, float]:
    """Seconds of `PPCRModel.reason` for one expression on an image: prefix-cache miss, then hit (what
    the Serve MLLM replica runs for a first and a second request on the same image)."""
    model.cfg.share_prefix = True
    batch = collate([Item("img", image, EXPRESSIONS[0])], model.clip_size, model.sam_size)
    miss, hit = [], []
    for _ in range(repeats + 1):
        cache = PrefixCache(1)
        for out in (miss, hit):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.reason(
                    batch.clip_pixels,
                    batch.image_index,
                    batch.expressions,
                    batch.original_hw,
                    image_keys=["img"],
                    prefix_cache=cache,
                )
            out.append(time.perf_counter() - t0)
    return statistics.median(miss[1:]), statistics.median(hit[1:])


def reason_seconds(model: PPCRModel, image: np.ndarray, k: int, share: bool) -> float:
    """Wall seconds of one `PPCRModel.reason` (stages 1 + 2) on k expressions of one image."""
    model.cfg.share_prefix = share
    batch = collate([Item("img", image, t) for t in EXPRESSIONS[:k]], model.clip_size, model.sam_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.reason(batch.clip_pixels, batch.image_index, batch.expressions, batch.original_hw)
    return time.perf_counter() - t0


def real_size() -> None:
    """`--real-size`: LLaVA-1.5-7B's geometry in bf16, the language stages only."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = PPCRModel(load_config("llava-1.5-7b").model, parts=("mllm",)).eval()
    print(
        f"built the 7B mllm part in {time.perf_counter() - t0:.0f} s; shared prefix {len(model.mllm.prefix_ids)} "
        f"tokens; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    reason_seconds(model, image, 1, False)  # warm-up
    got = {}
    for k, share in ((1, False), (7, True), (7, False)):
        got[k, share] = reason_seconds(model, image, k, share)
        print(
            f"{k} expression(s), {'shared' if share else 'unshared'}: {got[k, share]:.1f} s "
            f"({got[k, share] / k:.1f} s per expression)",
            flush=True,
        )
    per = {share: got[7, share] / 7 for share in (False, True)}
    print(
        f"7 expressions per image: {per[True]:.1f} s per expression shared vs {per[False]:.1f} unshared "
        f"({per[True] / per[False]:.2f}x); vs 1 expression alone {got[1, False]:.1f} s "
        f"(7 shared = {got[7, True] / got[1, False]:.2f}x one)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a small model, 1 and 2 expressions (< 1 min)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (default 3; smoke 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--real-size", action="store_true", help="LLaVA-1.5-7B in bf16, 1 and 7 expressions")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.real_size:
        real_size()
        return
    repeats = a.repeats or (1 if a.smoke else 3)
    torch.manual_seed(0)
    cfg = config(a.smoke)
    model = PPCRModel(cfg).eval()
    seg = Segmenter(model, batch_size=16)
    count = TokenCount(model)
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    ks = (1, 2) if a.smoke else (1, 2, 4, 8)
    lang = cfg.language
    print(
        f"language {lang.hidden_size} wide x {lang.num_layers} layers, {model.mllm.num_image_tokens} image "
        f"tokens, shared prefix {len(model.mllm.prefix_ids)} tokens; torch threads {torch.get_num_threads()}"
    )
    rows = {}
    for k in ks:
        rows[k] = measure(seg, count, image, k, repeats)
    base = {share: rows[1][share]["s"] for share in (False, True)}
    print(
        "| expressions per image | LM tokens per expression (unshared / shared) | wall s (unshared / shared) "
        "| time vs 1 expression (unshared / shared) |"
    )
    print("|---|---|---|---|")
    for k, r in rows.items():
        u, s = r[False], r[True]
        print(
            f"| {k} | {u['tokens_per_expr']:.0f} / {s['tokens_per_expr']:.0f} | {u['s']:.3f} / {s['s']:.3f} "
            f"| {u['s'] / base[False]:.2f}x / {s['s'] / base[True]:.2f}x |"
        )
    miss, hit = cache_hit(model, image, repeats)
    print(
        f"prefix cache, one expression: first request (miss) {miss:.3f} s, second (hit) {hit:.3f} s "
        f"({hit / miss:.2f}x)"
    )


if __name__ == "__main__":
    main()
