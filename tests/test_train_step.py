"""What made the tiny training step cheaper changes no number: SAM embeddings cached per image, the mask
upscale and the mask losses computed one image at a time (docs/learning.md, "Cost of a step")."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ppcr.geometry import normalized_to_sam_frame
from ppcr.inputs import Item, collate
from ppcr.losses import dice_loss, ppcr_loss
from ppcr.model import PPCRModel
from ppcr.train import SamEmbeddingCache, batch_image_keys

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"a": (60, 90), "b": (100, 70), "c": (80, 80), "d": (50, 50)}


def _item(key: str, expr: str, box: tuple[int, int, int, int]) -> Item:
    h, w = SIZES[key]
    x1, y1, x2, y2 = box
    mask = np.zeros((h, w), dtype=bool)
    mask[y1:y2, x1:x2] = True
    image = np.random.default_rng(ord(key)).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Item(key, image, expr, mask, np.array(box, dtype=np.float64))


# Interleaved images, so per-image groups are not contiguous rows.
ITEMS = [
    _item("a", "the red circle", (10, 5, 40, 30)),
    _item("b", "the blue square", (20, 30, 60, 90)),
    _item("a", "the green thing", (50, 20, 88, 58)),
    _item("c", "the small triangle", (5, 2, 30, 25)),
    _item("b", "the big star", (0, 0, 70, 50)),
]


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return PPCRModel(cfg.model)


@pytest.fixture(scope="module")
def batch(model):
    return collate(ITEMS, model.clip_size, model.sam_size)


def test_sam_embedding_cache_equals_encoding_and_encodes_each_image_once(model, batch):
    cache = SamEmbeddingCache(model)
    keys = batch_image_keys(ITEMS)
    assert keys == ["a", "b", "c"]  # collate's row order
    first = cache.get(batch, keys)
    assert torch.equal(first, model.segmentation.encode(batch.sam_pixels))
    calls = []
    encode = model.segmentation.encode
    model.segmentation.encode = lambda px: calls.append(len(px)) or encode(px)
    try:
        again = collate([ITEMS[3], _item("d", "x", (1, 1, 5, 5)), ITEMS[0]], model.clip_size, model.sam_size)
        got = cache.get(again, ["c", "d", "a"])
    finally:
        del model.segmentation.encode
    assert calls == [1]  # only the new image
    assert torch.equal(got[0], first[2]) and torch.equal(got[2], first[0])
    assert len(cache) == 4


def test_sam_embedding_cache_refuses_a_trainable_encoder(cfg):
    torch.manual_seed(0)
    m = PPCRModel(cfg.model)
    m.segmentation.sam.image_encoder.neck[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        SamEmbeddingCache(m)


def _loss_one_mask_at_a_time(out, batch, cfg, model):
    """The per-expression formulation the grouped loss replaced (mean over pixels, then masks)."""
    bce = torch.stack(
        [F.binary_cross_entropy_with_logits(m, g.float()) for m, g in zip(out.mask_logits, batch.gt_masks)]
    )
    dice = torch.stack([dice_loss(m, g) for m, g in zip(out.mask_logits, batch.gt_masks)])
    return bce.mean(), dice.mean()


def test_grouped_masks_and_losses_equal_the_per_expression_ones(model, batch, cfg):
    torch.manual_seed(1)
    out = model(batch, rng=random.Random(0), gt_box_prob=0.5, gt_box_jitter=0.1)
    assert out.mask_groups is not None and sum(len(r) for r, _ in out.mask_groups) == len(batch)
    for i in range(len(batch)):  # each full-size mask is the upscale of its own low-res mask
        img = int(batch.image_index[i])
        sizes = tuple(batch.sam_input_hw[img].tolist()), tuple(batch.original_hw[img].tolist())
        assert torch.equal(out.mask_logits[i], model.segmentation.upscale(out.low_res_masks[i], *sizes))
        sam = model.segmentation.sam.postprocess_masks(out.low_res_masks[i][None, None], *sizes)[0, 0]
        torch.testing.assert_close(out.mask_logits[i], sam, rtol=0, atol=2e-4)
    # SAM got each prompt's box in its own image's frame.
    hw = batch.original_hw[batch.image_index]
    frames = torch.stack(
        [
            normalized_to_sam_frame(out.sam_box[i], tuple(hw[i].tolist()), model.sam_size)
            for i in range(len(batch))
        ]
    )
    emb = model.segmentation.encode(batch.sam_pixels)
    low, _ = model.segmentation.decode(emb, batch.image_index, out.semantic_prompt, frames)
    assert torch.allclose(low, out.low_res_masks, atol=1e-5)

    grouped, logs = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
    single, single_logs = ppcr_loss(
        dataclasses.replace(out, mask_groups=None), batch, cfg.loss, model.patch_centers()
    )
    with torch.no_grad():
        bce, dice = _loss_one_mask_at_a_time(out, batch, cfg, model)
    assert logs["bce"] == pytest.approx(float(bce), rel=1e-5)
    assert logs["dice"] == pytest.approx(float(dice), rel=1e-5)
    assert logs == pytest.approx(single_logs, rel=1e-5)
    # The same gradients reach the model through the grouped tensors.
    grads = {}
    for name, loss in (("grouped", grouped), ("single", single)):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads[name] = model.segmentation.sam.mask_decoder.output_upscaling[0].weight.grad.clone()
    assert torch.allclose(grads["grouped"], grads["single"], rtol=1e-4, atol=1e-7)
