"""`ppcr` command line: synth, prepare, train, export, evaluate, batch, segment, serve, demo, convert-glamm."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import get_args

from .config import ConfigError, InputError, SpatialPrompt
from .ray_cluster import ResourceError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (unless it is off or says it already); examples keep
    their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def _examples(*lines: str) -> str:
    """An `examples:` epilog; tests/test_cli.py parses every line (and runs the cheap ones)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_overrides(p: argparse.ArgumentParser, example: str, what: str) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a key of the {what}, e.g. --set {example} (a YAML value; repeat for several)",
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

    fields = dict(num_images=a.num_images, seed=a.seed, min_objects=a.min_objects, max_objects=a.max_objects)
    if a.grefcoco:
        fields.update(generalized=True, dataset="synthgref")
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


def check_splits(root: str | Path, dataset: str, split_by: str, splits: list[str]) -> None:
    """InputError naming what `root` holds when a split asked for has no shard files there: the data
    sets (with their --split-by) and their splits. Called before any model is loaded."""
    from .data.shards import shard_dir

    missing = [s for s in splits if not any(shard_dir(root, dataset, split_by, s).glob("*.parquet"))]
    if not missing:
        return
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--shards {root}: no such folder")
    present = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and "_" in p.name):
        found = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.parquet")))
        if found:
            name, by = folder.name.rsplit("_", 1)
            present.append(f"--dataset {name} --split-by {by}: {', '.join(found)}")
    where = f"{root}/{dataset}_{split_by}/"
    raise InputError(
        f"--shards {root} has no split {', '.join(missing)} of --dataset {dataset} --split-by {split_by} "
        f"(no shards in {where}{missing[0]}); "
        + (f"it holds {'; '.join(present)}" if present else "it holds no shards (ppcr prepare writes them)")
    )


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .data.shards import shard_dir
    from .evaluate import evaluate_split, split_is_generalized
    from .report import write_report

    check_splits(a.shards, a.dataset, a.split_by, a.splits)
    generalized = {
        s: split_is_generalized(shard_dir(a.shards, a.dataset, a.split_by, s), a.dataset) for s in a.splits
    }
    names = [s for s, g in generalized.items() if g]
    if names and a.oracle_box:
        raise InputError(
            f"--oracle-box gives SAM the ground-truth box, which an expression without a target does not "
            f"have; {a.dataset} {', '.join(names)} hold(s) such expressions: evaluate without --oracle-box"
        )
    overrides = {"spatial_prompt": a.spatial_prompt} if a.spatial_prompt else {}
    if not a.ray and (a.config or a.set):
        raise InputError("--config / --set size the --ray pipeline (BatchConfig); add --ray or drop them")
    row, meta, records = _evaluation_setup(a)
    if a.ray:
        if a.device != "cpu":
            raise InputError(
                "--device is for in-process evaluation; with --ray, --batch-config places the stages"
            )
        return _evaluate_ray(a, {**overrides, **_dtype_override(a)} or None, row, meta, records, names)
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
            generalized=generalized[split],
        )
    _write_predictions(a, records)
    js, md = write_report(a.out, results, meta=meta)
    print(md.read_text())
    return 0


def _evaluate_ray(
    a: argparse.Namespace,
    overrides: dict | None,
    row: str,
    meta: dict,
    records: list[dict] | None,
    generalized: list[str],
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
        generalized=generalized,
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
    import os
    from importlib import resources

    # Ray Data's console log, progress included, was ~60 lines for 10 rows: warnings only (its full log
    # stays in the session's ray-data.log). On a terminal one progress bar for the whole pipeline; one
    # line of ours says what runs, the summary what was done.
    quiet = resources.files("ppcr").joinpath("batch/ray_data_logging.yaml")
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(quiet))
    from .batch import load_batch_config, run_batch
    from .ray_cluster import init_ray
    from .storage import is_uri

    for flag, path in (("--input", a.input), ("--checkpoint", a.checkpoint)):
        if not is_uri(path) and not Path(path).exists():  # before Ray starts, not pyarrow's error later
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    overrides = _overrides(a.set)
    if a.overlays:
        overrides["overlays"] = True
    cfg = load_batch_config(a.config, overrides)
    init_ray(address=a.address, num_cpus=a.num_cpus)
    if not a.no_progress:
        print(
            f"ppcr batch: segmenting {a.input} with {a.checkpoint} into {a.out} ...",
            file=sys.stderr,
            flush=True,
        )
    summary = run_batch(
        a.input, a.out, a.checkpoint, cfg, retry_errors=a.retry_errors, progress=not a.no_progress
    )
    print(f"ppcr batch: {summary}", file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    return 0


def _add_device_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda or cuda:1")
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
    s.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of a local Ray cluster (default: the cores, at least 4)",
    )


def cmd_segment(a: argparse.Namespace) -> int:
    from .geometry import decode_image
    from .visualize import save_overlay

    if not (a.checkpoint or a.server or a.random_weights):
        raise InputError(
            "give --checkpoint DIR (a trained model) or --server URL; --random-weights runs the "
            "untrained tiny preset, for checking the plumbing only"
        )
    path = Path(a.image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = path.read_bytes()
    image = decode_image(data, str(path))
    if a.server and (a.device != "cpu" or a.dtype):
        raise InputError(
            "--device/--dtype place the in-process model; with --server the server's replicas decide "
            "(its Serve config's args.device and the checkpoint's model.dtype)"
        )
    if a.server:
        from .masks import decode_rle
        from .serve.client import ServerError, ServerUnreachable, segment_remote

        try:
            answer = segment_remote(a.server, data, a.expression)
        except ServerError as exc:
            raise InputError(f"--server {a.server}: {exc}") from None
        except ServerUnreachable as exc:
            raise InputError(str(exc)) from None
        mask, box, score = decode_rle(answer["mask"]), answer["box"], answer["score"]
        instances = [(decode_rle(i["mask"]), i["box"], i["score"]) for i in answer["instances"]]
    else:
        from .predictor import Segmenter

        if a.checkpoint:
            seg = Segmenter.from_checkpoint(a.checkpoint, device=a.device, **_dtype_override(a))
        else:
            print("ppcr segment: RANDOM WEIGHTS (--random-weights): the mask is meaningless", file=sys.stderr)
            seg = Segmenter.from_preset("tiny", device=a.device)
        mask, box, score, instances = seg.segment(image, a.expression)

    def described(box, score, mask) -> dict:
        return {
            "box": None if box is None else [round(float(v), 2) for v in box],
            "score": None if score is None else round(score, 4),
            "mask_pixels": int(mask.sum()),
        }

    print(
        json.dumps(
            described(box, score, mask)
            | {
                "no_target": not instances,
                "instances": [described(b, s, m) for m, b, s in instances],
            }
        )
    )
    if a.out:
        save_overlay(
            a.out,
            image=image,
            mask=mask,
            box=box,
            expression=a.expression,
            score=score,
            instance_boxes=[b for _, b, _ in instances] if len(instances) > 1 else (),
            instance_masks=[m for m, _, _ in instances] if len(instances) > 1 else (),
            no_target=not instances,
        )
        print(f"overlay: {a.out}")
    return 0


class _Terminated(BaseException):
    """SIGTERM (`kill`, a service manager) on `ppcr serve`: stopped as Ctrl-C stops it. A
    BaseException, as KeyboardInterrupt: library code that catches Exception does not swallow it."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def cmd_serve(a: argparse.Namespace) -> int:
    import signal

    from .serve import ServeStartError, read_serve_config, start
    from .serve.app import quiet_shutdown

    run = {"args": {}, "host": a.host, "port": a.port}
    if a.config:  # the file's host and port unless given here
        run = read_serve_config(a.config)
        run.update({k: v for k, v in (("host", a.host), ("port", a.port)) if v is not None})
    run["host"] = run["host"] or "127.0.0.1"
    run["port"] = run["port"] or 8000
    if a.checkpoint:
        run["args"]["checkpoint"] = a.checkpoint
    print(f"ppcr serve: starting on http://{run['host']}:{run['port']}/ ...", flush=True)
    # Without this, SIGTERM ends the process in Ray's fatal-signal handler, which prints a C++ stack.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        url = start(**run, ray_address=a.address, num_cpus=a.num_cpus)  # keeps it over Ray's own
        print(f"ppcr serve: ready at {url}/ (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except ServeStartError as exc:
        quiet_shutdown(stop_ray=True)
        print(f"ppcr serve: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as exc:
        quiet_shutdown(stop_ray=True)  # Serve's and Ray's shutdown chatter: the user asked for it
        how = "SIGTERM" if isinstance(exc, _Terminated) else "Ctrl-C"
        print(f"ppcr serve: stopped ({how})", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo, run_grefcoco_demo

    run, out = (run_grefcoco_demo, "demo_gref") if a.grefcoco else (run_demo, "demo_out")
    run(a.out or out, quick=a.quick, train_minutes=a.train_minutes, steps=a.steps, images=a.images)
    return 0


def _command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    # `ppcr NAME --help` opens with the same one line `ppcr --help` lists NAME with; a longer
    # description follows it, wrapped (the raw formatter keeps the examples' lines, so it wraps nothing).
    more = kwargs.get("description")
    kwargs["description"] = "\n\n".join(textwrap.fill(text, 79) for text in (kwargs["help"], more) if text)
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


def _renamed(old: str, new: str):
    def refuse(value: str):
        raise argparse.ArgumentTypeError(f"{old} was renamed {new} (a count of images to draw)")

    return refuse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ppcr", description="PPCR referring image segmentation", formatter_class=_HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _command(
        sub,
        "synth",
        help="write a synthetic RefCOCO-style data set in the REFER layout",
        epilog=_examples(
            "ppcr synth --out data/synth --num-images 200",
            "ppcr prepare --refer-root data/synth --images data/synth/images/train2014 --dataset synthref "
            "--split-by unc --out data/shards",
            "ppcr synth --grefcoco --out data/gsynth --num-images 200",
            "ppcr prepare --refer-root data/gsynth --images data/gsynth/images/train2014 --dataset synthgref "
            "--split-by unc --out data/shards",
        ),
    )
    s.add_argument("--out", required=True, help="folder to write (the REFER layout and images/)")
    s.add_argument("--num-images", type=int, default=200, help="how many images to draw")
    s.add_argument(
        "--images", type=_renamed("--images", "--num-images"), default=None, help=argparse.SUPPRESS
    )
    s.add_argument("--seed", type=int, default=0, help="random seed of the scenes and expressions")
    s.add_argument("--min-objects", type=int, default=2, help="fewest objects per image")
    s.add_argument("--max-objects", type=int, default=4, help="most objects per image")
    s.add_argument("--no-relations", action="store_true", help="attribute expressions only (easier)")
    s.add_argument(
        "--grefcoco",
        action="store_true",
        help="write gRefCOCO's layout as data set synthgref (grefs(unc).json): also expressions naming "
        "no object and several objects",
    )
    s.set_defaults(fn=cmd_synth)

    s = _command(
        sub,
        "prepare",
        help="convert a REFER data set, a JSONL manifest or COCO + expressions into Parquet shards",
        description="--format refer (default): --refer-root, --images, --split-by. --format jsonl: "
        "--manifest (one referred object per line). --format coco: --instances, --expressions, --images. "
        "jsonl/coco write <out>/<dataset>_custom/<split>/ (read with --dataset NAME --split-by custom); "
        "formats: docs/custom_data.md.",
        epilog=_examples(
            "ppcr prepare --refer-root data/refer --images data/coco/train2014 --dataset refcoco "
            "--split-by unc --out data/shards",
            "ppcr prepare --format jsonl --manifest data/mine.jsonl --dataset mine --out data/shards",
        ),
    )
    s.add_argument("--format", choices=("refer", "jsonl", "coco"), default="refer", help="input layout")
    s.add_argument(
        "--refer-root",
        default=None,
        help="refer: folder holding <dataset>/refs(<split_by>).p, or grefs(<split_by>).json for grefcoco",
    )
    s.add_argument(
        "--images", default=None, help="refer: folder of COCO_train2014_*.jpg; coco: folder of file_name"
    )
    s.add_argument("--manifest", default=None, help="jsonl: the manifest (a path or URI)")
    s.add_argument("--instances", default=None, help="coco: instances.json (images, annotations)")
    s.add_argument("--expressions", default=None, help="coco: JSON lines {ann_id, expressions[, split, id]}")
    s.add_argument(
        "--dataset", required=True, help="data set name, e.g. refcoco, refcoco+, refcocog, grefcoco"
    )
    s.add_argument("--split-by", default=None, help="refer: the partition, e.g. unc, umd")
    s.add_argument("--out", required=True, help="shards root: writes <out>/<dataset>_<split_by>/<split>/")
    s.add_argument("--splits", nargs="*", default=None, help="splits to convert (default: all present)")
    s.add_argument("--rows-per-file", type=int, default=256, help="rows per Parquet part file")
    s.add_argument("--skip-bad", action="store_true", help="report bad records to errors.jsonl and continue")
    s.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Data job: parallel, resumable, bad records always reported to errors.jsonl",
    )
    s.add_argument("--concurrency", type=int, default=2, help="--ray: writer actors")
    _add_ray_args(s)
    s.set_defaults(fn=cmd_prepare)

    s = _command(
        sub,
        "train",
        help="train on shards: Ray Train + DeepSpeed ZeRO-2 workers fed by Ray Data (--local: one process)",
        epilog=_examples(
            "ppcr train --local --config tiny --out runs/tiny --set data.shards_root=data/shards "
            "--set data.dataset=synthref --set train.steps=100",
            "ppcr train --config configs/train/ppcr_llava7b.yaml --num-workers 8 --use-gpu --name ppcr-7b",
        ),
    )
    s.add_argument(
        "--config", default="tiny", help="YAML path or preset name (tiny, tiny-grefcoco, llava-1.5-7b)"
    )
    s.add_argument("--preset", default=None, help="preset name (same as --config NAME)")
    s.add_argument(
        "--num-workers", type=int, default=None, help="Ray Train workers (default: distributed.num_workers)"
    )
    s.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (precision: model.dtype)")
    s.add_argument("--name", default=None, help="run name under the storage path (default: distributed.name)")
    s.add_argument(
        "--storage", default=None, help="run storage, a folder or URI (default: distributed.storage_path)"
    )
    s.add_argument(
        "--resume", action="store_true", help="continue the run of this name from its latest checkpoint"
    )
    s.add_argument(
        "--out", default=None, help="where to write the inference checkpoint (default: <run>/export)"
    )
    s.add_argument("--local", action="store_true", help="single-process loop, no Ray (ppcr.train.train)")
    s.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="--local only: stop after this many seconds, still saving (default: no limit)",
    )
    _add_ray_args(s)
    _add_overrides(s, "train.steps=100", "run config (configs/train/*.yaml)")
    s.set_defaults(fn=cmd_train)

    s = _command(
        sub,
        "export",
        help="copy the inference checkpoint out of a training run's latest checkpoint",
        epilog=_examples("ppcr export --run runs/ppcr-7b --out checkpoints/ppcr-7b"),
    )
    s.add_argument(
        "--run", required=True, help="run folder or URI (<storage>/<name>) or one step_* checkpoint"
    )
    s.add_argument("--out", required=True, help="the inference checkpoint folder to write")
    s.set_defaults(fn=cmd_export)

    s = _command(
        sub,
        "evaluate",
        help="evaluate a checkpoint on shard splits (oIoU, mIoU, Prec@k, BoxAcc; generalized splits "
        "such as gRefCOCO: gIoU, cIoU, N-acc, T-acc)",
        epilog=_examples(
            "ppcr evaluate --checkpoint demo_out/checkpoint --shards demo_out/shards --dataset synthref "
            "--splits val testA testB",
            "ppcr evaluate --checkpoint ckpt --shards data/shards --ray --config configs/batch/cpu.yaml "
            "--set sam.batch_size=4",
        ),
    )
    s.add_argument("--checkpoint", required=True, help="inference checkpoint folder")
    s.add_argument("--shards", required=True, help="shards root (`ppcr prepare --out`)")
    s.add_argument("--dataset", default="refcoco", help="data set under --shards (the demo's is synthref)")
    s.add_argument("--split-by", default="unc", help="partition under --shards (custom data: custom)")
    s.add_argument("--splits", nargs="+", default=["val", "testA", "testB"], help="splits to evaluate")
    s.add_argument("--oracle-box", action="store_true", help="give SAM the ground-truth box (Table 3 oracle)")
    s.add_argument(
        "--spatial-prompt",
        default=None,
        choices=get_args(SpatialPrompt),
        help="ablation: the spatial template (default: the checkpoint's; model.spatial_prompt)",
    )
    s.add_argument("--batch-size", type=int, default=16, help="expressions per forward")
    s.add_argument("--out", default="eval_out", help="folder for report.json / report.md")
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
        help="with --ray: BatchConfig YAML (actor pools, batch sizes), e.g. configs/batch/cpu.yaml "
        "(default: BatchConfig's defaults)",
    )
    _add_device_args(s)
    _add_ray_args(s)
    _add_overrides(s, "sam.batch_size=4", "--ray pipeline's BatchConfig (configs/batch/*.yaml)")
    s.set_defaults(fn=cmd_evaluate)

    s = _command(
        sub,
        "batch",
        help="offline batch segmentation of a manifest or shards (Ray Data)",
        epilog=_examples(
            "ppcr batch --input rows.jsonl --out batch_out --checkpoint demo_out/checkpoint",
            "ppcr batch --input rows.jsonl --out batch_out --checkpoint ckpt --config configs/batch/cpu.yaml "
            "--set mllm.batch_size=4 --overlays",
        ),
    )
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
    s.add_argument("--checkpoint", required=True, help="inference checkpoint folder")
    s.add_argument(
        "--config", default=None, help="BatchConfig YAML (actor pools, batch sizes; default: its defaults)"
    )
    s.add_argument("--overlays", action="store_true", help="also write overlays/<id>.png")
    s.add_argument("--retry-errors", action="store_true", help="retry the ids recorded in errors/")
    s.add_argument(
        "--no-progress",
        action="store_true",
        help="no start line or progress bar on stderr (the summary stays)",
    )
    _add_ray_args(s)
    _add_overrides(s, "mllm.batch_size=4", "BatchConfig (configs/batch/*.yaml)")
    s.set_defaults(fn=cmd_batch)

    s = _command(
        sub,
        "segment",
        help="segment one image, in-process or on a server (--server)",
        epilog=_examples(
            'ppcr segment photo.jpg "the dog on the left" --checkpoint demo_out/checkpoint --out overlay.png',
            'ppcr segment photo.jpg "the dog on the left" --server http://127.0.0.1:8000',
        ),
    )
    s.add_argument("image", help="image file (PNG, JPEG, ...)")
    s.add_argument("expression", help="the referring expression, e.g. 'the red circle on the left'")
    where = s.add_mutually_exclusive_group()
    where.add_argument(
        "--checkpoint", default=None, help="inference checkpoint folder (config.yaml, model.safetensors)"
    )
    where.add_argument(
        "--server", default=None, help="URL of a running `ppcr serve`, e.g. http://127.0.0.1:8000"
    )
    where.add_argument(
        "--random-weights",
        action="store_true",
        help="run the untrained tiny preset (meaningless masks: for checking the plumbing only)",
    )
    s.add_argument("--out", default=None, help="write an overlay PNG here")
    _add_device_args(s)
    s.set_defaults(fn=cmd_segment)

    s = _command(
        sub,
        "serve",
        help="serve the HTTP API and web page with Ray Serve (see serve_configs/)",
        epilog=_examples(
            "ppcr serve --checkpoint demo_out/checkpoint --port 8000",
            "ppcr serve --config serve_configs/tiny_cpu.yaml --checkpoint demo_out/checkpoint",
        ),
    )
    s.add_argument(
        "--checkpoint",
        default=None,
        help="inference checkpoint (default: $PPCR_CHECKPOINT, else random tiny weights, announced)",
    )
    s.add_argument(
        "--config",
        default=None,
        help="a Serve config (serve_configs/*.yaml): its args, deployment options, host and port; "
        "unlike `serve run FILE`, a checkpoint that cannot load ends the command at once",
    )
    s.add_argument(
        "--host",
        default=None,
        help="bind address; 0.0.0.0 exposes it to the network (default: 127.0.0.1, or the --config's)",
    )
    s.add_argument("--port", type=int, default=None, help="HTTP port (default: 8000, or the --config's)")
    _add_ray_args(s)
    s.set_defaults(fn=cmd_serve)

    s = _command(
        sub,
        "convert-glamm",
        help="convert GLaMM weights (RefSeg [+ GranD]) onto a llava-hf base into a ppcr checkpoint",
        epilog=_examples(
            "ppcr convert-glamm --glamm models/GLaMM-RefSeg --llava models/llava-1.5-7b-hf --out ckpt/glamm "
            "--set model.sam.checkpoint=models/sam_vit_h_4b8939.pth"
        ),
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
    _add_overrides(s, "model.sam.checkpoint=models/sam_vit_h_4b8939.pth", "run config (--config)")
    s.set_defaults(fn=cmd_convert_glamm)

    s = _command(
        sub,
        "demo",
        help="synthesise data, train the tiny preset, evaluate, draw overlays",
        epilog=_examples(
            "ppcr demo --out demo_out",
            "ppcr demo --quick --out demo_quick",
            "ppcr demo --grefcoco --out demo_gref",
        ),
    )
    s.add_argument("--out", default=None, help="output folder (default: demo_out, with --grefcoco demo_gref)")
    s.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    s.add_argument(
        "--grefcoco",
        action="store_true",
        help="the multi-target model (preset tiny-grefcoco) on the scenes in gRefCOCO's layout, with expressions "
        "naming no object or several: reports gIoU, cIoU, N-acc, T-acc, and mIoU on the single-target ones",
    )
    s.add_argument(
        "--train-minutes", type=float, default=None, help="time bound of training (default: the demo's, 45)"
    )
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: 1800; more stretch the default time bound in proportion)",
    )
    s.add_argument(
        "--images",
        type=int,
        default=None,
        help="synthetic scenes, split 70/10/10/10 into train/val/testA/testB (default: 900; --quick: 40)",
    )
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
    import warnings

    # transformers' deprecation notices about its own API (e.g. `is_gradient_checkpointing`, read by
    # peft on every model load) say nothing a user of the command can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    args = build_parser().parse_args(argv)
    EXPECTED_ERRORS = _expected_errors()
    try:
        return args.fn(args)
    except EXPECTED_ERRORS as exc:  # anything else is a bug: its traceback is shown
        print(f"ppcr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
