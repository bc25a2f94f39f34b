"""Model inputs: (image, expression[, ground truth]) items -> a model batch, one row per image, one per expression.

Images are deduplicated by key so a batch with several expressions on one image encodes it once
(CLIP and SAM), which is how RefCOCO is shaped (≈ 7 expressions per image). Every consumer (training,
evaluation, `Segmenter`, the Serve deployments, the batch actors, the streaming loader) forms its
inputs with these:

    image_key(image)                   content hash of a decoded image (equal pixels, one encoding)
    group_images(keys)                 expressions -> one row per distinct image + `image_index`
    ground_truth_boxes(boxes, hws)     pixel XYXY ground truth -> normalized XYXY (targets, the oracle box)
    collate(items, ...)                Items -> Batch
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .geometry import normalize_box, preprocess_image


def image_key(image: np.ndarray) -> str:
    """Content hash of a decoded image: equal pixels share SAM/CLIP encodings within a call."""
    return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).hexdigest()


def group_images(keys: Sequence[Hashable]) -> tuple[list[int], torch.Tensor]:
    """Distinct images of a list of expressions, in first-seen order.

    keys: one image key per expression (a content hash, an image id). Returns (for each distinct image
    the position of its first expression, image_index (B,) long: each expression's image row).
    """
    rows: dict[Hashable, int] = {}
    first: list[int] = []
    index = []
    for i, key in enumerate(keys):
        if key not in rows:
            rows[key] = len(rows)
            first.append(i)
        index.append(rows[key])
    return first, torch.tensor(index, dtype=torch.long)


def ground_truth_boxes(boxes_xyxy: Sequence[np.ndarray], hws: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Pixel XYXY ground-truth boxes, each in its image's (H, W), -> (B, 4) float32 normalized XYXY
    clamped to [0, 1] (what training targets and the oracle box prompt are)."""
    if len(boxes_xyxy) != len(hws):
        raise ValueError(f"{len(boxes_xyxy)} boxes but {len(hws)} image sizes")
    out = np.stack(
        [normalize_box(np.asarray(b, dtype=np.float64), tuple(hw)) for b, hw in zip(boxes_xyxy, hws)]
    )
    return torch.tensor(out, dtype=torch.float32).clamp(0, 1)


@dataclass
class Item:
    """One expression on one image. gt_mask: bool H×W; gt_box: pixel XYXY of the original image."""

    key: Hashable  # identifies the image (e.g. image_id or a content hash)
    image: np.ndarray  # H×W×3 uint8
    expression: str
    gt_mask: np.ndarray | None = None
    gt_box: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    # Each target on its own (model.targets multi trains on them): (boxes (n, 4) pixel XYXY, masks
    # bool (n, H, W)); n = 0 for an expression naming nothing. gt_mask / gt_box are their union.
    gt_instances: tuple[np.ndarray, np.ndarray] | None = None


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
    # Per expression, each target: (boxes (n, 4) normalized XYXY, masks (n, H, W) bool); n may be 0.
    gt_instances: list[tuple[torch.Tensor, torch.Tensor]] | None = None

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
            gt_instances=None
            if self.gt_instances is None
            else [(b.to(device), m.to(device)) for b, m in self.gt_instances],
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
    gt_instances = None
    if has_gt and all(it.gt_instances is not None for it in items):
        gt_instances = []
        for it in items:
            boxes, masks = it.gt_instances
            size = it.image.shape[:2]
            if len(boxes) != len(masks) or masks.shape[1:] != size:
                raise ValueError(
                    f"ground-truth instances {boxes.shape} / {masks.shape} do not match image {size}"
                )
            norm = ground_truth_boxes(list(boxes), [size] * len(boxes)) if len(boxes) else torch.zeros(0, 4)
            gt_instances.append((norm, torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))))
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
        gt_instances=gt_instances,
    )
