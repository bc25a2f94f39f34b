"""Tests for ppcr.report: Table-1 layout, formatting, synthetic-only columns, JSON round trip."""

from __future__ import annotations

import numpy as np

from ppcr.report import PAPER_COLUMNS, columns, load_report, markdown_table, write_report


def _metrics(o: float, m: float, count: int = 10, box: float | None = None) -> dict:
    d = {"oIoU": o, "mIoU": m, "Prec@0.5": 0.8, "Prec@0.6": 0.7, "Prec@0.7": 0.6}
    d.update({"Prec@0.8": 0.5, "Prec@0.9": 0.25, "count": count})
    if box is not None:
        d["BoxAcc@0.5"] = box
    return d


def _header(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[0].strip("|").split("|")]


def _row(table: str, name: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"row {name!r} not found")


def test_paper_columns_in_paper_order_with_formatting_and_missing() -> None:
    # Insert keys out of order: the table must still follow the paper's column order.
    results = {
        "PPCR (trained)": {
            ("refcocog", "umd", "test"): _metrics(0.7012345, 0.71),
            ("refcoco", "unc", "val"): _metrics(0.7554, 0.7689),
            ("refcoco+", "unc", "testB"): _metrics(0.6, 0.61),
        },
        "baseline: mean box": {("refcoco", "unc", "testA"): _metrics(0.2, 0.25)},
    }
    table = markdown_table(results, details=False)
    labels = ["RefCOCO Val", "RefCOCO TestA", "RefCOCO+ TestB", "RefCOCOg Test(U)"]
    assert _header(table) == ["Method"] + [f"oIoU {x}" for x in labels] + [f"mIoU {x}" for x in labels]
    row = _row(table, "PPCR (trained)")
    assert row[1:] == ["75.54", "–", "60.00", "70.12", "76.89", "–", "61.00", "71.00"]
    base = _row(table, "baseline: mean box")
    assert base[1:] == ["–", "20.00", "–", "–", "–", "25.00", "–", "–"]
    assert table.splitlines()[1].startswith("|:---|---:")


def test_full_paper_columns() -> None:
    results = {"m": {c: _metrics(0.5, 0.5) for c in reversed(PAPER_COLUMNS)}}
    assert columns(results) == PAPER_COLUMNS
    header = _header(markdown_table(results, details=False))
    assert header[1:9] == [
        "oIoU RefCOCO Val",
        "oIoU RefCOCO TestA",
        "oIoU RefCOCO TestB",
        "oIoU RefCOCO+ Val",
        "oIoU RefCOCO+ TestA",
        "oIoU RefCOCO+ TestB",
        "oIoU RefCOCOg Val(U)",
        "oIoU RefCOCOg Test(U)",
    ]
    assert header[9] == "mIoU RefCOCO Val" and len(header) == 17


def test_synthetic_only_gives_only_synthetic_columns() -> None:
    results = {
        "PPCR (tiny)": {
            ("synthref", "synth", "testB"): _metrics(0.5, 0.4, box=0.9),
            ("synthref", "synth", "val"): _metrics(0.123456, 0.5),
        },
        "baseline": {("synthref", "synth", "testA"): _metrics(0.1, 0.2)},
    }
    assert columns(results) == [
        ("synthref", "synth", "testB"),
        ("synthref", "synth", "val"),
        ("synthref", "synth", "testA"),
    ]
    table = markdown_table(results)
    main, details = table.split("\n\n")
    assert "RefCOCO" not in table
    assert _header(main) == ["Method"] + [
        f"{m} synthref {s}" for m in ("oIoU", "mIoU") for s in ("TestB", "Val", "TestA")
    ]
    assert _row(main, "PPCR (tiny)")[1:4] == ["50.00", "12.35", "–"]
    # Detail table: one line per (row, column) present, BoxAcc column since some entry has it.
    assert _header(details) == ["Method", "Split", "Prec@0.5", "Prec@0.7", "Prec@0.9", "BoxAcc@0.5", "count"]
    assert len(details.splitlines()) == 2 + 3
    assert _row(details, "baseline") == ["baseline", "synthref TestA", "80.00", "60.00", "25.00", "–", "10"]


def test_json_round_trip(tmp_path) -> None:
    results = {
        "PPCR": {
            ("refcoco", "unc", "val"): _metrics(0.75, 0.76, count=np.int64(5), box=np.float64(0.5)),
            ("synthref", "synth", "val"): _metrics(0.1, 0.2),
        },
        "baseline": {("refcocog", "umd", "test"): _metrics(0.3, 0.4)},
    }
    meta = {"checkpoint": tmp_path / "ckpt", "seed": 0}
    json_path, md_path = write_report(tmp_path / "out", results, meta)
    assert json_path.name == "report.json" and md_path.name == "report.md"
    loaded, loaded_meta = load_report(json_path)
    assert loaded_meta == {"checkpoint": str(tmp_path / "ckpt"), "seed": 0}
    assert list(loaded) == ["PPCR", "baseline"]
    assert list(loaded["PPCR"]) == [("refcoco", "unc", "val"), ("synthref", "synth", "val")]
    assert loaded["PPCR"][("refcoco", "unc", "val")]["count"] == 5
    assert loaded == {r: {k: dict(v) for k, v in per.items()} for r, per in results.items()}
    assert load_report(tmp_path / "out")[0] == loaded  # directory form
    md = md_path.read_text(encoding="utf-8")
    assert "# PPCR evaluation report" in md and "**seed**: 0" in md
    assert markdown_table(loaded, details=False) in md
    assert "75.00" in md and "BoxAcc@0.5" in md
