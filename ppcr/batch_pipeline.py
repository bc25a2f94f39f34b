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

    <out>/results/*.parquet   id, image, expression, box (pixel XYXY), mask (COCO RLE), score
    <out>/errors/*.parquet    id, image, expression, error
    <out>/overlays/<id>.png   with BatchConfig.overlays

Re-running into the same folder skips every id already in `results/` (and in `errors/`, unless
`retry_errors`). A part file that cannot be read (a crash mid-write) is deleted and its rows redone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from .config import ConfigError, from_dict, read_yaml
from .ray_cluster import init_ray, require_resources
from .storage import filesystem_for, is_uri

RESULTS_DIR = "results"
ERRORS_DIR = "errors"
OVERLAYS_DIR = "overlays"

# ----------------------------------------------------------------------------- config


@dataclass
class StageConfig:
    """One actor pool: `concurrency` actors of `num_cpus` / `num_gpus` each, `batch_size` images per call."""

    concurrency: int = 1
    batch_size: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ConfigError("concurrency and batch_size must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("num_cpus and num_gpus must be >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


@dataclass
class BatchConfig:
    """Sizing of the batch / evaluation pipeline (YAML: `ppcr batch --config FILE`, or `--set key=value`)."""

    mllm: StageConfig = field(default_factory=StageConfig)
    sam: StageConfig = field(default_factory=StageConfig)
    decode_num_cpus: float = 1.0  # per decode + preprocess task
    images_per_block: int = 16  # images per input block: the unit of the read and decode tasks
    max_expressions: int = 64  # expressions per MLLM forward (an image's expressions may be split)
    torch_threads: int = 1  # intra-op threads per model actor (1 per core is fastest on CPU)
    overlays: bool = False  # also write <out>/overlays/<id>.png

    def __post_init__(self) -> None:
        if self.images_per_block < 1 or self.max_expressions < 1 or self.torch_threads < 1:
            raise ConfigError("images_per_block, max_expressions and torch_threads must be >= 1")

    def demand(self) -> dict[str, float]:
        """Ray resources the pipeline holds at once: both actor pools plus one decode task."""
        return {
            "CPU": self.mllm.concurrency * self.mllm.num_cpus
            + self.sam.concurrency * self.sam.num_cpus
            + self.decode_num_cpus,
            "GPU": self.mllm.concurrency * self.mllm.num_gpus + self.sam.concurrency * self.sam.num_gpus,
        }


def load_batch_config(path: str | Path | None = None, overrides: dict | None = None) -> BatchConfig:
    """BatchConfig from a YAML file (or the defaults) with nested `overrides` applied on top."""
    data = read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return from_dict(BatchConfig, data)


# ----------------------------------------------------------------------------- schemas

_LIST_STR = pa.list_(pa.string())
_RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
_BOX = pa.list_(pa.float64())

#: Image rows entering the decode stage. gt_* / split / height / width only for shard input.
IMAGE_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("image_bytes", pa.binary()),
        ("ids", _LIST_STR),
        ("expressions", _LIST_STR),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("gt_boxes", pa.list_(_BOX)),
        ("gt_masks", pa.list_(_RLE)),
    ]
)
_PASS = ["image", "ids", "expressions", "split", "gt_boxes", "gt_masks"]
#: After decode: preprocessed pixels as raw float32 bytes (shapes come from the model config).
DECODED_SCHEMA = pa.schema(
    [IMAGE_SCHEMA.field(n) for n in _PASS]
    + [
        ("texts", _LIST_STR),  # cleaned expressions, null where the expression is invalid
        ("errors", _LIST_STR),  # per expression: null, or why it cannot be segmented
        ("clip", pa.binary()),
        ("sam", pa.binary()),
        ("hw", pa.list_(pa.int32())),
        ("sam_hw", pa.list_(pa.int32())),
    ]
)
#: After the MLLM: the prompts of the expressions still without error, in order (E × D and E × 4).
REASONED_SCHEMA = pa.schema(list(DECODED_SCHEMA) + [("prompts", pa.binary()), ("boxes", pa.binary())])
#: One row per expression: what `write_parquet` writes (`output` names the folder: results / errors).
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("expression", pa.string()),
        ("box", _BOX),  # pixel XYXY of the original image
        ("mask", _RLE),  # COCO compressed RLE, size [H, W], as in the shard format
        ("score", pa.float64()),  # SAM's predicted IoU
        ("error", pa.string()),
        ("output", pa.string()),
    ]
)
_EVAL_FIELDS = [("split", pa.string()), ("gt_box", _BOX), ("gt_mask", _RLE)]
EVAL_RESULT_SCHEMA = pa.schema(list(RESULT_SCHEMA) + _EVAL_FIELDS)


# ----------------------------------------------------------------------------- input


def read_bytes(location: str) -> bytes:
    """File bytes of a local path or of any URI pyarrow's filesystems read (s3://, gs://, file://, ...)."""
    if not location:
        raise ValueError("image path is empty")
    if is_uri(location):
        filesystem, path = filesystem_for(location)
        with filesystem.open_input_stream(path) as f:
            return f.read()
    return Path(location).read_bytes()


def read_manifest(path: str | Path) -> pa.Table:
    """A manifest (.parquet, .jsonl/.json lines, .csv) as a table of string columns id, image, expression.

    `id` defaults to a hash of image and expression (stable when the manifest is reordered; identical
    pairs share it and are segmented once). Relative local image paths resolve against the manifest's
    folder. Duplicate explicit ids raise ValueError (a re-run could not tell them apart).
    """
    path = str(path)
    suffix = path.rsplit(".", 1)[-1].lower()
    from pyarrow import csv as pacsv
    from pyarrow import json as pajson

    filesystem, inner = filesystem_for(path)
    if suffix == "parquet":
        table = pq.read_table(inner, filesystem=filesystem)
    elif suffix in ("jsonl", "json", "csv"):
        with filesystem.open_input_stream(inner) as f:
            if suffix == "csv":
                opts = pacsv.ConvertOptions(
                    column_types={"id": pa.string(), "image": pa.string(), "expression": pa.string()}
                )
                table = pacsv.read_csv(f, convert_options=opts)
            else:
                table = pajson.read_json(f)
    else:
        raise ValueError(f"{path}: manifest must be .parquet, .jsonl or .csv")
    missing = [c for c in ("image", "expression") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing} (has {table.column_names})")
    image = pc.fill_null(table["image"].cast(pa.string()), "")
    expression = pc.fill_null(table["expression"].cast(pa.string()), "")
    if not is_uri(path):
        base = Path(inner).parent
        image = pa.array(
            [
                p if (not p or is_uri(p) or Path(p).is_absolute()) else str(base / p)
                for p in image.to_pylist()
            ],
            pa.string(),
        )
    if "id" in table.column_names:
        ids = table["id"].cast(pa.string())
        if ids.null_count:
            raise ValueError(f"{path}: {ids.null_count} row(s) have no id")
        if pc.count_distinct(ids).as_py() != len(ids):
            raise ValueError(f"{path}: ids are not unique")
    else:
        ids = pa.array(
            [
                hashlib.blake2b(f"{i}\0{e}".encode(), digest_size=12).hexdigest()
                for i, e in zip(image.to_pylist(), expression.to_pylist())
            ],
            pa.string(),
        )
    out = pa.table({"id": ids, "image": image, "expression": expression})
    if "id" not in table.column_names:
        out = out.group_by("id", use_threads=False).aggregate([("image", "first"), ("expression", "first")])
        out = out.rename_columns(["id", "image", "expression"])
    return out


def group_by_image(manifest: pa.Table) -> pa.Table:
    """Manifest rows -> IMAGE_SCHEMA rows, one per distinct image, in order of first appearance."""
    t = manifest.append_column("_order", pa.array(np.arange(len(manifest))))
    g = t.group_by("image", use_threads=False).aggregate(
        [("id", "list"), ("expression", "list"), ("_order", "min")]
    )
    g = g.sort_by("_order_min")
    n = len(g)
    return pa.table(
        {
            "image": g["image"],
            "image_bytes": pa.nulls(n, pa.binary()),
            "ids": g["id_list"],
            "expressions": g["expression_list"],
            "split": pa.nulls(n, pa.string()),
            "height": pa.nulls(n, pa.int32()),
            "width": pa.nulls(n, pa.int32()),
            "gt_boxes": pa.nulls(n, pa.list_(_BOX)),
            "gt_masks": pa.nulls(n, pa.list_(_RLE)),
        },
        schema=IMAGE_SCHEMA,
    )


def shard_split_dirs(path: str | Path) -> list[Path]:
    """Shard split folders under `path`: `path` itself if it holds part files, else its sub-folders that do."""
    p = Path(path)
    if any(p.glob("part-*.parquet")):
        return [p]
    return sorted(d for d in p.iterdir() if d.is_dir() and any(d.glob("part-*.parquet")))


def _shard_rows_to_images(table: pa.Table, split: str, with_gt: bool, done: pa.Array | None) -> pa.Table:
    """Shard rows (SHARD_SCHEMA) -> IMAGE_SCHEMA rows; ids are sentence ids; done ids are dropped."""
    done_set = set(done.to_pylist()) if done is not None else set()
    rows = []
    for r in table.to_pylist():
        ids, exprs, boxes, masks = [], [], [], []
        for ref in r["refs"]:
            for s in ref["sentences"]:
                sid = str(s["sent_id"])
                if sid in done_set:
                    continue
                ids.append(sid)
                exprs.append(s["text"])
                boxes.append(list(ref["bbox"]))
                masks.append({"size": list(ref["mask"]["size"]), "counts": ref["mask"]["counts"]})
        if ids:
            rows.append(
                {
                    "image": r["file_name"],
                    "image_bytes": r["image"],
                    "ids": ids,
                    "expressions": exprs,
                    "split": split,
                    "height": r["height"],
                    "width": r["width"],
                    "gt_boxes": boxes if with_gt else None,
                    "gt_masks": masks if with_gt else None,
                }
            )
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


def _shard_dataset(split_dirs: Sequence[Path], with_gt: bool, done: pa.Array | None) -> ray.data.Dataset:
    parts = []
    for d in split_dirs:
        files = [str(f) for f in sorted(d.glob("part-*.parquet"))]
        ds = ray.data.read_parquet(files).select_columns(["file_name", "height", "width", "image", "refs"])
        parts.append(
            ds.map_batches(
                _shard_rows_to_images,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"split": d.name, "with_gt": with_gt, "done": done},
            )
        )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------- stages


def _f32(buf: bytes, shape: tuple[int, ...]):
    import torch

    # Object-store buffers are read-only; torch needs its own copy.
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(shape).copy())


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def decode_stage(table: pa.Table, clip_size: int, sam_size: int) -> pa.Table:
    """CPU task: read + decode each image once, preprocess for CLIP and SAM, validate expressions."""
    from .geometry import decode_image, preprocess_image
    from .prompts import clean_expression

    out = []
    for r in table.to_pylist():
        texts, errors = [], []
        for e in r["expressions"]:
            try:
                texts.append(clean_expression(e))
                errors.append(None)
            except (TypeError, ValueError) as exc:
                texts.append(None)
                errors.append(f"bad expression: {exc}")
        clip = sam = b""
        hw = sam_hw = [0, 0]
        image_error = None
        if any(err is None for err in errors):
            try:
                data = r["image_bytes"] if r["image_bytes"] is not None else read_bytes(r["image"])
                expected = None if r["height"] is None else (r["height"], r["width"])
                img = decode_image(data, r["image"], expected_hw=expected)
                hw = list(img.shape[:2])
                clip_t, sam_t, in_hw = preprocess_image(img, clip_size, sam_size)
                sam_hw = list(in_hw)
                clip = clip_t.numpy().astype(np.float32).tobytes()
                sam = sam_t.numpy().astype(np.float32).tobytes()
            except Exception as exc:  # missing file, corrupt bytes, size mismatch, ...
                image_error = f"bad image: {_error_text(exc)}"
        if image_error is not None:
            errors = [err or image_error for err in errors]
            texts = [None] * len(texts)
        out.append(
            {**{k: r[k] for k in _PASS}, "texts": texts, "errors": errors, "clip": clip, "sam": sam}
            | {"hw": hw, "sam_hw": sam_hw}
        )
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def _load_model(checkpoint: str, overrides: dict | None, device: str, threads: int, part: str):
    """The one part ("mllm" or "sam") an actor runs: the other is never built (docs/architecture.md)."""
    import torch

    from .checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    return load_checkpoint(checkpoint, overrides=overrides, device=device, parts=(part,))


class MLLMStage:
    """Actor: stages 1 + 2 (`PPCRModel.reason`) for every valid expression of a batch of image rows."""

    def __init__(self, checkpoint: str, overrides: dict | None, device: str, threads: int, max_expr: int):
        self.model = _load_model(checkpoint, overrides, device, threads, "mllm")
        self.max_expr = max_expr

    def _reason(self, rows: list[dict], pairs: list[tuple[int, int]]):
        """pairs: (row, expression) -> (prompts (P, D), boxes (P, 4) or None) as numpy."""
        import torch

        from .inference import group_images

        m = self.model
        c = m.clip_size
        first, index = group_images([i for i, _ in pairs])
        images = [pairs[k][0] for k in first]
        clip = torch.stack([_f32(rows[i]["clip"], (3, c, c)) for i in images]).to(m.device)
        hw = torch.tensor([rows[i]["hw"] for i in images], dtype=torch.long, device=m.device)
        index = index.to(m.device)
        texts = [rows[i]["texts"][j] for i, j in pairs]
        with torch.no_grad():
            r = m.reason(clip, index, texts, hw)
        box = None if r.box is None else r.box.float().cpu().numpy()
        return r.semantic_prompt.float().cpu().numpy(), box

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        pairs = [(i, j) for i, r in enumerate(rows) for j, err in enumerate(r["errors"]) if err is None]
        prompts: dict[tuple[int, int], np.ndarray] = {}
        boxes: dict[tuple[int, int], np.ndarray | None] = {}
        for start in range(0, len(pairs), self.max_expr):
            chunk = pairs[start : start + self.max_expr]
            try:
                p, b = self._reason(rows, chunk)
                results = [(pair, p[k], None if b is None else b[k]) for k, pair in enumerate(chunk)]
            except Exception:
                results = []
                for pair in chunk:  # isolate the failing expression(s); the others still run
                    try:
                        p, b = self._reason(rows, [pair])
                        results.append((pair, p[0], None if b is None else b[0]))
                    except Exception as exc:
                        rows[pair[0]]["errors"][pair[1]] = f"MLLM stage failed: {_error_text(exc)}"
            for pair, p, b in results:
                prompts[pair], boxes[pair] = p, b
        for i, r in enumerate(rows):
            ok = [(i, j) for j, err in enumerate(r["errors"]) if err is None]
            r["prompts"] = np.stack([prompts[k] for k in ok]).astype(np.float32).tobytes() if ok else b""
            has_box = ok and boxes[ok[0]] is not None
            r["boxes"] = np.stack([boxes[k] for k in ok]).astype(np.float32).tobytes() if has_box else b""
        return pa.Table.from_pylist(rows, schema=REASONED_SCHEMA)


@ray.remote(num_cpus=0)
class EncoderCounter:
    """How many images the SAM image encoder has embedded (summed over the SAM actors)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n


class SAMStage:
    """Actor: stage 3. Encodes each image of the batch once (`segmentation.encode`), then decodes every
    prompt of it (`PPCRModel.segment`); emits one RESULT row per expression, errors included."""

    def __init__(
        self,
        checkpoint: str,
        overrides: dict | None,
        device: str,
        threads: int,
        counter,
        oracle_box: bool = False,
        evaluation: bool = False,
    ):
        self.model = _load_model(checkpoint, overrides, device, threads, "sam")
        self.counter = counter
        self.oracle_box = oracle_box
        self.schema = EVAL_RESULT_SCHEMA if evaluation else RESULT_SCHEMA
        self.evaluation = evaluation

    def _segment(self, rows: list[dict]) -> list[list[tuple]]:
        """For each row, (mask bool H×W, box pixel XYXY, score) per expression without error."""
        import torch

        from .data.refer import encode_mask
        from .inference import ground_truth_boxes, segmentations

        m = self.model
        s, d = m.sam_size, m.cfg.prompt_dim
        sam = torch.stack([_f32(r["sam"], (3, s, s)) for r in rows]).to(m.device)
        hw = torch.tensor([r["hw"] for r in rows], dtype=torch.long, device=m.device)
        sam_hw = torch.tensor([r["sam_hw"] for r in rows], dtype=torch.long, device=m.device)
        index, prompts, boxes = [], [], []
        for i, r in enumerate(rows):
            ok = [j for j, err in enumerate(r["errors"]) if err is None]
            index += [i] * len(ok)
            prompts.append(_f32(r["prompts"], (len(ok), d)))
            if self.oracle_box:
                boxes.append(ground_truth_boxes([r["gt_boxes"][j] for j in ok], [r["hw"]] * len(ok)))
            elif r["boxes"]:
                boxes.append(_f32(r["boxes"], (len(ok), 4)))
        index_t = torch.tensor(index, dtype=torch.long, device=m.device)
        prompt_t = torch.cat(prompts).to(m.device)
        box_t = torch.cat(boxes).to(m.device) if boxes else None
        with torch.no_grad():
            emb = m.segmentation.encode(sam)
            if self.counter is not None:  # None when the stage is called in-process (benchmarks)
                ray.get(self.counter.add.remote(len(rows)))
            _, iou, logits = m.segment(emb, index_t, prompt_t, box_t, hw, sam_hw)
        out: list[list[tuple]] = [[] for _ in rows]
        for i, seg in zip(index, segmentations(logits, box_t, iou)):
            out[i].append((encode_mask(seg.mask), [float(v) for v in seg.box], seg.score))
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        work = [r for r in rows if any(err is None for err in r["errors"])]
        segs: dict[int, list[tuple]] = {}
        if work:
            try:
                segs = dict(zip(map(id, work), self._segment(work)))
            except Exception:
                for r in work:  # isolate the failing image; the others still run
                    try:
                        segs[id(r)] = self._segment([r])[0]
                    except Exception as exc:
                        r["errors"] = [err or f"SAM stage failed: {_error_text(exc)}" for err in r["errors"]]
        out = []
        for r in rows:
            done = iter(segs.get(id(r), []))
            for j, (rid, expr, err) in enumerate(zip(r["ids"], r["expressions"], r["errors"])):
                rec = {"id": rid, "image": r["image"], "expression": expr, "error": err}
                if err is None:
                    rec["mask"], rec["box"], rec["score"] = next(done)
                rec["output"] = ERRORS_DIR if err else RESULTS_DIR
                if self.evaluation:
                    rec["split"] = r["split"]
                    rec["gt_box"] = r["gt_boxes"][j]
                    rec["gt_mask"] = r["gt_masks"][j]
                out.append(rec)
        return pa.Table.from_pylist(out, schema=self.schema)


def _safe_name(rid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", rid)[:150] or "_"


def overlay_stage(table: pa.Table, out_dir: str) -> pa.Table:
    """CPU task: draw `<out>/overlays/<id>.png` for the result rows (each image decoded once per batch)."""
    from .data.refer import decode_rle
    from .geometry import decode_image
    from .visualize import save_overlay

    cache: dict[str, np.ndarray] = {}
    for r in table.to_pylist():
        if r["error"] is not None:
            continue
        if r["image"] not in cache:
            cache[r["image"]] = decode_image(read_bytes(r["image"]), r["image"])
        save_overlay(
            Path(out_dir) / OVERLAYS_DIR / f"{_safe_name(r['id'])}.png",
            image=cache[r["image"]],
            mask=decode_rle(r["mask"]),
            box=r["box"],
            expression=r["expression"],
            score=r["score"],
        )
    return table


def metrics_stage(table: pa.Table) -> pa.Table:
    """CPU task: RISMetrics of a batch of evaluation rows, one state per split (merged in the driver)."""
    from .data.refer import decode_rle
    from .metrics import RISMetrics

    per: dict[str, RISMetrics] = {}
    errors: dict[str, list[str]] = {}
    for r in table.to_pylist():
        if r["error"] is not None:
            errors.setdefault(r["split"], []).append(f"{r['id']}: {r['error']}")
            continue
        per.setdefault(r["split"], RISMetrics()).update(
            decode_rle(r["mask"]), decode_rle(r["gt_mask"]), r["box"], r["gt_box"]
        )
    splits = sorted(set(per) | set(errors))
    return pa.table(
        {
            "split": splits,
            "state": [json.dumps(per[s].state_dict()) if s in per else None for s in splits],
            "errors": [errors.get(s, []) for s in splits],
        },
        schema=pa.schema([("split", pa.string()), ("state", pa.string()), ("errors", _LIST_STR)]),
    )


# ----------------------------------------------------------------------------- pipeline


def _model_sizes(checkpoint: str | Path, overrides: dict | None) -> tuple[int, int]:
    """(clip_size, sam_size) from the checkpoint's config, without building the model."""
    from .checkpoint import load_model_config

    cfg = load_model_config(checkpoint, overrides)  # validates the overrides before any actor starts
    return cfg.vision.image_size, cfg.sam.image_size


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
    clip_size, sam_size = _model_sizes(checkpoint, overrides)
    decoded = images.map_batches(
        decode_stage,
        batch_format="pyarrow",
        batch_size=cfg.images_per_block,
        num_cpus=cfg.decode_num_cpus,
        # Ray Data fuses a task stage into the next actor stage when their remote args match, which
        # would run decoding inside the MLLM actors. A task-only arg (max_calls=0 is Ray's default,
        # spelled out) keeps decoding in CPU tasks and the model actors on the model.
        max_calls=0,
        fn_kwargs={"clip_size": clip_size, "sam_size": sam_size},
    )
    model = {"checkpoint": checkpoint, "overrides": overrides, "threads": cfg.torch_threads}
    reasoned = _actor_stage(decoded, MLLMStage, cfg.mllm, **model, max_expr=cfg.max_expressions)
    return _actor_stage(
        reasoned, SAMStage, cfg.sam, **model, counter=counter, oracle_box=oracle_box, evaluation=evaluation
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
    ctx.enable_operator_progress_bars = progress
    ctx.verbose_stats_logs = False


def _part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def _read_ids(folder: Path) -> tuple[pa.Array, int]:
    """Ids in the part files of `folder` and their row count; unreadable files (a crash mid-write) are deleted."""
    chunks = []
    for f in _part_files(folder):
        try:
            chunks.append(pq.read_table(f, columns=["id"])["id"].combine_chunks())
        except Exception as exc:  # truncated / corrupt part file: redo its rows
            warnings.warn(f"{f}: unreadable ({exc}); deleting it, its rows will be redone", stacklevel=2)
            f.unlink()
    ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    return ids, len(ids)


def _count_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _part_files(folder))


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
        for f in _part_files(out / ERRORS_DIR):
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
        images = _shard_dataset(splits, with_gt=False, done=skip)
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
) -> dict[str, dict]:
    """RISMetrics.compute() per split folder name, over every expression, in one Ray Data pipeline.

    Equal to `ppcr.evaluate.evaluate_split` on the same checkpoint and split. An expression that
    fails (e.g. an undecodable image) is left out, counted under `errors` and warned about.
    """
    from .metrics import RISMetrics

    cfg = cfg or BatchConfig()
    dirs = [Path(d) for d in split_dirs]
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"split folders must have distinct names, got {names}")
    _prepare_ray(cfg, "distributed evaluation", progress)
    counter = EncoderCounter.remote()
    merged: dict[str, RISMetrics] = {}
    errors: dict[str, list[str]] = {}
    try:
        images = _shard_dataset(dirs, with_gt=True, done=None)
        rows = build_pipeline(images, checkpoint, cfg, counter, overrides, oracle_box, evaluation=True)
        states = rows.map_batches(metrics_stage, batch_format="pyarrow", batch_size=256)
        for r in states.iter_rows():  # a few small rows per batch; the driver only merges sums
            if r["state"] is not None:
                m = RISMetrics.from_state_dict(json.loads(r["state"]))
                merged[r["split"]] = merged[r["split"]].merge(m) if r["split"] in merged else m
            errors.setdefault(r["split"], []).extend(r["errors"])
    finally:
        ray.kill(counter)
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
