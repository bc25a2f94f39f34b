"""`ppcr demo --quick` runs the whole pipeline and leaves what every later command takes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ppcr.cli import main
from ppcr.predictor import Segmenter
from ppcr.report import load_report

pytestmark = pytest.mark.slow  # trains the tiny preset for minutes


def test_quick_demo_leaves_checkpoint_report_and_overlays(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "1/6" in printed and "6/6" in printed  # progress is shown throughout
    results, meta = load_report(out / "report.json")
    assert {
        "PPCR (untrained)",
        "PPCR (trained)",
        "PPCR + GT box (oracle)",
        "baseline: mean box",
        "baseline: all objects",
    } <= set(results)
    val = ("synthref", "unc", "val")
    assert results["PPCR + GT box (oracle)"][val]["BoxAcc@0.5"] == 1.0
    assert results["PPCR (trained)"][val]["count"] == results["baseline: all objects"][val]["count"] > 0
    assert meta["steps"] > 0
    md = (out / "report.md").read_text()
    assert "PPCR (trained)" in md and "mIoU" in md
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 4
    assert Image.open(overlays[0]).size[0] > 0
    # The checkpoint is the one every later command takes.
    seg = Segmenter.from_checkpoint(out / "checkpoint")
    image = Image.open(next((out / "refer" / "images" / "train2014").glob("*.jpg"))).convert("RGB")
    mask, box, score = seg.segment(image, "the red circle")
    assert mask.shape == (image.height, image.width)
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["steps"] == meta["steps"]
    # It ends by serving the checkpoint and segmenting a few val images over HTTP.
    served = json.loads((out / "served.json").read_text())
    assert len(served) == 3 and all(len(r["box"]) == 4 and r["mask_size"][0] > 0 for r in served)
