"""PPCR's joint objective (paper Eq. 7): bce·BCE + dice·Dice + l1·L1(box) + ce·CE, each term reported.

The multi-target model (`model.targets: multi`) adds presence·BCE(presence) and objectness·BCE(slots)
and takes the box and mask terms over the slots matched to targets (`multi_target_loss`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss

from .config import LossConfig
from .geometry import normalized_to_clip_square
from .segmentation_stage import MASK_THRESHOLD


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice on sigmoid(logits) vs a {0,1} target of the same (H, W) shape."""
    return _dice_rows(logits[None], target[None], eps)[0]


def _mask_terms(groups, gt_of, iou_pred: torch.Tensor):
    """The mask terms over mask logits grouped by image (`PPCROutput.mask_groups`: rows (k,), logits
    (k, H, W)): mean per-row BCE, mean per-row dice, and (SAM's predicted IoU of the rows in group order,
    their actual IoU, no grad) for the IoU head's MSE. gt_of(rows: list[int]) -> bool (k, H, W) targets."""
    bce, dice, actual = [], [], []
    for rows, logits in groups:
        logits = logits.float()
        gt = gt_of(rows.tolist()).to(logits.device)
        bce.append(
            F.binary_cross_entropy_with_logits(logits, gt.float(), reduction="none").flatten(1).mean(1)
        )
        dice.append(_dice_rows(logits, gt))
        with torch.no_grad():
            actual.append(_mask_iou_rows(logits, gt))
    order = torch.cat([rows for rows, _ in groups]).to(iou_pred.device)
    return torch.cat(bce).mean(), torch.cat(dice).mean(), (iou_pred[order].float(), torch.cat(actual))


def _dice_rows(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`dice_loss` of each of k masks: logits and {0,1} target (k, H, W) -> (k,)."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1).float()
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def _mask_iou_rows(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of each of k masks (k, H, W) with its target, at SAM's mask threshold -> (k,); an empty
    union counts 1."""
    pred = logits > MASK_THRESHOLD
    inter = (pred & gt).flatten(1).sum(1)
    union = (pred | gt).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))


def heatmap_targets(gt_boxes: torch.Tensor, hw: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 where a patch centre (square frame) lies inside the ground-truth box, else 0."""
    sq = normalized_to_clip_square(gt_boxes, hw)
    x, y = centers[:, 0][None], centers[:, 1][None]
    inside = (x >= sq[:, 0:1]) & (x <= sq[:, 2:3]) & (y >= sq[:, 1:2]) & (y <= sq[:, 3:4])
    return inside.float()


def _mass_on_target(heatmap: torch.Tensor, target: torch.Tensor) -> float:
    return float((heatmap.detach().float().softmax(-1) * target).sum(-1).mean())


def ppcr_loss(
    out, batch, weights: LossConfig, centers: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """Total loss and a dict of every term (floats) for logging.

    Mask terms are computed at the original resolution (mean over pixels, then over expressions).
    An output of the multi-target model (`out.slots`) is scored by `multi_target_loss`.
    """
    if out.slots is not None:
        return multi_target_loss(out, batch, weights, centers)
    terms: dict[str, torch.Tensor] = {}
    extra: dict[str, float] = {}
    # Per mask (mean over its pixels), then the mean over masks; computed one image at a time, since
    # the masks of one image share its size (out.mask_groups), else one mask at a time.
    groups = out.mask_groups
    if groups is None:
        groups = [(torch.tensor([i]), m[None]) for i, m in enumerate(out.mask_logits)]
    terms["bce"], dice, (iou_pred, actual) = _mask_terms(
        groups, lambda rows: torch.stack([batch.gt_masks[r] for r in rows]), out.iou_pred
    )
    if weights.iou > 0:
        # SAM's IoU head is the inference `score`; train it as SAM does (MSE to the actual mask IoU).
        terms["iou"] = F.mse_loss(iou_pred, actual)
    terms["dice"] = dice
    terms["ce"] = out.ce
    target = None
    if centers is not None and (out.heatmap is not None or out.semantic_heatmap is not None):
        target = heatmap_targets(
            batch.gt_boxes, batch.original_hw[batch.image_index], centers.to(batch.gt_boxes.device)
        )
    if out.box is not None:
        terms["l1"] = F.l1_loss(out.box.float(), batch.gt_boxes)
        if weights.giou > 0:
            terms["giou"] = generalized_box_iou_loss(out.box.float(), batch.gt_boxes, reduction="mean")
        if out.heatmap is not None and target is not None:
            if weights.box_heatmap > 0:
                terms["box_heatmap"] = F.binary_cross_entropy_with_logits(out.heatmap.float(), target)
            # Diagnostic, not a loss: the heatmap's softmax mass inside the referent's box. ≈ 1/#objects
            # when it lights every object, → 1 when language selects the referent.
            extra["heat_on_target"] = _mass_on_target(out.heatmap, target)
    if out.semantic_heatmap is not None and target is not None and weights.semantic_grounding > 0:
        terms["semantic_grounding"] = F.binary_cross_entropy_with_logits(
            out.semantic_heatmap.float(), target
        ) + F.l1_loss(out.semantic_box.float(), batch.gt_boxes)
        extra["sem_heat_on_target"] = _mass_on_target(out.semantic_heatmap, target)
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    logs = {k: float(v.detach()) for k, v in terms.items()}
    logs["loss"] = float(total.detach())
    logs.update(extra)
    return total, logs


def multi_target_loss(
    out, batch, weights: LossConfig, centers: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """The multi-target model's loss (out from `PPCRModel.forward` with matched slots) and its terms.

    presence: BCE of each expression's presence logit against "has a target" (pos_weight
    `presence_pos_weight`); objectness: BCE of every expression's slots, 1 for the slots matched to a
    target (`out.row_slot`), 0 for the others (all of them when it names nothing); l1, giou,
    box_heatmap: each matched slot against its target's box; bce, dice, iou: each matched slot's SAM
    mask against its target's mask; ce as in `ppcr_loss`; semantic_grounding: the [SEG] query's
    heatmap against every target's box and its box against their enclosing box, on the expressions
    with targets; empty_heatmap: that heatmap's peak logit against 0 on the expressions
    without one, which train presence, objectness and empty_heatmap (and ce) only. Mean over rows of
    each term; a term without rows in the batch is left out.
    """
    if batch.gt_instances is None or out.row_target is None or (out.row_target < 0).any():
        raise ValueError("multi_target_loss needs slots matched to the batch's targets (gt_instances)")
    slots = out.slots
    device = slots.presence.device
    n_targets = torch.tensor([len(b) for b, _ in batch.gt_instances], device=device)
    has = n_targets > 0
    terms: dict[str, torch.Tensor] = {"ce": out.ce}
    extra: dict[str, float] = {}
    terms["presence"] = F.binary_cross_entropy_with_logits(
        slots.presence.float(),
        has.float(),
        pos_weight=torch.tensor(weights.presence_pos_weight, device=device),
    )
    expr, slot, target = out.row_expression, out.row_slot, out.row_target
    # Every slot of a no-target expression is "not a target" (DETR's no-object class).
    obj_target = torch.zeros_like(slots.objectness, dtype=torch.float32)
    obj_target[expr, slot] = 1.0
    terms["objectness"] = F.binary_cross_entropy_with_logits(slots.objectness.float(), obj_target)
    if len(expr):
        pairs = list(zip(expr.tolist(), target.tolist()))
        gt_box = torch.stack([batch.gt_instances[i][0][j] for i, j in pairs]).to(device)
        box = slots.boxes[expr, slot].float()
        terms["l1"] = F.l1_loss(box, gt_box)
        if weights.giou > 0:
            terms["giou"] = generalized_box_iou_loss(box, gt_box, reduction="mean")
        if centers is not None:
            hw = batch.original_hw.to(device)[batch.image_index.to(device)[expr]]
            target_heat = heatmap_targets(gt_box, hw, centers.to(device))
            heat = slots.heatmaps[expr, slot]
            if weights.box_heatmap > 0:
                terms["box_heatmap"] = F.binary_cross_entropy_with_logits(heat.float(), target_heat)
            extra["heat_on_target"] = _mass_on_target(heat, target_heat)
        terms["bce"], terms["dice"], (iou_pred, actual) = _mask_terms(
            out.mask_groups,
            lambda rows: torch.stack([batch.gt_instances[pairs[r][0]][1][pairs[r][1]] for r in rows]),
            out.iou_pred,
        )
        if weights.iou > 0:
            terms["iou"] = F.mse_loss(iou_pred, actual)
    if (
        out.semantic_heatmap is not None
        and centers is not None
        and has.any()
        and weights.semantic_grounding > 0
    ):
        rows = has.nonzero().flatten()
        hw = batch.original_hw.to(device)[batch.image_index.to(device)[rows]]
        heat_target = torch.stack(
            [
                heatmap_targets(
                    batch.gt_instances[i][0].to(device),
                    hw[n : n + 1].expand(len(batch.gt_instances[i][0]), 2),
                    centers.to(device),
                ).amax(0)
                for n, i in enumerate(rows.tolist())
            ]
        )
        sem_heat = out.semantic_heatmap[rows].float()
        terms["semantic_grounding"] = F.binary_cross_entropy_with_logits(sem_heat, heat_target) + F.l1_loss(
            out.semantic_box[rows].float(), batch.gt_boxes.to(device)[rows]
        )
        extra["sem_heat_on_target"] = _mass_on_target(sem_heat, heat_target)
    if out.semantic_heatmap is not None and (~has).any() and weights.empty_heatmap > 0:
        # The hottest cell, not the mean: a single lit cell is what makes the peak say "something".
        peak = out.semantic_heatmap[~has].float().amax(dim=-1)
        terms["empty_heatmap"] = F.binary_cross_entropy_with_logits(peak, torch.zeros_like(peak))
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    logs = {k: float(v.detach()) for k, v in terms.items()}
    logs["loss"] = float(total.detach())
    logs.update(extra)
    return total, logs
