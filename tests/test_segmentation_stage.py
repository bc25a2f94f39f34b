"""The batched SAM decode equals segment-anything's own per-image MaskDecoder call."""

from __future__ import annotations

import torch

from ppcr.config import load_config
from ppcr.segmentation_stage import SegmentationStage


def test_batched_decode_matches_sam_per_image_call():
    torch.manual_seed(0)
    cfg = load_config("tiny").model
    stage = SegmentationStage(cfg.sam, cfg.prompt_dim).eval()
    s = stage.image_size
    emb = stage.encode(torch.randn(3, 3, s, s))
    index = torch.tensor([0, 2, 0, 1, 2])
    sem = torch.randn(5, cfg.prompt_dim)
    boxes = torch.tensor(
        [[5.0, 6, 60, 70], [0, 0, 30, 40], [10, 10, 120, 90], [20, 30, 40, 50], [1, 2, 3, 4]]
    )
    with torch.no_grad():
        low, iou = stage.decode(emb, index, sem, boxes)
        pe = stage.sam.prompt_encoder
        for i in range(5):
            sparse, dense = pe(points=None, boxes=boxes[i : i + 1], masks=None)
            sparse = torch.cat([sparse, sem[i : i + 1, None]], dim=1)
            ref_low, ref_iou = stage.sam.mask_decoder(
                image_embeddings=emb[index[i] : index[i] + 1],
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            torch.testing.assert_close(low[i], ref_low[0, 0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i], ref_iou[0, 0], rtol=1e-4, atol=1e-4)
    assert low.shape == (5, 4 * emb.shape[-2], 4 * emb.shape[-1])


def test_decode_needs_a_prompt():
    cfg = load_config("tiny").model
    stage = SegmentationStage(cfg.sam, cfg.prompt_dim)
    emb = torch.zeros(1, cfg.prompt_dim, stage.image_size // 16, stage.image_size // 16)
    try:
        stage.decode(emb, torch.tensor([0]), None, None)
    except ValueError as exc:
        assert "at least one prompt" in str(exc)
    else:
        raise AssertionError("decode without prompts must raise")


def test_upscale_equals_sam_postprocess_masks_values_and_gradients():
    """The matrix form of the upscale gives SAM's postprocess_masks numbers and gradients, for
    landscape, portrait, square, upscaled and downscaled images, in float32 and bfloat16. The reference
    is SAM's call in float64: in float32 SAM's own result is up to ~1.4e-4 off it (its resize scales are
    rounded to float32), the matrix form ~2e-6."""
    torch.manual_seed(0)
    cfg = load_config("tiny").model
    stage = SegmentationStage(cfg.sam, cfg.prompt_dim)
    s = stage.image_size
    side = 4 * s // cfg.sam.patch_size
    for original in [(256, 200), (160, 240), (128, 128), (97, 61), (513, 300)]:
        scale = s / max(original)
        input_hw = (int(original[0] * scale + 0.5), int(original[1] * scale + 0.5))
        low = (torch.randn(3, side, side, dtype=torch.float64) * 8).requires_grad_(True)
        ref = stage.sam.postprocess_masks(low[:, None], input_hw, original)[:, 0]
        got = stage.upscale(low.float(), input_hw, original)
        assert got.shape == ref.shape == (3, *original) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
        sam32 = stage.sam.postprocess_masks(low.detach().float()[:, None], input_hw, original)[:, 0]
        torch.testing.assert_close(got, sam32, rtol=0, atol=2e-4)
        weight = torch.randn_like(ref)
        (g_ref,) = torch.autograd.grad((ref * weight).sum(), low)
        (g_got,) = torch.autograd.grad((got.double() * weight).sum(), low)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-4)
        one = stage.upscale(low[0].detach().float(), input_hw, original)
        torch.testing.assert_close(one, got[0].detach())
        half = stage.upscale(low.detach().bfloat16(), input_hw, original)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.double(), ref.detach(), rtol=0.02, atol=0.1)
