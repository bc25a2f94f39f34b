"""Referring-image-segmentation metrics: oIoU, mIoU, Prec@t and box accuracy.

Masks are HxW arrays in image pixel coordinates (bool, or 0/1 integers: anything ``!= 0`` is foreground).
Boxes are pixel XYXY ``(x1, y1, x2, y2)`` in continuous coordinates: the box ``[0, 0, 10, 10]`` covers
pixels 0..9 on each axis and has area 100 (no ``+1`` convention).

:class:`RISMetrics` keeps only running sums (O(1) memory), so shards evaluated on different workers can
be reduced exactly with :meth:`RISMetrics.merge` or shipped as :meth:`RISMetrics.state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

# Relative slack for the box-accuracy threshold only: box IoUs come from float coordinates, so an IoU that
# is exactly 0.5 on paper may land a rounding error below it. Mask IoUs are compared exactly (integers).
_BOX_EPS = 1e-9


def _as_mask(mask: Any, name: str) -> np.ndarray:
    """Return ``mask`` as a bool HxW array (foreground = ``!= 0``); ValueError if it is not 2-D."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D HxW mask, got shape {arr.shape}")
    return arr if arr.dtype == np.bool_ else arr != 0


def mask_iou_parts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Intersection and union pixel counts of two HxW masks (bool or 0/1) of the same shape."""
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"mask shape mismatch: pred {p.shape} vs gt {g.shape}")
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return inter, union


def _as_box(box: Any, name: str) -> tuple[float, float, float, float]:
    vals = np.asarray(box, dtype=np.float64).reshape(-1)
    if vals.shape != (4,):
        raise ValueError(f"{name} must have 4 values (x1, y1, x2, y2), got shape {np.shape(box)}")
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"{name} has non-finite coordinates: {vals.tolist()}")
    x1, y1, x2, y2 = (float(v) for v in vals)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{name} must satisfy x1 <= x2 and y1 <= y2, got {[x1, y1, x2, y2]}")
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two pixel XYXY boxes in continuous coordinates (area = (x2-x1)*(y2-y1), no +1).

    Zero-area boxes are allowed; if the union has zero area the IoU is 0.0. Raises ValueError when a box
    does not have 4 finite values or has ``x2 < x1`` / ``y2 < y1``.
    """
    ax1, ay1, ax2, ay2 = _as_box(a, "box a")
    bx1, by1, bx2, by2 = _as_box(b, "box b")
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union <= 0.0:
        return 0.0
    return inter / union


class RISMetrics:
    """Running RIS metrics over referring expressions (one update per expression).

    Reported by :meth:`compute`:
      * ``oIoU``: overall IoU, sum of intersections / sum of unions over all expressions;
      * ``mIoU``: mean per-expression IoU (an expression whose prediction and ground truth are both empty
        scores 1.0 here and adds nothing to ``oIoU``);
      * ``Prec@t``: fraction of expressions with IoU >= t (inclusive) for each t in :attr:`thresholds`;
      * ``BoxAcc@0.5``: fraction with box IoU >= 0.5, only when every expression came with boxes;
      * ``count``: number of expressions.
    """

    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)

    def __init__(self, thresholds: Sequence[float] | None = None) -> None:
        if thresholds is not None:
            self.thresholds = tuple(float(t) for t in thresholds)
        # Exact rationals so that an IoU of exactly t (e.g. 1/2) always counts, with integer arithmetic.
        self._fracs = [Fraction(t).limit_denominator(10**6) for t in self.thresholds]
        self.sum_inter = 0
        self.sum_union = 0
        self.sum_iou = 0.0
        self.count = 0
        self.hits = [0] * len(self.thresholds)
        self.box_hits = 0
        self.box_count = 0

    # -- accumulation -------------------------------------------------------------------------------------

    def _check_box_mix(self, with_boxes: bool) -> None:
        if self.count == 0:
            return
        has_boxes = self.box_count == self.count
        if has_boxes != with_boxes:
            raise ValueError(
                "boxes must be given for all expressions or for none "
                f"({self.box_count} of {self.count} previous expressions had boxes)"
            )

    def update(
        self,
        pred_mask: np.ndarray,
        gt_mask: np.ndarray,
        pred_box: Sequence[float] | None = None,
        gt_box: Sequence[float] | None = None,
    ) -> float:
        """Add one expression (HxW masks; optional pixel XYXY boxes) and return its mask IoU."""
        if (pred_box is None) != (gt_box is None):
            raise ValueError("pred_box and gt_box must be given together")
        with_boxes = pred_box is not None
        self._check_box_mix(with_boxes)
        inter, union = mask_iou_parts(pred_mask, gt_mask)
        b_iou = box_iou(pred_box, gt_box) if with_boxes else 0.0  # validate before mutating state

        iou = 1.0 if union == 0 else inter / union
        self.sum_inter += inter
        self.sum_union += union
        self.sum_iou += iou
        self.count += 1
        for i, t in enumerate(self._fracs):
            # inter/union >= p/q  <=>  inter*q >= p*union (exact); both-empty has IoU 1 and always hits.
            if union == 0 or inter * t.denominator >= t.numerator * union:
                self.hits[i] += 1
        if with_boxes:
            self.box_count += 1
            if b_iou >= 0.5 - _BOX_EPS:
                self.box_hits += 1
        return iou

    def merge(self, other: RISMetrics) -> RISMetrics:
        """Accumulate ``other`` into ``self`` in place (e.g. reducing worker shards); returns ``self``."""
        if tuple(other.thresholds) != tuple(self.thresholds):
            raise ValueError(f"threshold mismatch: {self.thresholds} vs {other.thresholds}")
        if other.count:
            self._check_box_mix(other.box_count == other.count)
            if 0 < other.box_count < other.count:
                raise ValueError("cannot merge metrics where only some expressions had boxes")
        self.sum_inter += other.sum_inter
        self.sum_union += other.sum_union
        self.sum_iou += other.sum_iou
        self.count += other.count
        self.hits = [a + b for a, b in zip(self.hits, other.hits, strict=True)]
        self.box_hits += other.box_hits
        self.box_count += other.box_count
        return self

    # -- results ------------------------------------------------------------------------------------------

    def compute(self) -> dict[str, float | int]:
        """Metrics dict (fractions in [0, 1]); ValueError("no expressions") before any update."""
        if self.count == 0:
            raise ValueError("no expressions")
        # Every expression so far was both-empty: nothing to get wrong, so oIoU is 1 like mIoU.
        o_iou = self.sum_inter / self.sum_union if self.sum_union else 1.0
        out: dict[str, float | int] = {"oIoU": o_iou, "mIoU": self.sum_iou / self.count}
        for t, h in zip(self.thresholds, self.hits, strict=True):
            out[f"Prec@{t:g}"] = h / self.count
        if self.box_count == self.count:
            out["BoxAcc@0.5"] = self.box_hits / self.box_count
        out["count"] = self.count
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-able) snapshot of the running sums."""
        return {
            "thresholds": list(self.thresholds),
            "sum_inter": int(self.sum_inter),
            "sum_union": int(self.sum_union),
            "sum_iou": float(self.sum_iou),
            "count": int(self.count),
            "hits": [int(h) for h in self.hits],
            "box_hits": int(self.box_hits),
            "box_count": int(self.box_count),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> RISMetrics:
        """Inverse of :meth:`state_dict`."""
        m = cls(thresholds=d.get("thresholds", cls.thresholds))
        hits = [int(h) for h in d["hits"]]
        if len(hits) != len(m.thresholds):
            raise ValueError(f"state has {len(hits)} hit counts for {len(m.thresholds)} thresholds")
        sum_iou = float(d["sum_iou"])
        if not math.isfinite(sum_iou):
            raise ValueError(f"sum_iou is not finite: {sum_iou}")
        m.sum_inter = int(d["sum_inter"])
        m.sum_union = int(d["sum_union"])
        m.sum_iou = sum_iou
        m.count = int(d["count"])
        m.hits = hits
        m.box_hits = int(d["box_hits"])
        m.box_count = int(d["box_count"])
        return m

    def __repr__(self) -> str:
        return f"RISMetrics(count={self.count}, sum_inter={self.sum_inter}, sum_union={self.sum_union})"
