"""Shared prompt prefix: the expressions of one image run its prefix (BOS, system prompt, USER:, image
tokens) once per LoRA branch and their suffixes against its KV cache, with the unshared path's answers."""

from __future__ import annotations

import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ppcr.batch.io import shard_rows_to_images
from ppcr.batch.stages import MLLMActor, decode_stage
from ppcr.checkpoint import load_checkpoint, save_checkpoint
from ppcr.config import ConfigError, load_config
from ppcr.evaluate import evaluate_split
from ppcr.geometry import clip_preprocess
from ppcr.inference import predict_torch, reason_rows
from ppcr.inputs import Item, collate, image_key
from ppcr.losses import ppcr_loss
from ppcr.mllm import MLLM, Prefix, PrefixCache
from ppcr.model import PPCRModel
from ppcr.serve.deployments import MLLMDeployment
from ppcr.serve.settings import resolve_settings

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny preset with the production prompt layout: a system prompt and the image before the question.
IMAGE_FIRST = {
    "model": {
        "image_position": "before",
        "share_prefix": True,
        "system_prompt": "A chat between a curious human and an assistant.",
    }
}
SIZES = [(60, 90), (100, 70), (64, 64)]
# Several expressions per image, of different lengths (different padding), images interleaved.
EXPRESSIONS = [
    (0, "the red circle"),
    (1, "the tall blue square on the left of the picture"),
    (0, "a star"),
    (2, "the small green triangle near the top right corner of the image"),
    (1, "circle"),
    (0, "the big thing in the middle"),
    (2, "the blue one"),
    (1, "the square"),
]


def _model(overrides: dict, seed: int = 0) -> PPCRModel:
    torch.manual_seed(seed)
    return PPCRModel(load_config("tiny", overrides).model).eval()


@pytest.fixture(scope="module")
def model() -> PPCRModel:
    return _model(IMAGE_FIRST)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _batch(model: PPCRModel, pairs=EXPRESSIONS):
    images = _images()
    items = [Item(i, images[i], text) for i, text in pairs]
    return collate(items, model.clip_size, model.sam_size, model.clip_mode)


class _Count:
    """Counts the language model's forwards and the tokens they run (sequences × length)."""

    def __init__(self, mllm: MLLM, monkeypatch):
        self.calls: list[tuple[int, int]] = []
        lm = mllm.llava.model.language_model
        forward = lm.forward

        def counted(*args, **kwargs):
            self.calls.append(tuple(kwargs["inputs_embeds"].shape[:2]))
            return forward(*args, **kwargs)

        monkeypatch.setattr(lm, "forward", counted)

    @property
    def tokens(self) -> int:
        return sum(b * n for b, n in self.calls)


def _run(model: PPCRModel, batch, share: bool, **kw):
    model.cfg.share_prefix = share
    try:
        with torch.no_grad():
            return model(batch, **kw)
    finally:
        model.cfg.share_prefix = True


def _assert_same(a, b):
    assert (a.box - b.box).abs().max() < 1e-4
    assert (a.semantic_prompt - b.semantic_prompt).abs().max() < 1e-4
    assert (a.heatmap - b.heatmap).abs().max() < 1e-4
    assert (a.semantic_box - b.semantic_box).abs().max() < 1e-4
    assert (a.iou_pred - b.iou_pred).abs().max() < 1e-4
    assert torch.allclose(a.ce, b.ce, atol=1e-5)
    for x, y in zip(a.mask_logits, b.mask_logits):
        assert torch.equal(x > 0, y > 0)  # masks identical (SAM's threshold is 0)


@pytest.mark.parametrize("max_sequences", [None, 1, 3, 5])
def test_shared_prefix_gives_the_unshared_answers(model, monkeypatch, max_sequences):
    batch = _batch(model)
    unshared = _run(model, batch, share=False, max_sequences=max_sequences)
    count = _Count(model.mllm, monkeypatch)
    shared = _run(model, batch, share=True, max_sequences=max_sequences)
    _assert_same(unshared, shared)
    # Per chunk (in order) and branch: one prefix forward over the chunk's distinct images, then one
    # forward of the chunk's suffixes (never the 49 image tokens); a chunk without a repeated image
    # runs its whole prompts in one forward.
    p = len(model.mllm.prefix_ids)
    step = max_sequences or len(EXPRESSIONS)
    expected = []
    for c in (EXPRESSIONS[i : i + step] for i in range(0, len(EXPRESSIONS), step)):
        images = len({img for img, _ in c})
        expected += (
            [("prefix", images), ("suffix", len(c))] * 2 if images < len(c) else [("whole", len(c))] * 2
        )
    kinds = ["prefix" if n == p else "suffix" if n < 40 else "whole" for _, n in count.calls]
    assert list(zip(kinds, [b for b, _ in count.calls])) == expected
    assert any(k == "suffix" for k in kinds) or step == 1


def test_suffixes_without_padding(model):
    """Suffixes of one length (no padding: transformers could take the causal-mask shortcut, which is
    wrong when the queries start after a cache) give the unshared answers too."""
    pairs = [(0, "the red circle"), (0, "the red circle"), (1, "the red circle"), (1, "the red circle")]
    batch = _batch(model, pairs)
    assert bool(model.mllm.prompts.encode(["the red circle"] * 4, "x").attention_mask.all())
    _assert_same(_run(model, batch, share=False), _run(model, batch, share=True))


def test_shared_prefix_through_predict_torch(model):
    """The inference runtime (Segmenter, ppcr evaluate) shares by default and answers the same."""
    batch = _batch(model)
    model.cfg.share_prefix = False
    unshared = predict_torch(model, batch)
    model.cfg.share_prefix = True
    shared = predict_torch(model, batch)
    for a, b in zip(unshared, shared):
        assert np.array_equal(a.mask, b.mask)
        assert np.abs(a.box - b.box).max() < 1e-3  # pixels
        assert abs(a.score - b.score) < 1e-4


def test_one_image_eight_expressions_runs_the_prefix_once_per_branch(model, monkeypatch):
    pairs = [(0, t) for _, t in EXPRESSIONS]
    batch = _batch(model, pairs)
    count = _Count(model.mllm, monkeypatch)
    _run(model, batch, share=True)
    shared_tokens = count.tokens
    count.calls.clear()
    _run(model, batch, share=False)
    p = len(model.mllm.prefix_ids)
    assert shared_tokens == count.tokens - 2 * 7 * p  # 7 of the 8 prefixes saved, in both passes


def test_glamm_prompt_format_shares_its_wrapped_image(monkeypatch):
    m = _model({"model": {**IMAGE_FIRST["model"], "prompt_format": "glamm", "semantic_state": "predicting"}})
    ids = m.mllm.prefix_ids.tolist()
    assert ids[-1] == m.mllm.ids["<image>"] and m.mllm.ids["<im_start>"] in ids
    batch = _batch(m)
    _assert_same(_run(m, batch, share=False, max_sequences=3), _run(m, batch, share=True, max_sequences=3))


def test_image_after_question_cannot_share_and_says_so_once(monkeypatch, caplog):
    m = _model({"model": {"share_prefix": True}})  # asked for, with the tiny preset's image_position after
    assert m.mllm.prefix_ids is None and not m.mllm.can_share_prefix
    monkeypatch.setattr("ppcr.model._SAID", set())
    with caplog.at_level(logging.WARNING, logger="ppcr.model"):
        assert not m.shares_prefix()
        assert not m.shares_prefix()
    lines = [r.getMessage() for r in caplog.records if "prefix sharing" in r.getMessage()]
    assert len(lines) == 1 and "image_position is 'after'" in lines[0]
    with pytest.raises(ValueError, match="no shared prefix"):
        m.mllm.prefix("semantic", torch.zeros(1, m.mllm.num_image_tokens, m.mllm.hidden_size))


def test_training_step_shares_with_the_unshared_gradients(monkeypatch):
    """Training shares too (train mode, template sampling, the loss's terms): the gradients of every
    parameter equal the unshared step's (LoRA dropout 0, so both steps draw no dropout masks)."""
    run = load_config("tiny", {**IMAGE_FIRST, "model": {**IMAGE_FIRST["model"], "lora": {"dropout": 0.0}}})
    torch.manual_seed(0)
    m = PPCRModel(run.model).train()
    images = _images()
    items = []
    for i, text in EXPRESSIONS:
        h, w = SIZES[i]
        mask = np.zeros((h, w), dtype=bool)
        mask[5:30, 10:40] = True
        items.append(Item(i, images[i], text, mask, np.array([10.0, 5.0, 40.0, 30.0])))
    batch = collate(items, m.clip_size, m.sam_size, m.clip_mode)

    def step(share: bool):
        m.cfg.share_prefix = share
        m.zero_grad()
        count = _Count(m.mllm, monkeypatch)
        out = m(batch, rng=random.Random(0), max_sequences=5)
        loss, _ = ppcr_loss(out, batch, run.loss, m.patch_centers())
        loss.backward()
        monkeypatch.undo()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return loss.item(), grads, count.tokens

    loss_a, grads_a, tokens_a = step(False)
    loss_b, grads_b, tokens_b = step(True)
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and tokens_b < tokens_a
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name, g in grads_a.items():
        assert (g - grads_b[name]).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name


def test_gradient_checkpointing_in_training_runs_whole_prompts_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr("ppcr.model._SAID", set())
    m = _model({"model": {**IMAGE_FIRST["model"], "gradient_checkpointing": True}})
    assert m.shares_prefix()  # inference: the checkpointing is a training matter
    m.train()
    with caplog.at_level(logging.WARNING, logger="ppcr.model"):
        assert not m.shares_prefix() and not m.shares_prefix()
    lines = [r.getMessage() for r in caplog.records if "prefix sharing" in r.getMessage()]
    assert len(lines) == 1 and "gradient_checkpointing" in lines[0]
    m.cfg.share_prefix = False
    m.eval()
    assert not m.shares_prefix()


def test_prefix_checks_its_rows(model):
    feats = model.mllm.image_features(_batch(model).clip_pixels)
    with torch.no_grad():
        prefix = model.mllm.prefix("semantic", feats)
    assert prefix.num_images == 3 and prefix.length == len(model.mllm.prefix_ids)
    assert prefix.image_states.shape == (3, model.mllm.num_image_tokens, model.mllm.hidden_size)
    with pytest.raises(ValueError, match="outside the prefix's 3 images"):
        prefix.rows(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="indexed by row"):
        model.semantic(model.mllm, None, ["the red circle"], prefix=prefix)
    single = prefix.select([1])
    assert single.num_images == 1 and torch.equal(single.keys[0][0], prefix.keys[0][1])
    assert torch.equal(Prefix.cat([prefix.select([2]), single]).image_states, prefix.image_states[[2, 1]])


def test_prefix_cache_across_calls(model, monkeypatch):
    """A second call on the same images runs only suffixes (no vision tower, no prefix) and answers the same."""
    batch = _batch(model)
    keys = ["k0", "k1", "k2"]
    cache = PrefixCache(capacity=4)

    def reason():
        with torch.no_grad():
            return model.reason(
                batch.clip_pixels,
                batch.image_index,
                batch.expressions,
                batch.original_hw,
                max_sequences=3,
                image_keys=keys,
                prefix_cache=cache,
            )

    first = reason()
    assert cache.stats()["entries"] == 3 and cache.misses == 6  # 3 images x 2 branches
    assert cache.stats()["bytes"] > 0
    hits = cache.hits  # later chunks find the earlier chunks' images
    count = _Count(model.mllm, monkeypatch)
    vision = []
    monkeypatch.setattr(model.mllm, "image_features", lambda px: vision.append(px) or None)
    second = reason()
    assert vision == [] and cache.misses == 6 and cache.hits > hits
    assert all(n != len(model.mllm.prefix_ids) for _, n in count.calls)
    assert torch.equal(first.box, second.box) and torch.equal(first.semantic_prompt, second.semantic_prompt)
    monkeypatch.undo()
    model.cfg.share_prefix = False
    with torch.no_grad():
        unshared = model.reason(batch.clip_pixels, batch.image_index, batch.expressions, batch.original_hw)
    model.cfg.share_prefix = True
    assert (unshared.box - second.box).abs().max() < 1e-4


def test_prefix_cache_is_lru_and_checked(model):
    with pytest.raises(ValueError, match=">= 1"):
        PrefixCache(0)
    feats = model.mllm.image_features(_batch(model).clip_pixels)
    with torch.no_grad():
        prefix = model.mllm.prefix("semantic", feats)
    cache = PrefixCache(2)
    with pytest.raises(ValueError, match="one image's prefix"):
        cache.put("a", "semantic", prefix)
    for k, i in (("a", 0), ("b", 1)):
        cache.put(k, "semantic", prefix.select([i]))
    assert cache.lookup(["a"], "semantic")[0] is not None  # "a" is now the most recent
    cache.put("c", "semantic", prefix.select([2]))
    assert list(cache.entries) == ["a", "c"]
    assert cache.lookup(["b"], "semantic") == [None] and cache.lookup(["a"], "spatial") == [None]
    assert not cache.holds("a", ("semantic", "spatial")) and cache.holds("a", ("semantic",))
    with pytest.raises(ValueError, match="image key per image row"):
        b = _batch(model)
        model.reason(b.clip_pixels, b.image_index, b.expressions, b.original_hw, prefix_cache=cache)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    """An inference checkpoint of the image-first tiny model."""
    return save_checkpoint(model, tmp_path_factory.mktemp("first") / "ckpt")


class _Prefixes:
    """Records the number of images of each `MLLM.prefix` call of a model."""

    def __init__(self, mllm: MLLM, monkeypatch):
        self.sizes: list[int] = []
        run = mllm.prefix

        def counted(adapter, image_features):
            self.sizes.append(len(image_features))
            return run(adapter, image_features)

        monkeypatch.setattr(mllm, "prefix", counted)


def test_evaluate_shares_each_batchs_images(model, val_dir, monkeypatch):
    """ppcr evaluate (in process): batches of expressions in shard order reach the model grouped by
    image, one prefix per distinct image and branch, with the unshared metrics."""
    model.cfg.share_prefix = False
    want = evaluate_split(model, val_dir, batch_size=8, limit_images=4, progress=False)
    model.cfg.share_prefix = True
    seen = _Prefixes(model.mllm, monkeypatch)
    got = evaluate_split(model, val_dir, batch_size=8, limit_images=4, progress=False)
    assert got == pytest.approx(want, abs=1e-6)
    assert sum(seen.sizes) < 2 * got["count"]  # fewer prefixes than expressions: images were grouped


def test_batch_actor_shares_each_rows_image(checkpoint, val_dir, monkeypatch):
    """ppcr batch / evaluate --ray: the MLLM actor gets image rows with their expressions; each row's
    image runs its prefix once per branch (per chunk of max_expr), with the unshared answers."""
    shard = pa.concat_tables([pq.read_table(f) for f in sorted(val_dir.glob("part-*.parquet"))])
    images = shard_rows_to_images(shard, split="val", with_gt=True, done=None).slice(0, 5)
    m = load_checkpoint(checkpoint)
    decoded = decode_stage(images, m.clip_size, m.sam_size, checkpoint=str(checkpoint))
    actor = MLLMActor(str(checkpoint), None, "cpu", 1, max_expr=64)
    seen = _Prefixes(actor.model.mllm, monkeypatch)
    shared = actor(decoded)
    rows = [r for r in decoded.to_pylist() if None in r["errors"]]  # rows with an expression to run
    assert sum(len(r["texts"]) for r in rows) > len(rows) > 1
    assert seen.sizes == [len(rows)] * 2  # one prefix per image row and branch
    actor.model.cfg.share_prefix = False
    unshared = actor(decoded)
    for a, b in zip(shared["boxes"].to_pylist(), unshared["boxes"].to_pylist()):
        np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), atol=1e-4)


def test_serve_replica_keeps_prefixes_across_requests(checkpoint):
    """The Serve MLLM replica (its class, in process): a second request on the same image hits the prefix
    cache for both branches and answers as the unshared model does."""
    replica = MLLMDeployment.func_or_class({"checkpoint": str(checkpoint), "prefix_cache_images": 2})
    image = _images()[0]
    key = image_key(image)
    first = replica._reason_batch([key], [image], [["the red circle", "a star"]])[0]
    assert replica.stats()["prefix_cache"] | {"bytes": 0} == {
        "entries": 1,
        "capacity": 2,
        "hits": 0,
        "misses": 2,
        "bytes": 0,
    }
    second = replica._reason_batch([key], [image], [["the big square"]])[0]
    stats = replica.stats()["prefix_cache"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 2, 1)
    model = replica.model
    model.cfg.share_prefix = False
    sem, box = reason_rows(
        model,
        [key] * 3,
        ["the red circle", "a star", "the big square"],
        lambda i: clip_preprocess(image, model.clip_size, model.clip_mode),
        lambda i: image.shape[:2],
    )
    got = np.concatenate([first["box"], second["box"]])
    np.testing.assert_allclose(got, box, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([first["semantic"], second["semantic"]]), sem, atol=1e-4)


def test_prefix_cache_setting_is_validated():
    with pytest.raises(ConfigError, match="args.prefix_cache_images must be >= 0; got -1"):
        resolve_settings({"prefix_cache_images": -1})
    assert resolve_settings({"prefix_cache_images": 0}).prefix_cache_images == 0


def test_serve_replica_of_a_model_without_sharing_keeps_no_prefixes(tiny_checkpoint):
    replica = MLLMDeployment.func_or_class({"checkpoint": str(tiny_checkpoint)})
    assert replica.prefix_cache is None and replica.stats()["prefix_cache"] is None
    assert not load_config("tiny").model.share_prefix  # the preset says it has nothing to share
