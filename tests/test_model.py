"""PPCRModel end to end on the tiny preset: shapes, frames, variants, embedding reuse, batching, loss."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from ppcr.config import load_config
from ppcr.inputs import Item, collate
from ppcr.losses import ppcr_loss
from ppcr.spatial_stage import AttentionBoxHead, MLPBoxHead, SpatialStage

SIZES = {"a": (60, 90), "b": (100, 70)}  # (H, W): one landscape, one portrait, neither square


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _image(key: str) -> np.ndarray:
    h, w = SIZES[key]
    return np.random.default_rng(ord(key)).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _item(key: str, expr: str, box: tuple[int, int, int, int]) -> Item:
    h, w = SIZES[key]
    x1, y1, x2, y2 = box
    mask = np.zeros((h, w), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return Item(key, _image(key), expr, mask, np.array(box, dtype=np.float64))


ITEMS = [
    ("a", "the red circle", (10, 5, 40, 30)),
    ("b", "the tall blue square", (20, 30, 60, 90)),
    ("a", "the green thing on the right", (50, 20, 88, 58)),
    ("b", "the small triangle at the top", (5, 2, 30, 25)),
]


@pytest.fixture(scope="module")
def batch(model):
    return collate([_item(*it) for it in ITEMS], model.clip_size, model.sam_size)


@pytest.fixture(scope="module")
def out(model, batch):
    with torch.no_grad():
        return model(batch)


def _expected_gt_boxes():
    rows = []
    for key, _, (x1, y1, x2, y2) in ITEMS:
        h, w = SIZES[key]
        rows.append([x1 / w, y1 / h, x2 / w, y2 / h])
    return torch.tensor(rows)


@contextlib.contextmanager
def _spatial(model, stage):
    """Swap the spatial stage (pytest's monkeypatch cannot restore nn.Module children)."""
    old = model.spatial
    model.spatial = stage
    try:
        yield
    finally:
        model.spatial = old


# --- batching ----------------------------------------------------------------------------------------


def test_collate_dedups_images_by_key(batch, model):
    assert batch.clip_pixels.shape == (2, 3, model.clip_size, model.clip_size)
    assert batch.sam_pixels.shape == (2, 3, model.sam_size, model.sam_size)
    assert batch.image_index.tolist() == [0, 1, 0, 1]
    assert batch.original_hw.tolist() == [list(SIZES["a"]), list(SIZES["b"])]
    assert len(batch) == 4
    torch.testing.assert_close(batch.gt_boxes, _expected_gt_boxes())
    assert [tuple(m.shape) for m in batch.gt_masks] == [SIZES[k] for k, _, _ in ITEMS]


def test_collate_rejects_mismatched_mask(model):
    bad = _item("a", "the dog", (1, 1, 5, 5))
    bad.gt_mask = np.zeros((SIZES["a"][1], SIZES["a"][0]), dtype=bool)  # transposed shape
    with pytest.raises(ValueError, match="does not match image"):
        collate([_item("b", "x", (1, 1, 2, 2)), bad], model.clip_size, model.sam_size)


def test_collate_rejects_empty():
    with pytest.raises(ValueError):
        collate([], 112, 128)


def test_collate_drops_partial_ground_truth(model):
    no_gt = Item("a", _image("a"), "the dog")
    b = collate([_item("a", "the cat", (1, 1, 5, 5)), no_gt], model.clip_size, model.sam_size)
    assert b.gt_masks is None and b.gt_boxes is None
    assert b.clip_pixels.shape[0] == 1


# --- forward -----------------------------------------------------------------------------------------


def test_forward_shapes_and_frames(out, batch, model, cfg):
    n = len(batch)
    assert out.box.shape == (n, 4)
    assert bool(((out.box >= 0) & (out.box <= 1)).all())
    assert bool((out.box[:, 0] <= out.box[:, 2]).all() and (out.box[:, 1] <= out.box[:, 3]).all())
    assert out.sam_box is out.box
    assert out.iou_pred.shape == (n,)
    assert out.semantic_prompt.shape == (n, cfg.model.prompt_dim)
    side = 4 * model.sam_size // cfg.model.sam.patch_size  # SAM upscales its embedding grid 4x
    assert out.low_res_masks.shape == (n, side, side)
    assert len(out.mask_logits) == n
    for i, (key, _, _) in enumerate(ITEMS):
        assert tuple(out.mask_logits[i].shape) == SIZES[key]
        assert torch.isfinite(out.mask_logits[i]).all()
    assert out.ce.ndim == 0 and torch.isfinite(out.ce)
    assert out.heatmap.shape == (n, model.mllm.num_image_tokens)


def test_forward_is_deterministic_in_eval(model, batch, out):
    with torch.no_grad():
        again = model(batch)
    torch.testing.assert_close(again.box, out.box, rtol=0, atol=0)
    torch.testing.assert_close(again.low_res_masks, out.low_res_masks, rtol=0, atol=0)


def test_oracle_box_uses_ground_truth(model, batch, out):
    with torch.no_grad():
        oracle = model(batch, oracle_box=True)
    torch.testing.assert_close(oracle.sam_box, batch.gt_boxes)
    torch.testing.assert_close(oracle.box, out.box)  # the prediction is still reported
    # Same semantic prompt, different box -> SAM's low-res logits differ.
    torch.testing.assert_close(oracle.semantic_prompt, out.semantic_prompt)
    assert not torch.allclose(oracle.low_res_masks, out.low_res_masks)


def test_gt_box_prob_one_equals_oracle(model, batch):
    with torch.no_grad():
        mixed = model(batch, gt_box_prob=1.0)
    torch.testing.assert_close(mixed.sam_box, batch.gt_boxes)


def test_oracle_box_needs_ground_truth(model):
    b = collate([Item("a", _image("a"), "the dog")], model.clip_size, model.sam_size)
    with pytest.raises(ValueError, match="ground-truth boxes"):
        with torch.no_grad():
            model(b, oracle_box=True)


def test_spatial_prompt_none(model, batch):
    """spatial_prompt 'none' (PPCRModel builds no spatial stage): no box, SAM gets the semantic prompt only."""
    with _spatial(model, None), torch.no_grad():
        assert model.patch_centers() is None
        res = model(batch)
    assert res.box is None and res.sam_box is None and res.heatmap is None
    assert res.low_res_masks.shape[0] == len(batch)
    for i, (key, _, _) in enumerate(ITEMS):
        assert tuple(res.mask_logits[i].shape) == SIZES[key]
    assert res.iou_pred.shape == (len(batch),)


def test_mlp_box_head(model, batch, cfg):
    torch.manual_seed(4)
    stage = SpatialStage(model.mllm, "semantic", "mlp").eval()
    assert isinstance(stage.head, MLPBoxHead)
    with _spatial(model, stage), torch.no_grad():
        assert model.patch_centers() is None
        res = model(batch)
    assert res.box.shape == (len(batch), 4) and res.heatmap is None
    assert bool(((res.box >= 0) & (res.box <= 1)).all())
    assert bool((res.box[:, :2] <= res.box[:, 2:]).all())
    _, logs = ppcr_loss(res, batch, cfg.loss, model.patch_centers())
    assert "box_heatmap" not in logs and {"l1", "giou"} <= set(logs)


def test_attention_head_is_tiny_default(model):
    assert isinstance(model.spatial.head, AttentionBoxHead)
    assert model.patch_centers().shape == (model.mllm.num_image_tokens, 2)


def test_precomputed_image_embeddings_give_identical_outputs(model, batch, out):
    with torch.no_grad():
        emb = model.segmentation.encode(batch.sam_pixels)
        res = model(batch, image_embeddings=emb)
    assert emb.shape[0] == 2  # one per distinct image, not per expression
    torch.testing.assert_close(res.low_res_masks, out.low_res_masks, rtol=0, atol=0)
    torch.testing.assert_close(res.iou_pred, out.iou_pred, rtol=0, atol=0)
    for a, b in zip(res.mask_logits, out.mask_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_repeated_image_matches_single(model, batch, out):
    """An expression decoded alongside others on the same image equals decoding it alone."""
    single = collate([_item(*ITEMS[2])], model.clip_size, model.sam_size)
    with torch.no_grad():
        res = model(single)
    torch.testing.assert_close(res.box[0], out.box[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.low_res_masks[0], out.low_res_masks[2], atol=1e-4, rtol=0)


# --- loss --------------------------------------------------------------------------------------------


LOSS_TERMS = {f.name for f in dataclasses.fields(load_config("tiny").loss)}


def _terms(logs: dict) -> set[str]:
    """The loss terms in a log dict (other keys are the total and diagnostics)."""
    return set(logs) & LOSS_TERMS


def test_loss_terms_and_weighted_total(model, batch, out, cfg):
    total, logs = ppcr_loss(out, batch, cfg.loss, model.patch_centers())
    assert _terms(logs) == {"bce", "dice", "ce", "l1", "giou", "box_heatmap", "iou", "semantic_grounding"}
    expected = sum(getattr(cfg.loss, k) * logs[k] for k in _terms(logs))
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert all(np.isfinite(v) and v >= 0 for v in logs.values())
    manual_l1 = float((out.box - batch.gt_boxes).abs().mean())
    assert logs["l1"] == pytest.approx(manual_l1, rel=1e-5)


def test_loss_without_box(model, batch, cfg):
    with _spatial(model, None), torch.no_grad():
        res = model(batch)
    total, logs = ppcr_loss(res, batch, cfg.loss, model.patch_centers())
    assert _terms(logs) == {"bce", "dice", "ce", "iou"}
    assert float(total) == pytest.approx(sum(getattr(cfg.loss, k) * logs[k] for k in _terms(logs)), rel=1e-5)


def test_loss_zero_weights_drop_optional_terms(out, batch, cfg, model):
    weights = dataclasses.replace(cfg.loss, giou=0.0, box_heatmap=0.0, iou=0.0, semantic_grounding=0.0)
    _, logs = ppcr_loss(out, batch, weights, model.patch_centers())
    assert _terms(logs) == {"bce", "dice", "ce", "l1"}
