"""Referring-image-segmentation metrics: oIoU, mIoU, Prec@t and box accuracy; and the generalized ones
(gRefCOCO: gIoU, cIoU, N-acc, T-acc) of :class:`GRESMetrics`.

Masks are HxW arrays in image pixel coordinates (bool, or 0/1 integers: anything ``!= 0`` is foreground).
Boxes are pixel XYXY ``(x1, y1, x2, y2)`` in continuous coordinates: the box ``[0, 0, 10, 10]`` covers
pixels 0..9 on each axis and has area 100 (no ``+1`` convention).

:class:`RISMetrics` keeps only running sums (O(1) memory), so shards evaluated on different workers can
be reduced exactly with :meth:`RISMetrics.merge` or shipped as :meth:`RISMetrics.state_dict`: integer
counts, and the IoU sum without rounding, so every metric is the same to the last bit in any order.
Names: oIoU is LISA's / GLaMM's cIoU, mIoU their gIoU (``ppcr.report.METRIC_NAMES``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

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


def check_box_xyxy(box: Any, name: str) -> tuple[float, float, float, float]:
    """A pixel XYXY box as 4 floats; ValueError naming `name` unless 4 finite values with x1 <= x2, y1 <= y2."""
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
    ax1, ay1, ax2, ay2 = check_box_xyxy(a, "box a")
    bx1, by1, bx2, by2 = check_box_xyxy(b, "box b")
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union <= 0.0:
        return 0.0
    return inter / union


def _add_exact(partials: list[float], x: float) -> None:
    """Add ``x`` to a list of non-overlapping partial sums, exactly (Shewchuk; the recipe math.fsum uses)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


def _read_partials(values: Sequence[Any]) -> list[float]:
    """A saved IoU sum (its exact partials) back as partials; ValueError naming it when not finite."""
    partials = [float(x) for x in values]
    if not all(math.isfinite(x) for x in partials):
        raise ValueError(f"sum_iou is not finite: {partials}")
    out: list[float] = []
    for x in partials:
        _add_exact(out, x)
    return out


class ExpressionScore(NamedTuple):
    """One expression's result: mask intersection and union (pixels), IoU, and box IoU (None: no boxes)."""

    intersection: int
    union: int
    iou: float  # intersection / union; 1.0 when both masks are empty
    box_iou: float | None


def score_expression(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    pred_box: Sequence[float] | None = None,
    gt_box: Sequence[float] | None = None,
) -> ExpressionScore:
    """Score one expression: HxW masks (bool or 0/1) and optional pixel XYXY boxes (given together)."""
    if (pred_box is None) != (gt_box is None):
        raise ValueError("pred_box and gt_box must be given together")
    inter, union = mask_iou_parts(pred_mask, gt_mask)
    b_iou = box_iou(pred_box, gt_box) if pred_box is not None else None
    return ExpressionScore(inter, union, 1.0 if union == 0 else inter / union, b_iou)


def score_answer(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    pred_box: Sequence[float] | None,
    gt_box: Sequence[float] | None,
) -> ExpressionScore:
    """`score_expression` of an answer that may hold no object: a multi-target model's "no target"
    answer (`inference.Segmentation`: an empty mask, box None) to an expression with a ground-truth box
    scores box IoU 0, as a box that misses it would."""
    if pred_box is None and gt_box is not None:
        return score_expression(pred_mask, gt_mask)._replace(box_iou=0.0)
    return score_expression(pred_mask, gt_mask, pred_box, gt_box)


class RISMetrics:
    """Running RIS metrics over referring expressions (one update per expression).

    Reported by :meth:`compute`:
      * ``oIoU`` (cIoU): overall IoU, sum of intersections / sum of unions over all expressions;
      * ``mIoU`` (gIoU): mean per-expression IoU (an expression whose prediction and ground truth are both empty
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
        # The per-expression IoUs summed without rounding (Shewchuk's partials, as math.fsum keeps them):
        # mIoU is then the same to the last bit in whatever order or grouping expressions are added and
        # merged (worker shards, batch sizes, a predictions file replayed in any order).
        self._iou_partials: list[float] = []
        self.count = 0
        self.hits = [0] * len(self.thresholds)
        self.box_hits = 0
        self.box_count = 0

    @property
    def sum_iou(self) -> float:
        """Sum of the per-expression IoUs, correctly rounded (independent of the order they came in)."""
        return math.fsum(self._iou_partials)

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
        return self.add(score_expression(pred_mask, gt_mask, pred_box, gt_box))

    def add(self, score: ExpressionScore) -> float:
        """Add one expression's :class:`ExpressionScore` (e.g. a line of a predictions file); returns its IoU.

        Adding the scores of a run in the order it added them gives exactly its metrics, bit for bit.
        """
        with_boxes = score.box_iou is not None
        self._check_box_mix(with_boxes)
        inter, union = int(score.intersection), int(score.union)
        if inter < 0 or union < inter:
            raise ValueError(
                f"intersection {inter} and union {union} must satisfy 0 <= intersection <= union"
            )
        iou = 1.0 if union == 0 else inter / union
        self.sum_inter += inter
        self.sum_union += union
        _add_exact(self._iou_partials, iou)
        self.count += 1
        for i, t in enumerate(self._fracs):
            # inter/union >= p/q  <=>  inter*q >= p*union (exact); both-empty has IoU 1 and always hits.
            if union == 0 or inter * t.denominator >= t.numerator * union:
                self.hits[i] += 1
        if with_boxes:
            self.box_count += 1
            if score.box_iou >= 0.5 - _BOX_EPS:
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
        for x in other._iou_partials:
            _add_exact(self._iou_partials, x)
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
            "iou_partials": [float(x) for x in self._iou_partials],
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
        m.sum_inter = int(d["sum_inter"])
        m.sum_union = int(d["sum_union"])
        m._iou_partials = _read_partials(d.get("iou_partials", [d["sum_iou"]]))
        m.count = int(d["count"])
        m.hits = hits
        m.box_hits = int(d["box_hits"])
        m.box_count = int(d["box_count"])
        return m

    def __repr__(self) -> str:
        return f"RISMetrics(count={self.count}, sum_inter={self.sum_inter}, sum_union={self.sum_union})"


# ----------------------------------------------------------------------------- evaluation protocols

#: "all": every expression of every image (RefCOCO's protocol, our default). "glamm": GLaMM's, at most 3
#: expressions per image drawn at random — with a fixed seed here, so the numbers can be reproduced.
PROTOCOLS = ("all", "glamm")
GLAMM_EXPRESSIONS_PER_IMAGE = 3


def protocol_indices(protocol: str, image_key: str, n: int, seed: int = 0) -> list[int]:
    """Which of an image's ``n`` expressions (in shard order) ``protocol`` evaluates, ascending.

    ``glamm``: as GLaMM's RefCOCO evaluation (groundingLMM ``dataset/segm_datasets/RefCOCO_Segm_ds.py``,
    ``ReferSegmDataset.__getitem__``: one sample per image; 3 of its sentences, pooled over its refs,
    drawn without replacement when it has at least 3, else all), but drawn by
    ``numpy.random.default_rng([seed, blake2b-64(image_key)])``: the same selection for an image whatever
    the order, batching or worker it is evaluated in. ``image_key``: the shard row's ``file_name``.
    """
    if protocol == "all":
        return list(range(n))
    if protocol != "glamm":
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    k = GLAMM_EXPRESSIONS_PER_IMAGE
    if n <= k:
        return list(range(n))
    digest = hashlib.blake2b(image_key.encode("utf-8"), digest_size=8).digest()
    rng = np.random.default_rng([int(seed), int.from_bytes(digest, "little")])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def describe_protocol(protocol: str, seed: int = 0) -> str:
    """One line stating the protocol, for reports."""
    if protocol == "all":
        return "every expression of every image (RefCOCO protocol)"
    if protocol == "glamm":
        return (
            f"glamm: {GLAMM_EXPRESSIONS_PER_IMAGE} expressions per image (all if fewer), drawn without "
            f"replacement with seed {seed} (numpy default_rng([seed, blake2b-64(file_name)])), as GLaMM "
            "samples them for RefCOCO evaluation but reproducible"
        )
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")


# ----------------------------------------------------------------------------- generalized RES (gRefCOCO)


class GRESScore(NamedTuple):
    """One expression of a generalized split: mask intersection and union (pixels), whether the ground
    truth has no target, whether the answer has pixels, and the expression's IoU as gIoU counts it."""

    intersection: int
    union: int
    no_target: bool
    answered: bool
    iou: float


def score_generalized(pred_mask: np.ndarray, gt_mask: np.ndarray, no_target: bool) -> GRESScore:
    """Score one expression: the answer's union mask and the ground truth's (HxW, bool or 0/1; all
    targets together, empty when ``no_target``). An empty answer means "no target".

    IoU: a target expression's mask IoU (an empty answer scores 0); a no-target expression scores 1
    when the answer is empty, else 0, and its answer's pixels are its union (cIoU). ValueError when the
    ground truth contradicts ``no_target`` (pixels for no target, or none for a target).
    """
    inter, union = mask_iou_parts(pred_mask, gt_mask)
    gt_pixels = int(np.count_nonzero(_as_mask(gt_mask, "gt")))
    if no_target and gt_pixels:
        raise ValueError(f"a no-target expression has a ground-truth mask of {gt_pixels} pixels")
    if not no_target and not gt_pixels:
        raise ValueError("a target expression has an empty ground-truth mask")
    answered = union > gt_pixels or inter > 0
    if no_target:
        return GRESScore(0, union, True, answered, 0.0 if answered else 1.0)
    return GRESScore(inter, union, False, answered, inter / union)


class GRESMetrics:
    """Running metrics of generalized referring expression segmentation (gRefCOCO; the GRES paper's
    definitions, Liu, Ding and Jiang, CVPR 2023), one update per expression, O(1) memory.

    Reported by :meth:`compute` (fractions in [0, 1]):
      * ``gIoU``: mean per-expression IoU over all expressions; a no-target expression scores 1 when its
        answer is empty, else 0;
      * ``cIoU``: cumulative intersection over cumulative union over all expressions; a non-empty answer
        to a no-target expression adds its pixels to the union (1.0 when the union is still empty);
      * ``N-acc``: no-target expressions answered empty / all no-target expressions;
      * ``T-acc``: target expressions answered with pixels / all target expressions;
      * ``Prec@t``: target expressions with IoU >= t / all target expressions (as ReLA reports Pr@t);
      * ``count``, ``no_target_count``. A rate with no expression to count (``N-acc`` on a split without
        no-target expressions) is None.

    Where ReLA's ``gres_model/evaluation/refer_evaluation.py`` differs from these (paper) definitions:
      * its ``N_acc`` is TP / (TP + FN + **1**) (TP: no-target answered "no target", FN: no-target
        answered with a target): the +1 in the denominator keeps it below the paper's value, e.g. 0.999
        for 1000 of 1000;
      * its ``T_acc`` is TP / (TP + FP + 1) (FP: a target expression answered "no target"): the share of
        "no target" answers that were right, smoothed by the same +1 — not the paper's share of target
        expressions answered with a target, which is TN / (TN + FP) in its counts;
      * it decides "no target" with a separate classifier and scores the mask apart from it: a target
        expression answered "no target" adds intersection 0 but the union of the (unused) predicted mask
        and the ground truth, where an empty answer adds the ground truth's pixels only. ppcr's answer
        is its mask, so the two cannot disagree.
    Its gIoU, cIoU and Pr@t are computed as here.
    """

    thresholds: tuple[float, ...] = (0.7, 0.8, 0.9)

    def __init__(self, thresholds: Sequence[float] | None = None) -> None:
        if thresholds is not None:
            self.thresholds = tuple(float(t) for t in thresholds)
        self._fracs = [Fraction(t).limit_denominator(10**6) for t in self.thresholds]
        self.sum_inter = 0
        self.sum_union = 0
        self._iou_partials: list[float] = []  # exact, order-independent sum (as RISMetrics)
        self.count = 0
        self.no_target_count = 0
        self.no_target_right = 0  # no-target expressions answered empty
        self.target_answered = 0  # target expressions answered with pixels
        self.hits = [0] * len(self.thresholds)

    def update(self, pred_mask: np.ndarray, gt_mask: np.ndarray, no_target: bool) -> float:
        """Add one expression (see :func:`score_generalized`); returns its IoU."""
        return self.add(score_generalized(pred_mask, gt_mask, no_target))

    def add(self, score: GRESScore) -> float:
        """Add one expression's :class:`GRESScore` (e.g. a line of a predictions file); returns its IoU."""
        inter, union = int(score.intersection), int(score.union)
        if inter < 0 or union < inter:
            raise ValueError(
                f"intersection {inter} and union {union} must satisfy 0 <= intersection <= union"
            )
        if score.no_target:
            if inter or (union > 0) != bool(score.answered):
                raise ValueError(
                    f"a no-target expression has intersection 0 and a union of its answer's pixels; got "
                    f"{inter}, {union} with answered={score.answered}"
                )
            iou = 0.0 if score.answered else 1.0
        else:
            if union == 0:
                raise ValueError("a target expression has a union of at least its ground-truth pixels; got 0")
            iou = inter / union
        self.sum_inter += inter
        self.sum_union += union
        _add_exact(self._iou_partials, iou)
        self.count += 1
        if score.no_target:
            self.no_target_count += 1
            self.no_target_right += not score.answered
        else:
            self.target_answered += bool(score.answered)
            for i, t in enumerate(self._fracs):
                if inter * t.denominator >= t.numerator * union:
                    self.hits[i] += 1
        return iou

    def merge(self, other: GRESMetrics) -> GRESMetrics:
        """Accumulate ``other`` into ``self`` in place; returns ``self``."""
        if tuple(other.thresholds) != tuple(self.thresholds):
            raise ValueError(f"threshold mismatch: {self.thresholds} vs {other.thresholds}")
        self.sum_inter += other.sum_inter
        self.sum_union += other.sum_union
        for x in other._iou_partials:
            _add_exact(self._iou_partials, x)
        self.count += other.count
        self.no_target_count += other.no_target_count
        self.no_target_right += other.no_target_right
        self.target_answered += other.target_answered
        self.hits = [a + b for a, b in zip(self.hits, other.hits, strict=True)]
        return self

    def compute(self) -> dict[str, float | int | None]:
        """Metrics dict; ValueError("no expressions") before any update."""
        if self.count == 0:
            raise ValueError("no expressions")
        targets = self.count - self.no_target_count
        out: dict[str, float | int | None] = {
            "gIoU": math.fsum(self._iou_partials) / self.count,
            "cIoU": self.sum_inter / self.sum_union if self.sum_union else 1.0,
            "N-acc": self.no_target_right / self.no_target_count if self.no_target_count else None,
            "T-acc": self.target_answered / targets if targets else None,
        }
        for t, h in zip(self.thresholds, self.hits, strict=True):
            out[f"Prec@{t:g}"] = h / targets if targets else None
        out["count"] = self.count
        out["no_target_count"] = self.no_target_count
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-able) snapshot of the running sums."""
        return {
            "thresholds": list(self.thresholds),
            "sum_inter": int(self.sum_inter),
            "sum_union": int(self.sum_union),
            "iou_partials": [float(x) for x in self._iou_partials],
            "count": int(self.count),
            "no_target_count": int(self.no_target_count),
            "no_target_right": int(self.no_target_right),
            "target_answered": int(self.target_answered),
            "hits": [int(h) for h in self.hits],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> GRESMetrics:
        """Inverse of :meth:`state_dict`."""
        m = cls(thresholds=d.get("thresholds", cls.thresholds))
        hits = [int(h) for h in d["hits"]]
        if len(hits) != len(m.thresholds):
            raise ValueError(f"state has {len(hits)} hit counts for {len(m.thresholds)} thresholds")
        m.sum_inter, m.sum_union = int(d["sum_inter"]), int(d["sum_union"])
        m._iou_partials = _read_partials(d["iou_partials"])
        m.count = int(d["count"])
        m.no_target_count = int(d["no_target_count"])
        m.no_target_right = int(d["no_target_right"])
        m.target_answered = int(d["target_answered"])
        m.hits = hits
        return m

    def __repr__(self) -> str:
        return f"GRESMetrics(count={self.count}, no_target_count={self.no_target_count})"
