"""`ppcr demo`: the whole system on a laptop CPU.

synthesise a RefCOCO-style data set (REFER layout) -> Parquet shards -> evaluate the untrained tiny
model and two trivial baselines -> train -> evaluate (and the ground-truth-box oracle) -> report +
overlays -> serve the checkpoint with Ray Serve and segment a few images over HTTP. Leaves
DIR/checkpoint/, DIR/report.json, DIR/report.md, DIR/overlays/, DIR/served.json.

`ppcr demo --grefcoco` (`run_grefcoco_demo`): the same scenes in gRefCOCO's layout (`synthgref`: also
expressions naming no object and several objects) -> train the `tiny-grefcoco` preset (model.targets
multi) -> evaluate gIoU / cIoU / N-acc / T-acc on synthgref's splits and mIoU on the classic synthref val
(the single-target expressions alone, to compare with the single-target demo) -> report -> overlays of
val expressions naming nothing, one object and several, each object in its own colour.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import ConfigError, load_config
from .data.shards import iter_expressions, prepare_shards, shard_dir
from .data.synth import SynthConfig, demo_config, synthesize
from .evaluate import evaluate_baselines, evaluate_split
from .geometry import decode_image
from .model import PPCRModel
from .predictor import Segmenter
from .report import write_report
from .train import TrainResult, train
from .visualize import save_overlay


@dataclass
class DemoSettings:
    data: SynthConfig = field(default_factory=lambda: demo_config(900))
    # The amount of training is a step count, so the numbers are the same on any machine (README).
    # 1800 steps of 32 expressions: ~0.37-0.43 s/step on a quiet 2-core AVX2 EPYC. With the tiny preset's
    # width-sized init, grounding starts at step 300-575 in every run instead of somewhere in 500-1400+
    # (docs/learning.md, findings 16-17); 16 per step learns far less per step (finding 13).
    steps: int = 1800
    batch_size: int = 32
    # A safety net, not the plan: a machine too slow to finish `steps` in this time stops early, and the
    # console and the top of report.md say so (steps done, steps planned, what it means).
    train_minutes: float = 45.0
    overlays: int = 12
    served: int = 3  # val images segmented over HTTP at the end (ppcr.serve.demo_serving); 0: skip
    eval_splits: tuple[str, ...] = ("val", "testA", "testB")


QUICK = DemoSettings(data=demo_config(40), train_minutes=5.0, steps=30, overlays=4)

# What the full demo reaches with DemoSettings' steps (README and docs/learning.md, same run).
PUBLISHED = "val mIoU 0.68-0.69, BoxAcc@0.5 0.68-0.72"


def _say(msg: str) -> None:
    print(f"[ppcr demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _progress(total: int):
    """A train() `on_log` callback: the first speed estimate, then a line at every tenth of the steps."""
    shown: set[int] = set()

    def show(record: dict) -> None:
        step, tenth = record["step"], record["step"] * 10 // total
        if shown and (tenth in shown or step == total):
            return
        shown.add(tenth)
        _say(
            f"    step {step}/{total}: {record['elapsed_s'] / 60:.1f} min so far, "
            f"about {record['eta_s'] / 60:.1f} min to go ({record['elapsed_s'] / step:.2f} s/step), "
            f"loss {record['loss']:.3f}"
        )

    return show


def cut_short_warning(result: TrainResult, minutes: float, quick: bool) -> str:
    """What a run stopped by the time bound means for its numbers (console and top of report.md)."""
    per_step = result.seconds / max(result.steps, 1)
    need = per_step * result.planned_steps / 60
    return (
        f"Training was CUT SHORT by the {minutes:g}-minute time bound: {result.steps} of "
        f"{result.planned_steps} planned steps ({result.steps / result.planned_steps:.0%}).\n"
        "The model is under-trained and its learning rate never decayed, so every 'PPCR (trained)' number "
        "below is lower than the demo's result"
        + (
            ""
            if quick or result.planned_steps != DemoSettings.steps
            else f" ({PUBLISHED} after {result.planned_steps} steps)"
        )
        + " and says nothing about the method.\n"
        f"This machine ran {per_step:.2f} s/step; the planned steps need about {need:.0f} min: "
        f"re-run with `--train-minutes {max(need * 1.2, 1):.0f}`."
    )


def _schedule(
    s: DemoSettings | GrefDemoSettings,
    steps: int | None,
    train_minutes: float | None,
    images: int | None = None,
) -> DemoSettings | GrefDemoSettings:
    """The settings with `--steps`, `--train-minutes` and `--images` applied. More steps than the
    default stretch the default time bound in proportion (it is a safety net, not the plan); an
    explicit bound wins. `images` is the number of synthetic scenes (split 70/10/10/10)."""
    if images is not None:
        if isinstance(images, bool) or not isinstance(images, int) or images < 10:
            raise ConfigError(
                f"demo images must be a whole number >= 10 (one per split at least), got {images!r}"
            )
        s = replace(s, data=replace(s.data, num_images=images))
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"demo steps must be a whole number >= 1, got {steps!r}")
        stretch = max(steps / s.steps, 1.0)
        s = replace(s, steps=steps, train_minutes=s.train_minutes * stretch)
    if train_minutes is not None:
        s = replace(s, train_minutes=train_minutes)  # never mutate the shared QUICK settings
    return s


def _shout(text: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}", flush=True)
    for line in text.splitlines():
        _say(f"WARNING: {line}")
    print(f"{bar}\n", flush=True)


def run_demo(
    out_dir: str | Path = "demo_out",
    quick: bool = False,
    train_minutes: float | None = None,
    served: int | None = None,
    steps: int | None = None,
    images: int | None = None,
) -> dict:
    s = _schedule(QUICK if quick else DemoSettings(), steps, train_minutes, images)
    if served is not None:
        s = replace(s, served=served)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refer_root, shards = out / "refer", out / "shards"

    _say(f"1/6 synthesising {s.data.num_images} images (REFER layout) in {refer_root}")
    synth = synthesize(refer_root, s.data)
    _say(f"    {synth['refs']} refs, {synth['sentences']} expressions")
    _say("2/6 preparing Parquet shards")
    prepare_shards(refer_root, synth["images_dir"], "synthref", "unc", shards)

    cfg = load_config(
        "tiny",
        overrides={
            "data": {"shards_root": str(shards)},
            "train": {"steps": s.steps, "batch_size": s.batch_size},
            # `ppcr train` splits the batch over 2 workers; keep the demo's config valid for it too.
            "distributed": {"micro_batch_size": s.batch_size // 2},
        },
    )
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

    _say(
        f"4/6 training the tiny preset for {s.steps} steps (a fixed amount: the numbers do not depend on "
        f"this machine's speed; a {s.train_minutes:g}-min safety bound would stop it early, and say so)"
    )
    result = train(
        cfg,
        out_dir=out / "train",
        progress=False,
        time_budget_s=s.train_minutes * 60,
        on_log=_progress(s.steps),
    )
    warning = None
    if result.stopped_by_time:
        warning = cut_short_warning(result, s.train_minutes, quick)
        _shout(warning)
    else:
        _say(f"    trained {result.steps} steps in {result.seconds / 60:.1f} min")
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

    _record_in_checkpoint(
        ckpt, "synthref", s.data.num_images, results["PPCR (trained)"], ("oIoU", "mIoU", "BoxAcc@0.5")
    )
    meta = {
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "train_seconds": round(result.seconds, 1),
        "images": s.data.num_images,
        "expressions": synth["sentences"],
        "checkpoint": str(ckpt),
    }
    js, md = write_report(out, results, meta=meta, warning=warning)

    _say(f"6/6 drawing {s.overlays} overlays")
    seg = Segmenter(result.model)
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    for i, sample in enumerate(iter_expressions(split("val"))):
        if i >= s.overlays:
            break
        image = decode_image(sample.image_bytes)
        answer = seg.segment(image, sample.text)
        save_overlay(
            overlays / f"{i:02d}_{sample.image_id}.png",
            image=image,
            mask=answer.mask,
            box=answer.box,
            expression=sample.text,
            gt_box=sample.bbox_xyxy,
            score=answer.score,
        )
    print(md.read_text())
    if s.served:
        _serve_step(ckpt, split("val"), out / "served.json", s.served)
    _say(f"done: {ckpt}, {js}, {md}, {overlays}/")
    if warning:
        _shout(warning)  # again, last, where it cannot scroll away
    return results


@dataclass
class GrefDemoSettings:
    """`ppcr demo --grefcoco`: the demo's scenes with no-target and multi-target expressions."""

    data: SynthConfig = field(
        default_factory=lambda: replace(demo_config(900), generalized=True, dataset="synthgref")
    )
    # The single-target demo's schedule (README and docs/learning.md quote this run).
    steps: int = 1800
    batch_size: int = 32
    train_minutes: float = 45.0
    eval_splits: tuple[str, ...] = ("val", "testA", "testB")
    overlays: int = 12  # a third each naming nothing, one object and several (as val has them)


GREF_QUICK = GrefDemoSettings(
    data=replace(demo_config(40), generalized=True, dataset="synthgref"),
    steps=20,
    train_minutes=5.0,
    overlays=6,
)


def run_grefcoco_demo(
    out_dir: str | Path = "demo_gref",
    quick: bool = False,
    train_minutes: float | None = None,
    steps: int | None = None,
    images: int | None = None,
) -> dict:
    """Synthesise synthgref (and the classic synthref of the same scenes), train the `tiny-grefcoco`
    preset (model.targets multi), evaluate, write DIR/report.{json,md} and DIR/checkpoint/. Returns the
    results {row: {(dataset, split_by, split): metrics}}."""
    s = _schedule(GREF_QUICK if quick else GrefDemoSettings(), steps, train_minutes, images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards"
    classic = replace(s.data, generalized=False, dataset="synthref")
    _say(
        f"1/6 synthesising {s.data.num_images} images twice: gRefCOCO's layout (synthgref) and RefCOCO's (synthref)"
    )
    gsynth = synthesize(out / "refer", s.data)
    csynth = synthesize(out / "refer_classic", classic)
    _say(
        f"    synthgref: {gsynth['refs']} refs, {gsynth['sentences']} expressions; synthref: {csynth['sentences']}"
    )
    _say("2/6 preparing Parquet shards")
    prepare_shards(out / "refer", gsynth["images_dir"], "synthgref", "unc", shards)
    prepare_shards(out / "refer_classic", csynth["images_dir"], "synthref", "unc", shards)
    cfg = load_config(
        "tiny-grefcoco",
        overrides={
            "data": {"shards_root": str(shards)},
            "train": {"steps": s.steps, "batch_size": s.batch_size},
            "distributed": {"micro_batch_size": s.batch_size // 2},
        },
    )
    _say(f"3/6 training the tiny-grefcoco preset (model.targets multi) for {s.steps} steps")
    result = train(
        cfg,
        out_dir=out / "train",
        progress=False,
        time_budget_s=s.train_minutes * 60,
        on_log=_progress(s.steps),
    )
    warning = None
    if result.stopped_by_time:
        warning = cut_short_warning(result, s.train_minutes, quick=True)
        _shout(warning)
    else:
        _say(f"    trained {result.steps} steps in {result.seconds / 60:.1f} min")
    ckpt = out / "checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(result.checkpoint, ckpt)
    _say(
        "4/6 evaluating: synthgref (gIoU, cIoU, N-acc, T-acc) and synthref val (its single-target expressions)"
    )
    row = "PPCR multi-target (trained)"
    results: dict[str, dict] = {row: {}}
    for name in s.eval_splits:
        split = shard_dir(shards, "synthgref", "unc", name)
        results[row][("synthgref", "unc", name)] = evaluate_split(result.model, split, progress=False)
    val = shard_dir(shards, "synthref", "unc", "val")
    results[row][("synthref", "unc", "val")] = evaluate_split(result.model, val, progress=False)
    meta = {
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "train_seconds": round(result.seconds, 1),
        "images": s.data.num_images,
        "expressions": gsynth["sentences"],
        "checkpoint": str(ckpt),
    }
    _say("5/6 writing the report")
    _record_in_checkpoint(ckpt, "synthgref", s.data.num_images, results[row], GREF_RECORDED)
    js, md = write_report(out, results, meta=meta, warning=warning)
    print(md.read_text())
    overlays = out / "overlays"
    _say(
        f"6/6 drawing {s.overlays} overlays of synthgref val: expressions naming nothing, one object, several"
    )
    drawn = _gref_overlays(result.model, shard_dir(shards, "synthgref", "unc", "val"), overlays, s.overlays)
    _say("    " + ", ".join(f"{n} {kind}" for kind, n in drawn.items()))
    _say(f"done: {ckpt}, {js}, {md}, {overlays}/")
    if warning:
        _shout(warning)
    return results


# What the multi-target demo's checkpoint records of each split (synthgref: GRES metrics; synthref val:
# its single-target expressions' mIoU / oIoU).
GREF_RECORDED = ("gIoU", "cIoU", "N-acc", "T-acc", "mIoU", "oIoU")


def _record_in_checkpoint(
    ckpt: Path, dataset: str, images: int, results: dict, metrics: tuple[str, ...]
) -> None:
    """Add what the checkpoint was trained on and its evaluation numbers (`results`: {(dataset,
    split_by, split): metrics}, the `metrics` named kept) to its meta.json, where the serving app
    reads them (`/healthz`, the page's banner)."""
    import json

    meta_file = ckpt / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["trained_on"] = {
        "dataset": dataset,
        "split_by": "unc",
        "synthetic": True,
        "what": f"{images} synthetic scenes of coloured shapes (ppcr synth)",
    }
    meta["evaluation"] = {
        "/".join(key): {k: round(v, 4) for k, v in m.items() if k in metrics} for key, m in results.items()
    }
    meta_file.write_text(json.dumps(meta, indent=2))


def _gref_overlays(model: PPCRModel, split: Path, out: Path, count: int) -> dict[str, int]:
    """Draw up to `count` overlays of `split`'s expressions into `out`, a third each naming nothing,
    one object and several (in shard order, one of each kind per image, so they show different
    scenes), each object in its own colour and the truth's enclosing box dashed. Returns how many of
    each kind were drawn (fewer where the split has fewer)."""
    seg = Segmenter(model)
    out.mkdir(parents=True, exist_ok=True)
    quota = {"no-target": count // 3, "one-target": count // 3, "multi-target": count - 2 * (count // 3)}
    drawn = dict.fromkeys(quota, 0)
    shown: set[tuple[int, str]] = set()
    for sample in iter_expressions(split):
        n = len(sample.targets)
        kind = "no-target" if sample.no_target else "one-target" if n == 1 else "multi-target"
        if drawn == quota:
            break
        if drawn[kind] >= quota[kind] or (sample.image_id, kind) in shown:
            continue
        shown.add((sample.image_id, kind))
        image = decode_image(sample.image_bytes)
        answer = seg.segment(image, sample.text)
        truth = "nothing" if sample.no_target else f"{n} object{'s' * (n > 1)}"
        several = len(answer.instances) > 1
        save_overlay(
            out / f"{sum(drawn.values()):02d}_{kind}_{sample.image_id}.png",
            image=image,
            mask=answer.mask,
            box=answer.box,
            expression=f"{sample.text}  [truth: {truth}]",
            gt_box=None if sample.no_target else sample.bbox_xyxy,
            score=answer.score,
            instance_boxes=[i.box for i in answer.instances] if several else (),
            instance_masks=[i.mask for i in answer.instances] if several else (),
            no_target=answer.no_target,
        )
        drawn[kind] += 1
    return drawn


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
