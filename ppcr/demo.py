"""`ppcr demo`: the whole system on a laptop CPU.

synthesise a RefCOCO-style data set (REFER layout) -> Parquet shards -> evaluate the untrained tiny
model and two trivial baselines -> train -> evaluate (and the ground-truth-box oracle) -> report +
overlays -> serve the checkpoint with Ray Serve and segment a few images over HTTP. Leaves
DIR/checkpoint/, DIR/report.json, DIR/report.md, DIR/overlays/, DIR/served.json.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import load_config
from .data.shards import iter_expressions, prepare_shards, shard_dir
from .data.synth import SynthConfig, synthesize
from .evaluate import evaluate_baselines, evaluate_split
from .geometry import decode_image
from .model import PPCRModel
from .predictor import Segmenter
from .report import write_report
from .train import train
from .visualize import save_overlay


def _demo_data(num_images: int) -> SynthConfig:
    # Objects at least ~1.5 CLIP patches wide: "small" at the generator's default is under one patch of
    # the tiny preset's 7x7 grid, and its shape is then hardly visible (docs/learning.md).
    return SynthConfig(
        num_images=num_images,
        seed=0,
        min_objects=2,
        max_objects=3,
        relations=False,
        small_size=(0.18, 0.25),
        big_size=(0.3, 0.4),
    )


@dataclass
class DemoSettings:
    data: SynthConfig = field(default_factory=lambda: _demo_data(900))
    # A safety bound: on 2 cores here 2000 steps take about 13 min, so a slower machine stops early.
    train_minutes: float = 13.0
    steps: int = 2000
    overlays: int = 12
    served: int = 3  # val images segmented over HTTP at the end (ppcr.serve.demo_serving)
    eval_splits: tuple[str, ...] = ("val", "testA", "testB")


QUICK = DemoSettings(data=_demo_data(40), train_minutes=0.5, steps=30, overlays=4)


def _say(msg: str) -> None:
    print(f"[ppcr demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(
    out_dir: str | Path = "demo_out", quick: bool = False, train_minutes: float | None = None
) -> dict:
    s = QUICK if quick else DemoSettings()
    if train_minutes is not None:
        s = replace(s, train_minutes=train_minutes)  # never mutate the shared QUICK settings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refer_root, shards = out / "refer", out / "shards"

    _say(f"1/6 synthesising {s.data.num_images} images (REFER layout) in {refer_root}")
    synth = synthesize(refer_root, s.data)
    _say(f"    {synth['refs']} refs, {synth['sentences']} expressions")
    _say("2/6 preparing Parquet shards")
    prepare_shards(refer_root, synth["images_dir"], "synthref", "unc", shards)

    cfg = load_config("tiny", overrides={"data": {"shards_root": str(shards)}, "train": {"steps": s.steps}})
    split = lambda name: shard_dir(shards, "synthref", "unc", name)  # noqa: E731
    key = lambda name: ("synthref", "unc", name)  # noqa: E731
    results: dict[str, dict] = {}

    _say("3/6 evaluating the untrained model and the trivial baselines")
    torch.manual_seed(cfg.train.seed)
    untrained = PPCRModel(cfg.model)
    results["PPCR (untrained)"] = {key("val"): evaluate_split(untrained, split("val"))}
    del untrained
    for name in s.eval_splits:
        for row, metrics in evaluate_baselines(split("train"), split(name)).items():
            results.setdefault(row, {})[key(name)] = metrics

    _say(f"4/6 training the tiny preset for up to {s.train_minutes:g} min ({s.steps} steps max)")
    result = train(cfg, out_dir=out / "train", time_budget_s=s.train_minutes * 60)
    ckpt = out / "checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(result.checkpoint, ckpt)

    _say("5/6 evaluating the trained model (and the ground-truth-box oracle)")
    for name in s.eval_splits:
        results.setdefault("PPCR (trained)", {})[key(name)] = evaluate_split(result.model, split(name))
    results["PPCR + GT box (oracle)"] = {
        key("val"): evaluate_split(result.model, split("val"), oracle_box=True)
    }

    meta = {
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "images": s.data.num_images,
        "expressions": synth["sentences"],
        "checkpoint": str(ckpt),
    }
    js, md = write_report(out, results, meta=meta)

    _say(f"6/6 drawing {s.overlays} overlays")
    seg = Segmenter(result.model)
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    for i, sample in enumerate(iter_expressions(split("val"))):
        if i >= s.overlays:
            break
        image = decode_image(sample.image_bytes)
        mask, box, score = seg.segment(image, sample.text)
        save_overlay(
            overlays / f"{i:02d}_{sample.image_id}.png",
            image=image,
            mask=mask,
            box=box,
            expression=sample.text,
            gt_box=sample.bbox_xyxy,
            score=score,
        )
    print(md.read_text())
    _serve_step(ckpt, split("val"), out / "served.json", s.served)
    _say(f"done: {ckpt}, {js}, {md}, {overlays}/")
    return results


def _serve_step(ckpt: Path, val: Path, out_file: Path, count: int) -> None:
    """Serve the checkpoint with Ray Serve and segment `count` val images over HTTP. A failure here is
    reported, not raised: the trained checkpoint and report above are the demo's product."""
    import json

    from .serve import demo_serving

    _say(f"then: serving {ckpt} with Ray Serve and segmenting {count} val images over HTTP")
    samples = [(x.image_bytes, x.text) for _, x in zip(range(count), iter_expressions(val))]
    try:
        answers = demo_serving(ckpt, samples)
    except Exception as exc:  # the demo must finish: say loudly what failed, and go on
        _say(f"    serving FAILED ({type(exc).__name__}: {exc}); see ppcr/serve/")
        return
    rows = [
        {
            "expression": text,
            "box": a["box"],
            "score": a["score"],
            "mask_size": a["mask"]["size"],
            "timings_ms": a["timings_ms"],
        }
        for (_, text), a in zip(samples, answers)
    ]
    out_file.write_text(json.dumps(rows, indent=2))
    for r in rows:
        _say(f"    {r['expression']!r}: box {r['box']}, {r['timings_ms']['total']:.0f} ms")
    _say(f"    answers: {out_file}")
