"""The inference runtime: how every consumer turns model outputs into answers, written once.

`Segmenter` (predictor.py), `ppcr evaluate` (evaluate.py), the Serve deployments and the batch actors all
call these functions instead of re-deriving them:

    binarize(mask_logits)              SAM's logits -> bool mask, at SAM's own `mask_threshold`
    segmentations(logits, boxes, iou)  -> Segmentation(mask, box pixel XYXY, score) per expression
    predict_torch(model, batch, ...)   the tensor API (as SamPredictor.predict_torch): stages 1-3 on a
                                       collated Batch -> (Segmentation list, boxes given to SAM)

Coordinate frames: boxes inside the model are normalized XYXY of the original image in [0, 1];
answers are pixel XYXY of the original image (geometry.py has every conversion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .geometry import output_box
from .segmentation_stage import MASK_THRESHOLD

if TYPE_CHECKING:
    from .inputs import Batch
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
