"""Tests for ppcr.metrics: hand-computed oIoU / mIoU / Prec@t, box IoU, merge and serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppcr.metrics import RISMetrics, box_iou, mask_iou_parts


def _mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _three_expressions() -> list[tuple[np.ndarray, np.ndarray]]:
    # E1: gt 10x10 (100 px), pred its left half (50 px)  -> inter 50, union 100, IoU 0.5 exactly
    # E2: gt 2x2, pred a disjoint 2x2                     -> inter 0,  union 8,   IoU 0
    # E3: gt 2x2, pred identical                           -> inter 4,  union 4,   IoU 1
    e1 = (_mask(20, 20, 0, 10, 0, 5), _mask(20, 20, 0, 10, 0, 10))
    e2 = (_mask(20, 20, 0, 2, 0, 2), _mask(20, 20, 10, 12, 10, 12))
    e3 = (_mask(20, 20, 5, 7, 5, 7), _mask(20, 20, 5, 7, 5, 7))
    return [e1, e2, e3]


def test_mask_iou_parts_counts() -> None:
    pred, gt = _three_expressions()[0]
    assert mask_iou_parts(pred, gt) == (50, 100)
    # 0/1 uint8 masks give the same counts as bool ones.
    assert mask_iou_parts(pred.astype(np.uint8), gt.astype(np.uint8)) == (50, 100)


def test_oiou_and_miou_hand_computed_and_differ() -> None:
    m = RISMetrics()
    ious = [m.update(p, g) for p, g in _three_expressions()]
    assert ious == [0.5, 0.0, 1.0]
    r = m.compute()
    assert r["oIoU"] == pytest.approx(54 / 112)
    assert r["mIoU"] == pytest.approx(1.5 / 3)
    assert abs(r["oIoU"] - r["mIoU"]) > 0.01
    assert r["count"] == 3
    # E1 has IoU exactly 0.5: thresholds are inclusive, so it counts for Prec@0.5 only.
    assert r["Prec@0.5"] == pytest.approx(2 / 3)
    for t in ("0.6", "0.7", "0.8", "0.9"):
        assert r[f"Prec@{t}"] == pytest.approx(1 / 3)
    assert "BoxAcc@0.5" not in r
    assert all(0.0 <= v <= 1.0 for k, v in r.items() if k != "count")


def test_both_empty_counts_one_in_miou_and_nothing_in_oiou() -> None:
    m = RISMetrics()
    for p, g in _three_expressions():
        m.update(p, g)
    empty = np.zeros((20, 20), dtype=bool)
    assert m.update(empty, empty) == 1.0
    r = m.compute()
    assert r["oIoU"] == pytest.approx(54 / 112)  # unchanged
    assert r["mIoU"] == pytest.approx(2.5 / 4)
    assert r["Prec@0.9"] == pytest.approx(2 / 4)
    assert r["count"] == 4


def test_threshold_inclusive_at_0_7() -> None:
    m = RISMetrics()
    gt = _mask(10, 10, 0, 1, 0, 10)  # 10 px
    pred = _mask(10, 10, 0, 1, 0, 7)  # 7 px inside gt -> IoU 7/10
    assert m.update(pred, gt) == pytest.approx(0.7)
    r = m.compute()
    assert r["Prec@0.7"] == 1.0
    assert r["Prec@0.8"] == 0.0


def test_box_iou_values() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share no area
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    # No +1 convention: [0,0,10,10] has area 100, so its top half is exactly IoU 0.5 (with +1: 66/121).
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == 0.5
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # zero-area union


@pytest.mark.parametrize("bad", [[10, 0, 0, 10], [0, 10, 10, 0], [0, 0, 10], [0, 0, float("nan"), 1]])
def test_box_iou_rejects_bad_boxes(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        box_iou(bad, [0, 0, 1, 1])


def test_box_accuracy() -> None:
    m = RISMetrics()
    p, g = _three_expressions()[0]
    m.update(p, g, pred_box=[0, 0, 10, 10], gt_box=[0, 0, 10, 5])  # IoU 0.5 -> hit (inclusive)
    m.update(p, g, pred_box=[0, 0, 10, 10], gt_box=[5, 0, 15, 10])  # IoU 1/3 -> miss
    assert m.compute()["BoxAcc@0.5"] == 0.5


def test_mixing_boxes_raises() -> None:
    p, g = _three_expressions()[0]
    m = RISMetrics()
    m.update(p, g, pred_box=[0, 0, 1, 1], gt_box=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="boxes"):
        m.update(p, g)
    m2 = RISMetrics()
    m2.update(p, g)
    with pytest.raises(ValueError, match="boxes"):
        m2.update(p, g, pred_box=[0, 0, 1, 1], gt_box=[0, 0, 1, 1])
    with pytest.raises(ValueError):
        RISMetrics().update(p, g, pred_box=[0, 0, 1, 1])  # only one of the two boxes
    with pytest.raises(ValueError, match="boxes"):
        m.merge(m2)


def _random_items(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        h, w = rng.integers(8, 32, size=2)
        pred = rng.random((h, w)) < rng.random()
        gt = rng.random((h, w)) < rng.random()
        b1 = np.sort(rng.random(2) * w).tolist()
        b2 = np.sort(rng.random(2) * w).tolist()
        pb = [b1[0], b2[0], b1[1], b2[1]]
        gb = [b1[0] + 1, b2[0], b1[1] + 2, b2[1] + 1]
        items.append((pred, gt, pb, gb))
    return items


def test_merge_two_halves_equals_one_pass() -> None:
    items = _random_items(30)
    full, a, b = RISMetrics(), RISMetrics(), RISMetrics()
    for i, (p, g, pb, gb) in enumerate(items):
        full.update(p, g, pb, gb)
        (a if i < 13 else b).update(p, g, pb, gb)
    assert a.merge(b) is a
    ra, rf = a.compute(), full.compute()
    assert set(ra) == set(rf) and "BoxAcc@0.5" in rf
    for k in rf:
        assert ra[k] == pytest.approx(rf[k], rel=1e-12, abs=1e-12), k
    sa, sf = a.state_dict(), full.state_dict()
    for k in ("sum_inter", "sum_union", "count", "hits", "box_hits", "box_count"):
        assert sa[k] == sf[k], k  # integer sums merge exactly
    # Merging an empty accumulator is a no-op.
    assert a.merge(RISMetrics()).compute() == ra


def test_state_dict_round_trip_through_json() -> None:
    m = RISMetrics()
    for p, g, pb, gb in _random_items(7, seed=3):
        m.update(p, g, pb, gb)
    d = json.loads(json.dumps(m.state_dict()))
    m2 = RISMetrics.from_state_dict(d)
    assert m2.state_dict() == m.state_dict()
    assert m2.compute() == m.compute()


def test_compute_empty_raises() -> None:
    with pytest.raises(ValueError, match="no expressions"):
        RISMetrics().compute()


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        mask_iou_parts(np.zeros((4, 5), bool), np.zeros((5, 4), bool))
    with pytest.raises(ValueError):
        mask_iou_parts(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool))
    m = RISMetrics()
    with pytest.raises(ValueError):
        m.update(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    assert m.count == 0  # a rejected update leaves the state untouched


def test_every_metric_is_exact_in_any_order_and_grouping() -> None:
    """The IoU sum is kept without rounding, so a split evaluated in another order, batch size or set of
    workers (Ray) gives the same mIoU to the last bit, and a predictions file replays it exactly."""
    items = _random_items(120, seed=7)
    forward, backward = RISMetrics(), RISMetrics()
    for p, g, pb, gb in items:
        forward.update(p, g, pb, gb)
    for p, g, pb, gb in reversed(items):
        backward.update(p, g, pb, gb)
    chunks = [RISMetrics() for _ in range(7)]
    for i, (p, g, pb, gb) in enumerate(items):
        chunks[(i * 5) % 7].update(p, g, pb, gb)
    merged = chunks[3]
    for c in chunks[:3] + chunks[4:]:
        merged.merge(RISMetrics.from_state_dict(json.loads(json.dumps(c.state_dict()))))
    assert backward.compute() == forward.compute() == merged.compute()
    naive = [0.0, 0.0]  # what a plain running float sum gives: the order shows in the last bits
    for i, (p, g, _, _) in enumerate(items + items[::-1]):
        inter, union = mask_iou_parts(p, g)
        naive[i >= len(items)] += 1.0 if union == 0 else inter / union
    assert naive[0] != naive[1]


# ----------------------------------------------------------------------------- generalized (gRefCOCO)


def _square(rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((4, 4), dtype=bool)
    m[rows, cols] = True
    return m


def _gres_cases() -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(answer, ground truth, no target) on 4x4 images, hand-scored in test_gres_hand_computed."""
    gt = _square(slice(0, 2), slice(0, 2))  # 4 pixels
    empty = np.zeros((4, 4), dtype=bool)
    return [
        (_square(slice(0, 2), slice(1, 3)), gt, False),  # I 2, U 6: IoU 1/3, answered
        (empty, gt, False),  # I 0, U 4: IoU 0, not answered
        (empty, empty, True),  # right: IoU 1, U 0
        (_square(slice(3, 4), slice(0, 3)), empty, True),  # wrong: IoU 0, its 3 pixels join the union
        (gt.copy(), gt, False),  # I 4, U 4: IoU 1
    ]


def test_gres_hand_computed() -> None:
    from ppcr.metrics import GRESMetrics

    m = GRESMetrics()
    ious = [m.update(p, g, nt) for p, g, nt in _gres_cases()]
    assert ious == [1 / 3, 0.0, 1.0, 0.0, 1.0]
    out = m.compute()
    assert out["gIoU"] == pytest.approx((1 / 3 + 0 + 1 + 0 + 1) / 5)
    assert out["cIoU"] == 6 / 17  # (2 + 0 + 0 + 0 + 4) / (6 + 4 + 0 + 3 + 4)
    assert out["N-acc"] == 1 / 2  # ReLA's code: 1 / (1 + 1 + 1)
    assert out["T-acc"] == 2 / 3  # targets answered with pixels: the first and the last
    assert out["Prec@0.7"] == out["Prec@0.9"] == 1 / 3  # over the 3 target expressions
    assert (out["count"], out["no_target_count"]) == (5, 2)


def test_gres_rates_without_a_kind_are_none_and_merge_is_exact() -> None:
    from ppcr.metrics import GRESMetrics

    cases = _gres_cases()
    only_targets = GRESMetrics()
    for p, g, nt in cases:
        if not nt:
            only_targets.update(p, g, nt)
    assert only_targets.compute()["N-acc"] is None and only_targets.compute()["T-acc"] == 2 / 3
    only_none = GRESMetrics()
    only_none.update(cases[2][0], cases[2][1], True)
    assert only_none.compute()["cIoU"] == 1.0 and only_none.compute()["T-acc"] is None
    whole, a, b = GRESMetrics(), GRESMetrics(), GRESMetrics()
    for i, (p, g, nt) in enumerate(cases):
        whole.update(p, g, nt)
        (a if i % 2 else b).update(p, g, nt)
    assert a.merge(b).compute() == whole.compute()
    again = GRESMetrics.from_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert again.compute() == whole.compute()
    with pytest.raises(ValueError, match="no expressions"):
        GRESMetrics().compute()


def test_gres_ground_truth_must_agree_with_no_target() -> None:
    from ppcr.metrics import GRESMetrics, GRESScore

    gt = _square(slice(0, 2), slice(0, 2))
    with pytest.raises(ValueError, match="no-target expression has a ground-truth mask of 4 pixels"):
        GRESMetrics().update(gt, gt, True)
    with pytest.raises(ValueError, match="target expression has an empty ground-truth mask"):
        GRESMetrics().update(gt, np.zeros((4, 4), bool), False)
    with pytest.raises(ValueError, match="no-target expression has intersection 0"):
        GRESMetrics().add(GRESScore(0, 5, True, False, 1.0))


@pytest.mark.parametrize("cls", ["RISMetrics", "GRESMetrics"])
def test_from_state_dict_refuses_a_non_finite_iou_sum(cls):
    """A saved state whose IoU sum is NaN/inf (a corrupt shard's worth of partial results) is refused by name,
    for both metric families, instead of surfacing later as a NaN mIoU/gIoU."""
    import ppcr.metrics as metrics

    m = getattr(metrics, cls)()
    m.update(
        np.ones((4, 4), bool), np.ones((4, 4), bool), **({"no_target": False} if cls == "GRESMetrics" else {})
    )
    state = json.loads(json.dumps(m.state_dict()))
    state["iou_partials"] = [float("nan")]
    with pytest.raises(ValueError, match="sum_iou is not finite"):
        getattr(metrics, cls).from_state_dict(state)
