"""Box slots of the multi-target model (`model.targets: multi`): set matching in training, kept slots
at inference.

The spatial stage's attention head reads K box slots per expression, each a normalized XYXY box of the
original image with an objectness score, and one presence score for the expression (spatial_stage.py).
Training matches the slots to the expression's targets one to one (`match_slots`, the Hungarian
assignment of DETR with an L1 + GIoU + objectness cost); inference keeps the slots `kept_slots` picks.
Every consumer (the model's forward, `Segmenter`, `ppcr evaluate`, the Serve replicas and batch actors)
picks slots with `kept_slots`, so they all answer alike.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou, nms

# Matching cost weights (DETR's: class 1, L1 5, GIoU 2), on normalized XYXY boxes.
COST_L1 = 5.0
COST_GIOU = 2.0
COST_OBJECTNESS = 1.0


def match_slots(
    boxes: torch.Tensor, objectness_logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one assignment of K slots to n targets minimising COST_L1·L1 + COST_GIOU·(-GIoU) +
    COST_OBJECTNESS·(-p(object)) (scipy's `linear_sum_assignment`).

    boxes: (K, 4) normalized XYXY; objectness_logits: (K,); targets: (n, 4) normalized XYXY. Returns
    (slot indices (m,), target indices (m,)) long on `boxes`' device, m = min(K, n), sorted by slot;
    with n > K the K cheapest-to-match targets are kept. Raises ValueError on mismatched shapes.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or targets.ndim != 2 or targets.shape[-1] != 4:
        raise ValueError(
            f"boxes (K, 4) and targets (n, 4) expected; got {tuple(boxes.shape)}, {tuple(targets.shape)}"
        )
    if objectness_logits.shape != boxes.shape[:1]:
        raise ValueError(
            f"objectness_logits must be (K,) = {tuple(boxes.shape[:1])}; got {tuple(objectness_logits.shape)}"
        )
    with torch.no_grad():
        b, t = boxes.float(), targets.float().to(boxes.device)
        cost = (
            COST_L1 * torch.cdist(b, t, p=1)
            - COST_GIOU * generalized_box_iou(b, t)
            - COST_OBJECTNESS * objectness_logits.float().sigmoid()[:, None]
        )
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
    device = boxes.device
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
        cols, dtype=torch.long, device=device
    )


def kept_slots(
    presence: torch.Tensor | np.ndarray,
    objectness: torch.Tensor | np.ndarray,
    boxes: torch.Tensor | np.ndarray,
    presence_threshold: float,
    objectness_threshold: float,
    nms_iou: float,
) -> list[list[int]]:
    """The slots each expression answers with: none when its presence probability is below
    `presence_threshold`; else the slots whose objectness probability reaches `objectness_threshold`
    (at least the most object-like one: presence says there is something), by falling objectness, a
    slot dropped when its box overlaps a kept one's by more than `nms_iou` IoU.

    presence: (B,) probabilities; objectness: (B, K) probabilities; boxes: (B, K, 4) normalized XYXY
    (torch or numpy). The thresholds are the model config's (`model.presence_threshold`,
    `model.objectness_threshold`, `model.slot_nms_iou`). Returns B lists of slot indices.
    """
    presence = torch.as_tensor(presence, dtype=torch.float32)
    objectness = torch.as_tensor(objectness, dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if presence.ndim != 1 or objectness.shape != (len(presence), boxes.shape[1]) or boxes.shape[-1] != 4:
        raise ValueError(
            f"presence (B,), objectness (B, K) and boxes (B, K, 4) expected; got {tuple(presence.shape)}, "
            f"{tuple(objectness.shape)}, {tuple(boxes.shape)}"
        )
    out: list[list[int]] = []
    for p, obj, bx in zip(presence.cpu(), objectness.cpu(), boxes.cpu()):
        if p < presence_threshold:
            out.append([])
            continue
        cand = (obj >= objectness_threshold).nonzero().flatten()
        if len(cand) == 0:
            cand = obj.argmax()[None]
        keep = nms(bx[cand], obj[cand], nms_iou) if nms_iou < 1 else cand[obj[cand].argsort(descending=True)]
        if nms_iou < 1:
            keep = cand[keep]
        out.append([int(k) for k in keep])
    return out
