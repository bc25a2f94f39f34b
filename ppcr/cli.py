"""`ppcr` command line: synth, prepare, train, export, evaluate, batch, segment, serve, demo, convert-glamm."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from .config import ConfigError, InputError, SpatialPrompt
from .ray_cluster import ResourceError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (YAML value)",
    )


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE; got {pair!r}")
        key, value = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def cmd_synth(a: argparse.Namespace) -> int:
    from .config import from_dict
    from .data.synth import SynthConfig, synthesize

    fields = dict(num_images=a.images, seed=a.seed, min_objects=a.min_objects, max_objects=a.max_objects)
    cfg = from_dict(SynthConfig, {**fields, "relations": not a.no_relations}, "synth")
    summary = synthesize(a.out, cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0


_PREPARE_FLAGS = {
    "refer": {"refer_root": "--refer-root", "images": "--images", "split_by": "--split-by"},
    "jsonl": {"manifest": "--manifest"},
    "coco": {"instances": "--instances", "expressions": "--expressions", "images": "--images"},
}


def _check_prepare_flags(a: argparse.Namespace) -> None:
    """Each --format takes its own inputs: a missing one, or one of another format, is an InputError."""
    needed = _PREPARE_FLAGS[a.format]
    missing = [flag for key, flag in needed.items() if getattr(a, key) is None]
    if missing:
        raise InputError(f"prepare --format {a.format} needs {', '.join(missing)}")
    others = {k: f for fmt, flags in _PREPARE_FLAGS.items() for k, f in flags.items() if k not in needed}
    extra = [flag for key, flag in others.items() if getattr(a, key) is not None]
    if extra:
        verb = "is not an input" if len(extra) == 1 else "are not inputs"
        raise InputError(f"{', '.join(extra)} {verb} of prepare --format {a.format}")


def cmd_prepare(a: argparse.Namespace) -> int:
    _check_prepare_flags(a)
    if a.format != "refer":
        return _prepare_custom(a)
    from .data.refer import valid_splits

    valid_splits(a.dataset, a.split_by)  # an unknown name is a one-line error before Ray or any file
    source = (a.refer_root, a.images, a.dataset, a.split_by, a.out)
    common = dict(splits=a.splits, rows_per_file=a.rows_per_file)
    if a.ray:
        from .data.distributed_prepare import prepare_shards_ray
        from .ray_cluster import init_ray

        init_ray(address=a.address, num_cpus=a.num_cpus, quiet=False)
        report, parts = prepare_shards_ray(*source, **common, concurrency=a.concurrency)
        extra = {"parts_written": parts["written"], "parts_already_done": parts["skipped"]}
    else:
        from .data.shards import prepare_shards

        report = prepare_shards(*source, **common, skip_bad=a.skip_bad)
        extra = {}
    return _prepare_summary(report, extra)


def _prepare_custom(a: argparse.Namespace) -> int:
    """`ppcr prepare --format jsonl|coco`: a manifest, or COCO instances + expressions (docs/custom_data.md)."""
    from .data.custom import SPLIT_BY, prepare_custom, prepare_custom_ray, read_coco, read_jsonl

    if a.format == "jsonl":
        source = read_jsonl(a.manifest, a.dataset)
    else:
        source = read_coco(a.instances, a.expressions, a.images, a.dataset)
    common = dict(splits=a.splits, rows_per_file=a.rows_per_file)
    extra = {"dataset": f"--dataset {a.dataset} --split-by {SPLIT_BY}"}
    if a.ray:
        from .ray_cluster import init_ray

        init_ray(address=a.address, num_cpus=a.num_cpus, quiet=False)
        report, parts = prepare_custom_ray(source, a.out, **common, concurrency=a.concurrency)
        extra.update(parts_written=parts["written"], parts_already_done=parts["skipped"])
    else:
        report = prepare_custom(source, a.out, **common, skip_bad=a.skip_bad, progress=True)
    return _prepare_summary(report, extra)


def _prepare_summary(report, extra: dict) -> int:
    summary = {"written": report.written, "files": len(report.files), "errors": len(report.errors), **extra}
    print(json.dumps(summary, indent=2))
    for err in report.errors[:20]:
        print(f"skipped: {err}", file=sys.stderr)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .config import load_config

    overrides = _overrides(a.set)
    dist = overrides.setdefault("distributed", {})
    for key, value in (("num_workers", a.num_workers), ("name", a.name), ("storage_path", a.storage)):
        if value is not None:
            dist[key] = value
    if a.use_gpu:
        dist["use_gpu"] = True
    cfg = load_config(a.preset or a.config, overrides=overrides)
    if a.local:
        from .train import train

        result = train(cfg, out_dir=a.out, time_budget_s=a.time_budget)
        print(f"trained {result.steps} steps in {result.seconds:.0f}s; checkpoint: {result.checkpoint}")
        if result.stopped_by_time:  # a run the time bound cut short must not pass for a finished one
            print(
                f"WARNING: --time-budget {a.time_budget:g}s CUT training SHORT: {result.steps} of "
                f"{result.planned_steps} planned steps; the checkpoint is under-trained and its learning "
                "rate never decayed.",
                file=sys.stderr,
            )
        return 0
    from .distributed_train import run_training
    from .ray_cluster import init_ray

    init_ray(address=a.address, num_cpus=a.num_cpus, quiet=False)  # run_training reuses this Ray
    result = run_training(cfg, out=a.out, resume=a.resume)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    print(json.dumps({"steps": result.steps, "run": result.run_dir, "metrics": shown}, indent=2))
    print(f"inference checkpoint: {result.checkpoint}")
    return 0


# GLaMM's own reading of its weights (docs/glamm.md): what `--fidelity glamm` writes into the config.
GLAMM_FIDELITY = {"semantic_state": "predicting", "prompt_format": "glamm", "clip_preprocess": "crop"}


def cmd_convert_glamm(a: argparse.Namespace) -> int:
    from .config import load_config
    from .glamm import convert_glamm

    overrides = _overrides(a.set)
    if a.fidelity == "glamm":
        overrides.setdefault("model", {}).update(GLAMM_FIDELITY)
    cfg = load_config(a.config, overrides=overrides).model
    report = convert_glamm(a.glamm, a.llava, a.out, cfg, grand=a.grand, seed=a.seed)
    summary = {
        "mapped": report.mapped,
        "dropped": report.dropped,
        "base_tensors_equal": report.base_equal,
        "base_overrides": report.base_overrides,
        "token_rows": report.token_rows,
        "vocabulary": report.vocabulary_check,
        "lora_relative_error": report.lora,
        "fresh": report.fresh,
    }
    print(json.dumps(summary, indent=2))
    print(f"ppcr checkpoint: {a.out}  (per-tensor LoRA errors in {Path(a.out) / 'meta.json'})")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .distributed_train import export_inference

    print(f"inference checkpoint: {export_inference(a.run, a.out)}")
    return 0


def _evaluation_setup(a: argparse.Namespace) -> tuple[str, dict, list[dict] | None]:
    """(row name, report meta, the list collecting --predictions records or None) of `ppcr evaluate`."""
    from .metrics import describe_protocol

    if a.protocol_seed is not None and a.protocol != "glamm":
        raise InputError("--protocol-seed draws the expressions of --protocol glamm; add it or drop the seed")
    seed = a.protocol_seed or 0
    row = "PPCR (oracle box)" if a.oracle_box else "PPCR"
    if a.protocol != "all":
        row += f" [{a.protocol} protocol, seed {seed}]"
    meta = {"checkpoint": str(a.checkpoint), "protocol": describe_protocol(a.protocol, seed)}
    if a.predictions:
        meta["predictions"] = str(a.predictions)
    return row, meta, [] if a.predictions else None


def _write_predictions(a: argparse.Namespace, records: list[dict] | None) -> None:
    if records is None:
        return
    from .report import write_predictions

    order = {split: i for i, split in enumerate(a.splits)}
    records.sort(key=lambda r: (order[r["split"]], r["sent_id"]))  # the same lines, in or out of Ray
    write_predictions(a.predictions, records)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .data.shards import shard_dir
    from .evaluate import evaluate_split
    from .report import write_report

    overrides = {"spatial_prompt": a.spatial_prompt} if a.spatial_prompt else {}
    if not a.ray and (a.config or a.set):
        raise InputError("--config / --set size the --ray pipeline (BatchConfig); add --ray or drop them")
    row, meta, records = _evaluation_setup(a)
    if a.ray:
        if a.device != "cpu":
            raise InputError(
                "--device is for in-process evaluation; with --ray, --batch-config places the stages"
            )
        return _evaluate_ray(a, {**overrides, **_dtype_override(a)} or None, row, meta, records)
    model = load_checkpoint(a.checkpoint, overrides={**overrides, **_dtype_override(a)}, device=a.device)
    results: dict = {}
    for split in a.splits:
        key = (a.dataset, a.split_by, split)
        results.setdefault(row, {})[key] = evaluate_split(
            model,
            shard_dir(a.shards, a.dataset, a.split_by, split),
            batch_size=a.batch_size,
            oracle_box=a.oracle_box,
            protocol=a.protocol,
            seed=a.protocol_seed or 0,
            on_prediction=None if records is None else records.append,
        )
    _write_predictions(a, records)
    js, md = write_report(a.out, results, meta=meta)
    print(md.read_text())
    return 0


def _evaluate_ray(
    a: argparse.Namespace, overrides: dict | None, row: str, meta: dict, records: list[dict] | None
) -> int:
    """`ppcr evaluate --ray`: every split in one Ray Data pipeline (ppcr.batch)."""
    from .batch import evaluate_shards, load_batch_config
    from .data.shards import shard_dir
    from .ray_cluster import init_ray
    from .report import write_report

    cfg = load_batch_config(a.config, _overrides(a.set))
    init_ray(address=a.address, num_cpus=a.num_cpus)
    dirs = [shard_dir(a.shards, a.dataset, a.split_by, split) for split in a.splits]
    per_split = evaluate_shards(
        a.checkpoint,
        dirs,
        cfg,
        overrides,
        oracle_box=a.oracle_box,
        protocol=a.protocol,
        seed=a.protocol_seed or 0,
        on_prediction=None if records is None else records.append,
    )
    _write_predictions(a, records)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, metrics in per_split.items():
        name = f"{a.dataset}_{a.split_by}_{split}.json"
        summary = {"split": split, "oracle_box": a.oracle_box, "protocol": meta["protocol"], **metrics}
        (out / name).write_text(json.dumps(summary, indent=2))
    results = {row: {(a.dataset, a.split_by, split): m for split, m in per_split.items()}}
    _, md = write_report(out, results, meta={**meta, "runner": "ray"})
    print(md.read_text())
    return 0


def cmd_batch(a: argparse.Namespace) -> int:
    from .batch import load_batch_config, run_batch
    from .ray_cluster import init_ray

    overrides = _overrides(a.set)
    if a.overlays:
        overrides["overlays"] = True
    cfg = load_batch_config(a.config, overrides)
    init_ray(address=a.address, num_cpus=a.num_cpus)
    summary = run_batch(
        a.input, a.out, a.checkpoint, cfg, retry_errors=a.retry_errors, progress=not a.no_progress
    )
    print(f"ppcr batch: {summary}", file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    return 0


def _add_device_args(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--device", default="cpu", help="torch device of the model, e.g. cuda or cuda:1 (default cpu)"
    )
    s.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="model.dtype to run in (default: the checkpoint's; see docs/precision.md)",
    )


def _dtype_override(a: argparse.Namespace) -> dict:
    return {"dtype": a.dtype} if a.dtype else {}


def _add_ray_args(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)"
    )
    s.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray cluster")


def cmd_segment(a: argparse.Namespace) -> int:
    from .geometry import decode_image
    from .visualize import save_overlay

    path = Path(a.image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = path.read_bytes()
    image = decode_image(data, str(path))
    if a.server:
        import requests

        from .masks import decode_rle
        from .serve.client import ServerError, segment_remote

        try:
            answer = segment_remote(a.server, data, a.expression)
        except (ServerError, requests.RequestException) as exc:
            raise InputError(f"--server {a.server}: {exc}") from exc
        mask, box, score = decode_rle(answer["mask"]), answer["box"], answer["score"]
    else:
        from .predictor import Segmenter

        if a.checkpoint:
            seg = Segmenter.from_checkpoint(a.checkpoint, device=a.device, **_dtype_override(a))
        else:
            seg = Segmenter.from_preset("tiny", device=a.device)
        mask, box, score = seg.segment(image, a.expression)
    print(
        json.dumps(
            {
                "box": [round(float(v), 2) for v in box],
                "score": round(score, 4),
                "mask_pixels": int(mask.sum()),
            }
        )
    )
    if a.out:
        save_overlay(a.out, image=image, mask=mask, box=box, expression=a.expression, score=score)
        print(f"overlay: {a.out}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import start

    args = {"checkpoint": a.checkpoint} if a.checkpoint else {}
    print(f"ppcr serve: http://{a.host}:{a.port}/ (Ctrl-C stops; for a Serve config: serve run FILE)")
    start(args, host=a.host, port=a.port, blocking=True, ray_address=a.address, num_cpus=a.num_cpus)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(a.out, quick=a.quick, train_minutes=a.train_minutes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppcr", description="PPCR referring image segmentation")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic RefCOCO-style data set in the REFER layout")
    s.add_argument("--out", required=True)
    s.add_argument("--images", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-objects", type=int, default=2)
    s.add_argument("--max-objects", type=int, default=4)
    s.add_argument("--no-relations", action="store_true", help="attribute expressions only (easier)")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser(
        "prepare",
        help="convert a REFER data set, a JSONL manifest or COCO + expressions into Parquet shards",
        description="--format refer (default): --refer-root, --images, --split-by. --format jsonl: "
        "--manifest (one referred object per line). --format coco: --instances, --expressions, --images. "
        "jsonl/coco write <out>/<dataset>_custom/<split>/ (read with --dataset NAME --split-by custom); "
        "formats: docs/custom_data.md.",
    )
    s.add_argument("--format", choices=("refer", "jsonl", "coco"), default="refer")
    s.add_argument("--refer-root", default=None, help="refer: folder holding <dataset>/refs(<split_by>).p")
    s.add_argument(
        "--images", default=None, help="refer: folder of COCO_train2014_*.jpg; coco: folder of file_name"
    )
    s.add_argument("--manifest", default=None, help="jsonl: the manifest (a path or URI)")
    s.add_argument("--instances", default=None, help="coco: instances.json (images, annotations)")
    s.add_argument("--expressions", default=None, help="coco: JSON lines {ann_id, expressions[, split, id]}")
    s.add_argument("--dataset", required=True)
    s.add_argument("--split-by", default=None, help="refer: the partition, e.g. unc, umd")
    s.add_argument("--out", required=True)
    s.add_argument("--splits", nargs="*", default=None)
    s.add_argument("--rows-per-file", type=int, default=256)
    s.add_argument("--skip-bad", action="store_true", help="report bad records to errors.jsonl and continue")
    s.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Data job: parallel, resumable, bad records always reported to errors.jsonl",
    )
    s.add_argument("--concurrency", type=int, default=2, help="--ray: writer actors")
    _add_ray_args(s)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser(
        "train",
        help="train on shards: Ray Train + DeepSpeed ZeRO-2 workers fed by Ray Data (--local: one process)",
    )
    s.add_argument("--config", default="tiny", help="YAML path or preset name")
    s.add_argument("--preset", default=None, help="preset name (same as --config NAME)")
    s.add_argument(
        "--num-workers", type=int, default=None, help="Ray Train workers (distributed.num_workers)"
    )
    s.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (precision: model.dtype)")
    s.add_argument("--name", default=None, help="run name under the storage path (distributed.name)")
    s.add_argument("--storage", default=None, help="run storage: folder or URI (distributed.storage_path)")
    s.add_argument(
        "--resume", action="store_true", help="continue the run of this name from its latest checkpoint"
    )
    s.add_argument(
        "--out", default=None, help="where to export the inference checkpoint (default <run>/export)"
    )
    s.add_argument("--local", action="store_true", help="single-process loop, no Ray (ppcr.train.train)")
    s.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="--local only: stop after this many seconds (still saves)",
    )
    _add_ray_args(s)
    _add_overrides(s)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "export", help="copy the inference checkpoint out of a training run's latest checkpoint"
    )
    s.add_argument(
        "--run", required=True, help="run folder or URI (<storage>/<name>) or one step_* checkpoint"
    )
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("evaluate", help="evaluate a checkpoint on shard splits (oIoU, mIoU, Prec@k, BoxAcc)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--shards", required=True)
    s.add_argument("--dataset", default="refcoco")
    s.add_argument("--split-by", default="unc")
    s.add_argument("--splits", nargs="+", default=["val", "testA", "testB"])
    s.add_argument("--oracle-box", action="store_true", help="give SAM the ground-truth box (Table 3 oracle)")
    s.add_argument(
        "--spatial-prompt",
        default=None,
        choices=get_args(SpatialPrompt),
        help="ablation: the spatial template (default: the checkpoint's; model.spatial_prompt)",
    )
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--out", default="eval_out")
    s.add_argument(
        "--predictions",
        default=None,
        metavar="FILE",
        help="write every expression's result (sent_id, IoU, box IoU, box XYXY, RLE mask) as JSON lines, "
        "sorted by split and sent_id: two runs can be diffed, and the report re-computed from it",
    )
    s.add_argument(
        "--protocol",
        choices=("all", "glamm"),  # ppcr.metrics.PROTOCOLS (not imported here: --help stays light)
        default="all",
        help="all: every expression (default); glamm: 3 random expressions per image, as GLaMM, but seeded",
    )
    s.add_argument(
        "--protocol-seed", type=int, default=None, help="--protocol glamm: the seed of the draw (default 0)"
    )
    s.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (ppcr.batch)")
    s.add_argument(
        "--config",
        "--batch-config",
        dest="config",
        default=None,
        help="with --ray: BatchConfig YAML (actor pools, batch sizes), e.g. configs/batch/cpu.yaml",
    )
    _add_device_args(s)
    _add_ray_args(s)
    _add_overrides(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("batch", help="offline batch segmentation of a manifest or shards (Ray Data)")
    s.add_argument(
        "--input", required=True, help="manifest (.parquet/.jsonl/.csv: image, expression[, id]) or shards"
    )
    s.add_argument(
        "--out",
        "--output",
        dest="out",
        required=True,
        help="folder for results/, errors/ (re-runs resume here)",
    )
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--config", default=None, help="BatchConfig YAML (actor pools, batch sizes)")
    s.add_argument("--overlays", action="store_true", help="also write overlays/<id>.png")
    s.add_argument("--retry-errors", action="store_true", help="retry the ids recorded in errors/")
    s.add_argument("--no-progress", action="store_true")
    _add_ray_args(s)
    _add_overrides(s)
    s.set_defaults(fn=cmd_batch)

    s = sub.add_parser("segment", help="segment one image, in-process or on a server (--server)")
    s.add_argument("image")
    s.add_argument("expression")
    where = s.add_mutually_exclusive_group()
    where.add_argument(
        "--checkpoint", default=None, help="inference checkpoint (default: untrained tiny preset)"
    )
    where.add_argument(
        "--server", default=None, help="URL of a running `ppcr serve`, e.g. http://127.0.0.1:8000"
    )
    s.add_argument("--out", default=None, help="write an overlay PNG")
    _add_device_args(s)
    s.set_defaults(fn=cmd_segment)

    s = sub.add_parser("serve", help="serve the HTTP API and web page with Ray Serve (see serve_configs/)")
    s.add_argument(
        "--checkpoint",
        default=None,
        help="inference checkpoint (default: $PPCR_CHECKPOINT, else random tiny)",
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    s.add_argument("--port", type=int, default=8000)
    _add_ray_args(s)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser(
        "convert-glamm",
        help="convert GLaMM weights (RefSeg [+ GranD]) onto a llava-hf base into a ppcr checkpoint",
    )
    s.add_argument("--glamm", required=True, help="GLaMM RefSeg folder (MBZUAI/GLaMM-RefSeg): LoRA branch A")
    s.add_argument(
        "--grand", default=None, help="GLaMM GranD folder (MBZUAI/GLaMM-GranD-Pretrained): branch B"
    )
    s.add_argument("--llava", required=True, help="llava-hf folder (llava-hf/llava-1.5-7b-hf): the base")
    s.add_argument("--out", required=True, help="the ppcr checkpoint folder to write")
    s.add_argument("--config", default="llava-1.5-7b", help="YAML path or preset the model is built from")
    s.add_argument(
        "--fidelity",
        choices=("ppcr", "glamm"),
        default="ppcr",
        help="glamm: the checkpoint reads [SEG] as GLaMM does (state predicting it, GLaMM prompt, crop)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the fresh box head")
    _add_overrides(s)
    s.set_defaults(fn=cmd_convert_glamm)

    s = sub.add_parser("demo", help="synthesise data, train the tiny preset, evaluate, draw overlays")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    s.add_argument("--train-minutes", type=float, default=None)
    s.set_defaults(fn=cmd_demo)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad config, input, files, weights, cluster size): one line, exit code 2."""
    from .data.refer import ReferDataError
    from .geometry import ImageDecodeError
    from .weights import WeightsError

    return (
        ConfigError,
        InputError,
        FileNotFoundError,
        ResourceError,
        WeightsError,
        ImageDecodeError,
        ReferDataError,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    EXPECTED_ERRORS = _expected_errors()
    try:
        return args.fn(args)
    except EXPECTED_ERRORS as exc:  # anything else is a bug: its traceback is shown
        print(f"ppcr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
