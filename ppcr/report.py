"""Evaluation report: JSON plus Markdown tables laid out like the PPCR paper's Table 1.

``results`` throughout maps a row name (model / variant, e.g. ``"PPCR (trained)"``) to a dict from a
column key ``(dataset, split_by, split)`` (e.g. ``("refcoco", "unc", "val")``) to a metrics dict as
returned by :meth:`ppcr.metrics.RISMetrics.compute` (fractions in [0, 1]; shown x100 in the tables).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import ExpressionScore, GRESMetrics, GRESScore, RISMetrics

ColumnKey = tuple[str, str, str]
Results = Mapping[str, Mapping[ColumnKey, Mapping[str, Any]]]

PAPER_COLUMNS: list[ColumnKey] = [
    ("refcoco", "unc", "val"),
    ("refcoco", "unc", "testA"),
    ("refcoco", "unc", "testB"),
    ("refcoco+", "unc", "val"),
    ("refcoco+", "unc", "testA"),
    ("refcoco+", "unc", "testB"),
    ("refcocog", "umd", "val"),
    ("refcocog", "umd", "test"),
]

MISSING = "–"  # en dash, as in the paper
#: The two names each metric goes by: RefCOCO papers (and PPCR) say oIoU / mIoU, LISA, GLaMM and their
#: followers cIoU / gIoU for the same numbers (GLaMM eval/referring_seg/infer_and_evaluate.py).
METRIC_NAMES = {"oIoU": "cIoU", "mIoU": "gIoU"}
CONVENTIONS = (
    "oIoU (= cIoU, cumulative IoU in LISA/GLaMM) = sum of intersections / sum of unions over all "
    "expressions; mIoU (= gIoU in LISA/GLaMM, not the box-regression GIoU) = mean per-expression IoU "
    "(an expression whose prediction and ground truth are both empty scores 1)."
)
GRES_CONVENTIONS = (
    "Generalized splits (expressions naming no object or several; the answer is the union of its "
    "instances, empty for 'no target'): gIoU = mean per-expression IoU, a no-target expression scoring 1 "
    "when answered empty, else 0; cIoU = cumulative intersection / cumulative union, a wrong answer to a "
    "no-target expression adding its pixels to the union; N-acc = no-target expressions answered empty / "
    "all no-target; T-acc = target expressions answered with pixels / all target expressions; Prec@t "
    "over target expressions. A model that answers every expression with one mask scores N-acc 0 unless "
    "its mask is empty."
)
_GRES_METRICS = ("gIoU", "cIoU", "N-acc", "T-acc", "Prec@0.7", "Prec@0.8", "Prec@0.9")
REPORT_VERSION = 1

_DATASET_NAMES = {
    "refcoco": "RefCOCO",
    "refcoco+": "RefCOCO+",
    "refcocog": "RefCOCOg",
    "grefcoco": "gRefCOCO",
}
_SPLIT_NAMES = {"val": "Val", "test": "Test", "testA": "TestA", "testB": "TestB", "train": "Train"}
# The paper tags RefCOCOg splits with the partition: (U) = umd, (G) = google.
_PARTITION_TAGS = {("refcocog", "umd"): "(U)", ("refcocog", "google"): "(G)"}
_DETAIL_METRICS = ("Prec@0.5", "Prec@0.7", "Prec@0.9")


def columns(results: Results) -> list[ColumnKey]:
    """Column keys in display order: paper columns present (paper order), then others in first-seen order."""
    seen: list[ColumnKey] = []
    for per_col in results.values():
        for key in per_col:
            key = tuple(key)
            if key not in seen:
                seen.append(key)
    paper = [c for c in PAPER_COLUMNS if c in seen]
    return paper + [c for c in seen if c not in PAPER_COLUMNS]


def column_label(key: ColumnKey) -> str:
    """Human label for a column, e.g. ``("refcocog", "umd", "val") -> "RefCOCOg Val(U)"``."""
    dataset, split_by, split = key
    name = _DATASET_NAMES.get(dataset, dataset)
    split_name = _SPLIT_NAMES.get(split, split)
    tag = _PARTITION_TAGS.get((dataset, split_by))
    if tag is None and dataset in ("refcoco", "refcoco+") and split_by != "unc":
        tag = f"({split_by})"  # non-default partition (e.g. google RefCOCO) must stay distinguishable
    return f"{name} {split_name}{tag or ''}"


def _labels(cols: list[ColumnKey]) -> list[str]:
    labels = [column_label(c) for c in cols]
    # Unknown datasets with several partitions would otherwise collide: add the partition name.
    return [f"{lab} [{c[1]}]" if labels.count(lab) > 1 else lab for lab, c in zip(labels, cols, strict=True)]


def _pct(value: Any) -> str:
    if value is None:
        return MISSING
    try:
        v = float(value)
    except (TypeError, ValueError):
        return MISSING
    return MISSING if math.isnan(v) else f"{v * 100:.2f}"


def _cell(results: Results, row: str, col: ColumnKey, metric: str) -> str:
    return _pct(results[row].get(col, {}).get(metric))


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    # Row names are free text: a literal pipe would split the cell.
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _norm(results: Results) -> dict[str, dict[ColumnKey, Mapping[str, Any]]]:
    return {row: {tuple(k): v for k, v in per_col.items()} for row, per_col in results.items()}


def main_table(results: Results) -> str:
    """Table 1 layout: ``Method`` then an oIoU block and an mIoU block, each over the columns (x100)."""
    results = _norm(results)
    cols = columns(results)
    labels = _labels(cols)
    header = ["Method"] + [f"oIoU {lab}" for lab in labels] + [f"mIoU {lab}" for lab in labels]
    rows = [
        [row]
        + [_cell(results, row, c, "oIoU") for c in cols]
        + [_cell(results, row, c, "mIoU") for c in cols]
        for row in results
    ]
    return _table(header, rows, [":---"] + ["---:"] * (2 * len(cols)))


def detail_table(results: Results) -> str:
    """One line per (row, column) present: Prec@0.5/0.7/0.9 (x100), BoxAcc@0.5 if any, and count."""
    results = _norm(results)
    cols = columns(results)
    labels = dict(zip(cols, _labels(cols), strict=True))
    has_box = any("BoxAcc@0.5" in m for per_col in results.values() for m in per_col.values())
    metrics = list(_DETAIL_METRICS) + (["BoxAcc@0.5"] if has_box else [])
    header = ["Method", "Split", *metrics, "count"]
    rows = []
    for row, per_col in results.items():
        for c in cols:
            if c not in per_col:
                continue
            m = per_col[c]
            count = m.get("count")
            rows.append(
                [row, labels[c]]
                + [_pct(m.get(k)) for k in metrics]
                + [MISSING if count is None else str(int(count))]
            )
    return _table(header, rows, [":---", ":---"] + ["---:"] * (len(metrics) + 1))


def split_kinds(results: Results) -> tuple[dict, dict]:
    """(classic, generalized) parts of ``results``: a column whose metrics carry ``gIoU`` is a
    generalized split's (GRESMetrics), every other a classic one's (RISMetrics). Rows left empty drop."""
    classic: dict = {}
    generalized: dict = {}
    for row, per_col in _norm(results).items():
        for key, m in per_col.items():
            (generalized if "gIoU" in m else classic).setdefault(row, {})[key] = m
    return classic, generalized


def gres_table(results: Results) -> str:
    """One line per (row, generalized column): gIoU, cIoU, N-acc, T-acc, Prec@0.7/0.8/0.9 (x100), the
    number of expressions and of no-target ones."""
    results = _norm(results)
    cols = columns(results)
    labels = dict(zip(cols, _labels(cols), strict=True))
    header = ["Method", "Split", *_GRES_METRICS, "count", "no target"]
    rows = []
    for row, per_col in results.items():
        for c in cols:
            if c in per_col:
                m = per_col[c]
                counts = [
                    MISSING if m.get(k) is None else str(int(m[k])) for k in ("count", "no_target_count")
                ]
                rows.append([row, labels[c], *[_pct(m.get(k)) for k in _GRES_METRICS], *counts])
    return _table(header, rows, [":---", ":---"] + ["---:"] * (len(_GRES_METRICS) + 2))


def markdown_table(results: Results, details: bool = True) -> str:
    """Main Table-1 style table, followed (if ``details``) by a blank line and :func:`detail_table`."""
    out = main_table(results)
    if details:
        out += "\n\n" + detail_table(results)
    return out


def _key_str(key: ColumnKey) -> str:
    key = tuple(key)
    if len(key) != 3 or any("/" in str(p) for p in key):
        raise ValueError(f"column key must be (dataset, split_by, split) without '/', got {key!r}")
    return "/".join(str(p) for p in key)


def _json_default(obj: Any) -> Any:
    # numpy scalars / arrays and Paths can sneak into metrics or meta; keep the JSON plain.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_report(
    out_dir: str | Path, results: Results, meta: dict | None = None, warning: str | None = None
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (created); returns (json_path, md_path).

    ``warning``: a caveat that changes how every number must be read (e.g. training cut short): the
    first thing in ``report.md`` and ``report.json``'s ``warning``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    payload = {
        "version": REPORT_VERSION,
        **({"warning": warning} if warning else {}),
        "meta": meta,
        "metric_names": METRIC_NAMES,
        "results": {
            row: {_key_str(k): dict(m) for k, m in per_col.items()} for row, per_col in results.items()
        },
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")

    lines = ["# PPCR evaluation report", ""]
    if warning:
        lines += [
            f"> **WARNING** {line}".rstrip() if i == 0 else f"> {line}"
            for i, line in enumerate(warning.splitlines())
        ]
        lines += [""]
    if meta:
        lines += [f"- **{k}**: {v}" for k, v in meta.items()] + [""]
    classic, generalized = split_kinds(results)
    if classic:
        lines += [
            "## Segmentation (layout of the PPCR paper, Table 1)",
            "",
            CONVENTIONS + f" Values x100; {MISSING} = not evaluated.",
            "",
            main_table(classic),
            "",
            "## Precision and box accuracy",
            "",
            "Prec@t = % of expressions with mask IoU >= t; BoxAcc@0.5 = % with box IoU >= 0.5.",
            "",
            detail_table(classic),
            "",
        ]
    if generalized:
        lines += [
            "## Generalized referring segmentation (gRefCOCO protocol)",
            "",
            GRES_CONVENTIONS + f" Values x100; {MISSING} = nothing to count.",
            "",
            gres_table(generalized),
            "",
        ]
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return json_path, md_path


def prediction_record(
    split: str,
    sent_id: int,
    file_name: str,
    expression: str,
    box_xyxy: Any,
    mask_rle: Mapping[str, Any],
    score: float | None,
    result: ExpressionScore,
) -> dict:
    """One line of a predictions file (`ppcr evaluate --predictions FILE`, JSON Lines).

    Keys: split, sent_id, file_name, expression; iou, intersection, union (mask pixels), box_iou; box
    (the predicted box, pixel XYXY of the original image); score (SAM's predicted IoU); mask (COCO
    compressed RLE, size [H, W]). Floats are written exactly (JSON round-trips Python floats). An answer
    with several objects gives their union (mask, enclosing box, mean score); one with none (a
    multi-target model's "no target") an empty mask, and box and score null.
    """
    return {
        "split": split,
        "sent_id": int(sent_id),
        "file_name": file_name,
        "expression": expression,
        "iou": float(result.iou),
        "intersection": int(result.intersection),
        "union": int(result.union),
        "box_iou": None if result.box_iou is None else float(result.box_iou),
        "box": None if box_xyxy is None else [float(v) for v in box_xyxy],
        "score": None if score is None else float(score),
        "mask": {"size": [int(v) for v in mask_rle["size"]], "counts": str(mask_rle["counts"])},
    }


def generalized_prediction_record(
    split: str,
    sent_id: int,
    file_name: str,
    expression: str,
    instances: Sequence[tuple[Any, Any, float]],
    result: GRESScore,
    hw: tuple[int, int],
) -> dict:
    """One line of a predictions file for an expression of a generalized split (gRefCOCO).

    ``instances``: the answer's objects as (bool HxW mask, pixel XYXY box, score) (``inference.Instance``),
    none for "no target"; those without pixels are left out of the line (an answer is its pixels, as
    the metrics count it: "no target" is an answer without any). ``hw``: the image's (height, width).
    Keys: split, sent_id, file_name, expression; no_target (the ground truth has none); iou (as gIoU
    counts it), intersection, union (pixels, as cIoU adds them); mask: the union of the instances'
    masks (COCO compressed RLE; empty for "no target"); instances: [{box, score, mask}, ...].
    """
    from .masks import encode_mask

    instances = [(np.asarray(m, dtype=bool), b, s) for m, b, s in instances]
    instances = [(m, b, s) for m, b, s in instances if m.any()]
    if bool(instances) != bool(result.answered):
        raise ValueError(
            f"an answer with {len(instances)} instance(s) with pixels scored as answered={result.answered}"
        )
    union = np.zeros(hw, dtype=bool)
    for mask, _, _ in instances:
        union |= mask
    return {
        "split": split,
        "sent_id": int(sent_id),
        "file_name": file_name,
        "expression": expression,
        "no_target": bool(result.no_target),
        "iou": float(result.iou),
        "intersection": int(result.intersection),
        "union": int(result.union),
        "mask": encode_mask(union),
        "instances": [
            {"box": [float(v) for v in box], "score": float(score), "mask": encode_mask(mask)}
            for mask, box, score in instances
        ],
    }


def write_predictions(path: str | Path, records: list[dict]) -> Path:
    """Write prediction records (`prediction_record`) as JSON Lines, in the given order (written to
    ``.tmp``, then renamed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def metrics_from_predictions(path: str | Path) -> dict[str, dict]:
    """Re-compute each split's metrics from a predictions file: its lines replayed through RISMetrics give
    the report's numbers exactly (in any order: the sums are exact). Returns {split: compute()}; a line
    that is not a record raises ValueError naming the file and line."""
    per: dict[str, RISMetrics | GRESMetrics] = {}
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                r = json.loads(line)
                kind = GRESMetrics if "no_target" in r else RISMetrics
                metrics = per.setdefault(r["split"], kind())
                if not isinstance(metrics, kind):
                    raise ValueError(f"split {r['split']!r} mixes generalized and classic records")
                if kind is GRESMetrics:
                    answered = bool(r["instances"])
                    score = GRESScore(r["intersection"], r["union"], r["no_target"], answered, r["iou"])
                else:
                    score = ExpressionScore(r["intersection"], r["union"], r["iou"], r["box_iou"])
                metrics.add(score)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {n}: not a prediction record ({e!r})") from None
    return {split: m.compute() for split, m in per.items()}


def load_report(path: str | Path) -> tuple[dict[str, dict[ColumnKey, dict]], dict]:
    """Read a ``report.json`` (or a directory holding one); returns (results with tuple keys, meta)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    payload = json.loads(p.read_text(encoding="utf-8"))
    results: dict[str, dict[ColumnKey, dict]] = {}
    for row, per_col in payload.get("results", {}).items():
        parsed: dict[ColumnKey, dict] = {}
        for key, m in per_col.items():
            parts = key.split("/")
            if len(parts) != 3:
                raise ValueError(f"{p}: bad column key {key!r}, expected 'dataset/split_by/split'")
            parsed[(parts[0], parts[1], parts[2])] = m
        results[row] = parsed
    return results, payload.get("meta", {})
