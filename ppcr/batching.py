"""Turn (image, expression[, ground truth]) items into a model batch: one row per image, one per expression.

Images are deduplicated by key so a batch with several expressions on one image encodes it once
(CLIP and SAM), which is how RefCOCO is shaped (≈ 7 expressions per image).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .geometry import preprocess_image
from .inference import ground_truth_boxes, group_images


@dataclass
class Item:
    """One expression on one image. gt_mask: bool H×W; gt_box: pixel XYXY of the original image."""

    key: Hashable  # identifies the image (e.g. image_id or a content hash)
    image: np.ndarray  # H×W×3 uint8
    expression: str
    gt_mask: np.ndarray | None = None
    gt_box: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    clip_pixels: torch.Tensor  # (N, 3, C, C) CLIP frame
    sam_pixels: torch.Tensor  # (N, 3, S, S) SAM frame
    original_hw: torch.Tensor  # (N, 2) long
    sam_input_hw: torch.Tensor  # (N, 2) long, resized size inside the padded SAM frame
    image_index: torch.Tensor  # (B,) long, row of the image arrays for each expression
    expressions: list[str]
    gt_masks: list[torch.Tensor] | None = None  # B × (H, W) bool, original size
    gt_boxes: torch.Tensor | None = None  # (B, 4) normalized XYXY
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.expressions)

    def to(self, device: torch.device | str) -> Batch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            clip_pixels=mv(self.clip_pixels),
            sam_pixels=mv(self.sam_pixels),
            original_hw=mv(self.original_hw),
            sam_input_hw=mv(self.sam_input_hw),
            image_index=mv(self.image_index),
            expressions=self.expressions,
            gt_masks=None if self.gt_masks is None else [m.to(device) for m in self.gt_masks],
            gt_boxes=mv(self.gt_boxes),
            meta=self.meta,
        )


def collate(items: Sequence[Item], clip_size: int, sam_size: int, clip_mode: str = "pad") -> Batch:
    """Preprocess each distinct image once; ground truth is kept only if every item has it.
    clip_mode: the model's `clip_preprocess` ("pad" | "crop")."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    first, index = group_images([it.key for it in items])
    clip, sam, hw, in_hw = [], [], [], []
    for i in first:
        c, s, size_in_sam = preprocess_image(items[i].image, clip_size, sam_size, clip_mode)
        clip.append(c)
        sam.append(s)
        hw.append(items[i].image.shape[:2])
        in_hw.append(size_in_sam)
    has_gt = all(it.gt_mask is not None and it.gt_box is not None for it in items)
    gt_masks = gt_boxes = None
    if has_gt:
        gt_masks = []
        for it in items:
            h, w = it.image.shape[:2]
            if it.gt_mask.shape != (h, w):
                raise ValueError(f"ground-truth mask {it.gt_mask.shape} does not match image {(h, w)}")
            gt_masks.append(torch.from_numpy(np.ascontiguousarray(it.gt_mask, dtype=bool)))
        gt_boxes = ground_truth_boxes([it.gt_box for it in items], [it.image.shape[:2] for it in items])
    return Batch(
        clip_pixels=torch.stack(clip),
        sam_pixels=torch.stack(sam),
        original_hw=torch.tensor(hw, dtype=torch.long),
        sam_input_hw=torch.tensor(in_hw, dtype=torch.long),
        image_index=index,
        expressions=[it.expression for it in items],
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        meta=[it.meta for it in items],
    )
