"""`ppcr demo --quick` runs the whole pipeline and leaves what every later command takes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ppcr.cli import main
from ppcr.data.shards import iter_expressions, shard_dir
from ppcr.demo import QUICK, run_demo
from ppcr.predictor import Segmenter
from ppcr.report import load_report

pytestmark = pytest.mark.slow  # trains the tiny preset for minutes


def test_quick_demo_leaves_checkpoint_report_and_overlays(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "1/6" in printed and "6/6" in printed  # progress is shown throughout
    assert f"step 25/{QUICK.steps}" in printed and "min to go" in printed  # with an ETA while training
    assert "CUT SHORT" not in printed
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
    assert meta["steps"] == meta["planned_steps"] == QUICK.steps  # a fixed amount of training
    md = (out / "report.md").read_text()
    assert "PPCR (trained)" in md and "mIoU" in md and "WARNING" not in md
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 4
    assert Image.open(overlays[0]).size[0] > 0
    # The checkpoint is the one every later command takes.
    seg = Segmenter.from_checkpoint(out / "checkpoint")
    image = Image.open(next((out / "refer" / "images" / "train2014").glob("*.jpg"))).convert("RGB")
    mask, box, score, instances = seg.segment(image, "the red circle")
    assert mask.shape == (image.height, image.width)
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["steps"] == meta["steps"]
    # It ends by serving the checkpoint and segmenting a few val images over HTTP.
    served = json.loads((out / "served.json").read_text())
    assert len(served) == 3 and all(len(r["box"]) == 4 and r["mask_size"][0] > 0 for r in served)


def test_demo_cut_short_by_its_time_bound_says_so_loudly(tmp_path, capsys):
    """The time bound is a safety net: a run it stops says so on the console and at the top of
    report.md, with the steps done, the steps planned and what that means for the numbers."""
    out = tmp_path / "demo"
    run_demo(out, quick=True, train_minutes=0.001, served=0)  # 0.06 s: one step, then the bound
    printed = capsys.readouterr().out
    results, meta = load_report(out / "report.json")
    assert 0 < meta["steps"] < meta["planned_steps"] == QUICK.steps
    said = f"{meta['steps']} of {QUICK.steps} planned steps"
    top = (out / "report.md").read_text().split("## ")[0]  # before the first table
    assert "WARNING" in top and "CUT SHORT" in top and said in top and "under-trained" in top
    assert said in json.loads((out / "report.json").read_text())["warning"]
    console = [line for line in printed.splitlines() if "WARNING" in line and "CUT SHORT" in line]
    assert len(console) >= 2  # when training stops, and again as the last thing printed
    assert printed.rstrip().splitlines()[-1].startswith("!")
    assert "PPCR (trained)" in results  # the run still finishes and reports


def test_quick_grefcoco_demo_reports_gres_metrics_and_single_target_miou(tmp_path, capsys):
    """`ppcr demo --grefcoco --quick`: synthgref and synthref of the same scenes, the tiny-grefcoco preset
    trained, gIoU / cIoU / N-acc / T-acc on synthgref's splits and mIoU on synthref val."""
    from ppcr.demo import GREF_QUICK

    out = tmp_path / "gref"
    assert main(["demo", "--grefcoco", "--quick", "--steps", "12", "--images", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1/6" in printed and "6/6" in printed and "CUT SHORT" not in printed
    results, meta = load_report(out / "report.json")
    row = results["PPCR multi-target (trained)"]
    assert {k for k in row if k[0] == "synthgref"} == {
        ("synthgref", "unc", s) for s in GREF_QUICK.eval_splits
    }
    val = row[("synthgref", "unc", "val")]
    assert {"gIoU", "cIoU", "N-acc", "T-acc"} <= val.keys() and 0 <= val["N-acc"] <= 1
    assert "mIoU" in row[("synthref", "unc", "val")]
    assert meta["steps"] == meta["planned_steps"] == 12 != GREF_QUICK.steps  # --steps
    assert meta["images"] == 30 != GREF_QUICK.data.num_images  # --images
    seg = Segmenter.from_checkpoint(out / "checkpoint")
    assert seg.model.cfg.targets == "multi"
    # The page's banner reads what it was trained on and its numbers from the checkpoint.
    record = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert record["trained_on"]["dataset"] == "synthgref"
    assert record["evaluation"]["synthgref/unc/val"]["N-acc"] == round(val["N-acc"], 4)
    ref_val = row[("synthref", "unc", "val")]
    assert record["evaluation"]["synthref/unc/val"] == {k: round(ref_val[k], 4) for k in ("mIoU", "oIoU")}
    # Overlays of each kind of val expression the split has, named by kind.
    names = sorted(p.name for p in (out / "overlays").glob("*.png"))
    val_split = shard_dir(out / "shards", "synthgref", "unc", "val")
    kinds = {
        "no-target" if e.no_target else "one-target" if len(e.targets) == 1 else "multi-target"
        for e in iter_expressions(val_split)
    }
    assert 0 < len(names) <= GREF_QUICK.overlays
    assert {n.split("_")[1] for n in names} == kinds
