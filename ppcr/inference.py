"""The inference runtime: how every consumer turns model outputs into answers, written once.

`Segmenter` (predictor.py), `ppcr evaluate` (evaluate.py), the Serve deployments and the batch actors all
call these functions instead of re-deriving them:

    binarize(mask_logits)              SAM's logits -> bool mask, at SAM's own `mask_threshold`
    segmentations(logits, boxes, iou)  -> Segmentation(mask, box pixel XYXY, score) per expression
    predict_torch(model, batch, ...)   the tensor API (as SamPredictor.predict_torch): stages 1-3 on a
                                       collated Batch -> (Segmentation list, boxes given to SAM)
    reason_rows(model, keys, ...)      stages 1 + 2 for expressions given row by row -> numpy prompts, boxes
    segment_rows(model, images, ...)   stage 3 for given prompts -> answers (COCO RLE mask, box, score)

`reason_rows` and `segment_rows` are the model glue of both Ray layers (the Serve deployments and the
batch actors), which keep only batching, caching, statistics and Arrow <-> tensor moves.

Coordinate frames: boxes inside the model are normalized XYXY of the original image in [0, 1];
answers are pixel XYXY of the original image (geometry.py has every conversion).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .geometry import output_box
from .inputs import group_images
from .masks import encode_mask
from .segmentation_stage import MASK_THRESHOLD

if TYPE_CHECKING:
    from .inputs import Batch
    from .mllm import PrefixCache
    from .model import PPCRModel


class Segmentation(NamedTuple):
    mask: np.ndarray  # bool (H, W), original size
    box: np.ndarray  # (4,) float64 pixel XYXY, original frame
    score: float  # SAM's predicted IoU of `mask`


def binarize(mask_logits: torch.Tensor) -> np.ndarray:
    """(H, W) mask logits -> bool (H, W) numpy mask: logits above SAM's `mask_threshold`."""
    return (mask_logits > MASK_THRESHOLD).cpu().numpy()


def segmentations(
    mask_logits: Sequence[torch.Tensor], boxes01: torch.Tensor | None, iou: torch.Tensor
) -> list[Segmentation]:
    """One answer per expression: the binary mask, the pixel XYXY box (the box SAM was prompted with,
    or the mask's extent without a spatial stage) and SAM's predicted IoU as the score."""
    out = []
    for i, logits in enumerate(mask_logits):
        mask = binarize(logits)
        out.append(
            Segmentation(mask, output_box(None if boxes01 is None else boxes01[i], mask), float(iou[i]))
        )
    return out


@torch.no_grad()
def predict_torch(
    model: PPCRModel,
    batch: Batch,
    image_embeddings: torch.Tensor | None = None,
    oracle_box: bool = False,
    max_sequences: int | None = None,
) -> list[Segmentation]:
    """Stages 1-3 on a collated batch (on the model's device), teacher-forced, fixed templates.

    image_embeddings: (N, C, h, w) SAM embeddings of the batch's images, if already computed.
    oracle_box: prompt SAM with the ground-truth box (paper Table 3) instead of the predicted one.
    max_sequences: expressions per language-model forward (`PPCRModel.reason`).
    """
    model.eval()
    out = model(batch, image_embeddings=image_embeddings, oracle_box=oracle_box, max_sequences=max_sequences)
    return segmentations(out.mask_logits, out.sam_box, out.iou_pred)


@torch.no_grad()
def reason_rows(
    model: PPCRModel,
    keys: Sequence[Hashable],
    expressions: Sequence[str],
    clip_pixels: Callable[[int], torch.Tensor],
    original_hw: Callable[[int], Sequence[int]],
    max_sequences: int | None = None,
    prefix_cache: PrefixCache | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stages 1 + 2 (`PPCRModel.reason`, fixed templates) for B expressions given one by one.

    keys: (B,) the image key of each expression; equal keys share one CLIP forward and, with prefix
    sharing, one prompt prefix per pass (and, given `prefix_cache`, the keys it is stored under: they
    must then name the image's content, `inputs.image_key`). clip_pixels(i) /
    original_hw(i): the CLIP-frame pixels (3, C, C) and the original (H, W) of expression i's image,
    asked once per distinct image (its first expression). Returns the semantic prompts (B, D) float32
    and the boxes (B, 4) float32 normalized XYXY of the original image, or None without a spatial stage.
    """
    first, index = group_images(keys)
    device = model.device
    out = model.reason(
        torch.stack([clip_pixels(i) for i in first]).to(device),
        index.to(device),
        list(expressions),
        torch.tensor([tuple(original_hw(i)) for i in first], dtype=torch.long),
        max_sequences=max_sequences,
        image_keys=[keys[i] for i in first],
        prefix_cache=prefix_cache,
    )
    box = None if out.box is None else out.box.float().cpu().numpy()
    return out.semantic_prompt.float().cpu().numpy(), box


@torch.no_grad()
def segment_rows(
    model: PPCRModel,
    images: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> list[dict]:
    """Stage 3 (`PPCRModel.segment`) for given prompts -> one answer per expression.

    images: per image, (embeddings (N, C, h, w) on the model's device, original_hw (N, 2), sam_input_hw
    (N, 2)); prompts: per expression, (image_index (B,), semantic prompts (B, D), boxes (B, 4)
    normalized XYXY or None). Each answer is {"box": (4,) float64 pixel XYXY of the original image,
    "mask": COCO compressed RLE of the bool (H, W) mask, "score": SAM's predicted IoU}
    (`segmentations`, `masks.encode_mask`).
    """
    (embeddings, original_hw, sam_input_hw), (image_index, semantic, box) = images, prompts
    _, iou, logits = model.segment(embeddings, image_index, semantic, box, original_hw, sam_input_hw)
    return [
        {"box": seg.box, "mask": encode_mask(seg.mask), "score": seg.score}
        for seg in segmentations(logits, box, iou)
    ]
