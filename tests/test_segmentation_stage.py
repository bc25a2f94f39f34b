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
