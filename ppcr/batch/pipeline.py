"""Offline batch segmentation and distributed evaluation: one Ray Data pipeline, two sinks.

    read ──► decode + preprocess ──► MLLM stage ──► SAM stage ──► write_parquet   (run_batch)
    (CPU tasks)                      (actor pool)   (actor pool)  └► RISMetrics   (evaluate_shards)

The pipeline moves **image rows** (one image with all of its expressions) until the SAM stage, which
encodes each image once and emits one row per expression. A manifest is grouped by image in the
driver (pyarrow; paths and text only, never pixels), shards are one row per image already. So every
image is decoded, CLIP-encoded and SAM-encoded exactly once, however many expressions it has.

The model stages call `PPCRModel.reason` (stages 1 + 2) and `PPCRModel.segment` after
`segmentation.encode` (stage 3); this module only moves data between them.

Bad inputs never stop the job: a missing or undecodable image, an empty expression or a model error
on one input becomes a row of the `errors` output with its reason. Output layout:

    <out>/results/*.parquet   id, image, expression, box (pixel XYXY), mask (COCO RLE), score,
                              no_target, instances (box, mask, score each); box, mask, score: the union
    <out>/errors/*.parquet    id, image, expression, error
    <out>/overlays/<id>.png   with BatchConfig.overlays

Re-running into the same folder skips every id already in `results/` (and in `errors/`, unless
`retry_errors`). A part file that cannot be read (a crash mid-write) is deleted and its rows redone.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..config import InputError
from ..ray_cluster import init_ray, require_resources
from ..storage import parquet_files
from .config import BatchConfig, StageConfig
from .io import (
    ERRORS_DIR,
    RESULTS_DIR,
    group_by_image,
    read_manifest,
    shard_dataset,
    shard_split_dirs,
)
from .stages import EncoderCounter, MLLMActor, SAMActor, decode_stage, metrics_stage, overlay_stage

# ----------------------------------------------------------------------------- pipeline


def _model_sizes(checkpoint: str | Path, overrides: dict | None) -> tuple[int, int, str]:
    """(clip_size, sam_size, clip_mode) from the checkpoint's config, without building the model."""
    from ..checkpoint import load_model_config

    cfg = load_model_config(checkpoint, overrides)  # validates the overrides before any actor starts
    return cfg.vision.image_size, cfg.sam.image_size, cfg.clip_preprocess


def build_pipeline(
    images: ray.data.Dataset,
    checkpoint: str | Path,
    cfg: BatchConfig,
    counter,
    overrides: dict | None = None,
    oracle_box: bool = False,
    evaluation: bool = False,
) -> ray.data.Dataset:
    """Image rows (IMAGE_SCHEMA) -> expression rows (RESULT_SCHEMA, or EVAL_RESULT_SCHEMA), lazily."""
    checkpoint = str(Path(checkpoint).resolve())
    clip_size, sam_size, clip_mode = _model_sizes(checkpoint, overrides)
    decoded = images.map_batches(
        decode_stage,
        batch_format="pyarrow",
        batch_size=cfg.images_per_block,
        num_cpus=cfg.decode_num_cpus,
        # Ray Data fuses a task stage into the next actor stage when their remote args match, which
        # would run decoding inside the MLLM actors. A task-only arg (max_calls=0 is Ray's default,
        # spelled out) keeps decoding in CPU tasks and the model actors on the model.
        max_calls=0,
        fn_kwargs={"clip_size": clip_size, "sam_size": sam_size, "clip_mode": clip_mode}
        | {"checkpoint": checkpoint, "overrides": overrides},
    )
    model = {"checkpoint": checkpoint, "overrides": overrides, "threads": cfg.torch_threads}
    reasoned = _actor_stage(decoded, MLLMActor, cfg.mllm, **model, max_expr=cfg.max_expressions)
    return _actor_stage(
        reasoned, SAMActor, cfg.sam, **model, counter=counter, oracle_box=oracle_box, evaluation=evaluation
    )


def _actor_stage(ds: ray.data.Dataset, stage_cls: type, stage: StageConfig, **init) -> ray.data.Dataset:
    """`stage_cls` as an actor pool sized and placed by `stage`, constructed with `init` and its device."""
    return ds.map_batches(
        stage_cls,
        batch_format="pyarrow",
        batch_size=stage.batch_size,
        compute=ray.data.ActorPoolStrategy(size=stage.concurrency),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus,
        fn_constructor_kwargs={**init, "device": stage.device},
    )


def _prepare_ray(cfg: BatchConfig, what: str, progress: bool) -> None:
    init_ray()
    require_resources(cfg.demand(), what)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = False  # one line for the whole pipeline, not one per stage
    ctx.verbose_stats_logs = False


def _read_ids(folder: Path) -> tuple[pa.Array, int]:
    """Ids in the part files of `folder` and their row count; unreadable files (a crash mid-write) are deleted."""
    chunks = []
    for f in parquet_files(folder):
        try:
            chunks.append(pq.read_table(f, columns=["id"])["id"].combine_chunks())
        except Exception as exc:  # truncated / corrupt part file: redo its rows
            warnings.warn(f"{f}: unreadable ({exc}); deleting it, its rows will be redone", stacklevel=2)
            f.unlink()
    ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    return ids, len(ids)


def _count_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(folder))


@dataclass
class BatchSummary:
    """Outcome of one `run_batch` call (counts are expressions of this run)."""

    done: int  # written to results/
    errors: int  # written to errors/
    skipped: int  # already in the output folder before this run
    images: int | None  # distinct images this run worked on (None for shard input: not counted upfront)
    encoder_calls: int  # images embedded by SAM's image encoder (== images: one pass per image)
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return (self.done + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 2)}

    def __str__(self) -> str:
        return (
            f"done {self.done}, skipped {self.skipped}, errors {self.errors}; {self.images or '?'} images, "
            f"{self.encoder_calls} encoder passes; {self.seconds:.1f}s, {self.rows_per_s:.1f} rows/s"
        )


def run_batch(
    input: str | Path,
    output: str | Path,
    checkpoint: str | Path,
    cfg: BatchConfig | None = None,
    overrides: dict | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Segment every (image, expression) of a manifest or of shard split folders into `output`.

    `input`: a .parquet / .jsonl / .csv manifest (columns image, expression, optional id) or a shard
    folder (a split, or a `<dataset>_<split_by>` folder of splits; ids are sentence ids). Needs Ray
    (`init_ray` is called if it is not running) with room for `cfg.demand()`.
    """
    cfg = cfg or BatchConfig()
    out = Path(output)
    if retry_errors:
        for f in parquet_files(out / ERRORS_DIR):
            f.unlink()
    done_ids, n_done = _read_ids(out / RESULTS_DIR)
    err_ids, n_err = _read_ids(out / ERRORS_DIR)
    skip = pa.concat_arrays([done_ids, err_ids.cast(pa.string())])
    _prepare_ray(cfg, "batch segmentation", progress)
    t0 = time.perf_counter()
    in_path = Path(input)
    if in_path.is_dir():
        splits = shard_split_dirs(in_path)
        if not splits:
            raise FileNotFoundError(
                f"{input}: no part-*.parquet shard files (nor split folders holding them)"
            )
        images = shard_dataset(splits, with_gt=False, done=skip)
        skipped, n_images = len(skip), None
    else:
        manifest = read_manifest(input)
        todo = manifest.filter(pc.invert(pc.is_in(manifest["id"], value_set=skip)))
        skipped = len(manifest) - len(todo)
        if len(todo) == 0:
            return BatchSummary(0, 0, skipped, 0, 0, time.perf_counter() - t0)
        grouped = group_by_image(todo)
        n_images = len(grouped)
        k = cfg.images_per_block
        images = ray.data.from_arrow([grouped.slice(i, k) for i in range(0, len(grouped), k)])
    counter = EncoderCounter.remote()
    try:
        results = build_pipeline(images, checkpoint, cfg, counter, overrides)
        if cfg.overlays:
            results = results.map_batches(
                overlay_stage,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"out_dir": str(out.resolve())},
            )
        # Directory partitioning: rows land in <out>/results/ or <out>/errors/ by their `output` value.
        results.write_parquet(str(out), partition_cols=["output"], partitioning_flavor=None)
        encoded = ray.get(counter.total.remote())
    finally:
        ray.kill(counter)
    done = _count_rows(out / RESULTS_DIR) - n_done
    errors = _count_rows(out / ERRORS_DIR) - n_err
    return BatchSummary(done, errors, skipped, n_images, encoded, time.perf_counter() - t0)


def evaluate_shards(
    checkpoint: str | Path,
    split_dirs: Sequence[str | Path],
    cfg: BatchConfig | None = None,
    overrides: dict | None = None,
    oracle_box: bool = False,
    progress: bool = True,
    protocol: str = "all",
    seed: int = 0,
    on_prediction: Callable[[dict], None] | None = None,
    generalized: Sequence[str] = (),
) -> dict[str, dict]:
    """RISMetrics.compute() per split folder name, over every expression (or those `protocol` picks,
    `ppcr.metrics.protocol_indices`, drawn with `seed`), in one Ray Data pipeline; GRESMetrics.compute()
    for the split folders named in `generalized` (gRefCOCO-style splits: `oracle_box` is refused there,
    and the answer is its instances' union, as in `evaluate_split`).

    Equal to `ppcr.evaluate.evaluate_split` on the same checkpoint and split. An expression that
    fails (e.g. an undecodable image) is left out, counted under `errors` and warned about.
    `on_prediction` receives every expression's `report.prediction_record`, sorted by split (in the
    order given) and sent_id; the metrics are then computed from those records, so replaying them
    gives the metrics exactly.
    """
    from ..metrics import ExpressionScore, GRESMetrics, GRESScore, RISMetrics, protocol_indices
    from .stages import predictions_stage, protocol_stage

    cfg = cfg or BatchConfig()
    dirs = [Path(d) for d in split_dirs]
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"split folders must have distinct names, got {names}")
    generalized = [g for g in generalized if g in names]
    if generalized and oracle_box:
        raise InputError(
            f"oracle_box gives SAM the ground-truth box, which an expression without a target does not "
            f"have; evaluate the generalized split(s) {', '.join(generalized)} without it"
        )
    kind = {n: GRESMetrics if n in generalized else RISMetrics for n in names}
    stage_args = {"generalized": generalized}
    protocol_indices(protocol, "", 0, seed)  # an unknown protocol fails before Ray starts
    _prepare_ray(cfg, "distributed evaluation", progress)
    counter = EncoderCounter.remote()
    merged: dict[str, RISMetrics] = {}
    errors: dict[str, list[str]] = {}
    records: list[dict] = []
    try:
        images = shard_dataset(dirs, with_gt=True, done=None)
        if protocol != "all":
            images = images.map_batches(
                protocol_stage,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"protocol": protocol, "seed": seed},
            )
        rows = build_pipeline(images, checkpoint, cfg, counter, overrides, oracle_box, evaluation=True)
        if on_prediction is None:
            states = rows.map_batches(
                metrics_stage, batch_format="pyarrow", batch_size=256, fn_kwargs=stage_args
            )
            for r in states.iter_rows():  # a few small rows per batch; the driver only merges sums
                if r["state"] is not None:
                    m = kind[r["split"]].from_state_dict(json.loads(r["state"]))
                    merged[r["split"]] = merged[r["split"]].merge(m) if r["split"] in merged else m
                errors.setdefault(r["split"], []).extend(r["errors"])
        else:
            preds = rows.map_batches(
                predictions_stage, batch_format="pyarrow", batch_size=256, fn_kwargs=stage_args
            )
            for r in preds.iter_rows():  # one small row per expression: scores and an RLE mask
                if r["record"] is not None:
                    records.append(json.loads(r["record"]))
                else:
                    errors.setdefault(r["split"], []).append(r["error"])
    finally:
        ray.kill(counter)
    records.sort(key=lambda rec: (names.index(rec["split"]), rec["sent_id"]))
    for rec in records:
        if rec["split"] in generalized:
            answered = bool(rec["instances"])
            score = GRESScore(rec["intersection"], rec["union"], rec["no_target"], answered, rec["iou"])
        else:
            score = ExpressionScore(rec["intersection"], rec["union"], rec["iou"], rec["box_iou"])
        merged.setdefault(rec["split"], kind[rec["split"]]()).add(score)
        on_prediction(rec)
    out = {}
    for name in names:
        if name not in merged:
            raise ValueError(f"split {name}: no expression could be evaluated ({errors.get(name, [])[:3]})")
        out[name] = merged[name].compute()
        if errors.get(name):
            out[name]["errors"] = len(errors[name])
            warnings.warn(
                f"split {name}: {len(errors[name])} expression(s) failed and are not in the metrics, "
                f"e.g. {errors[name][0]}",
                stacklevel=2,
            )
    return out
