"""What the pipeline reads and passes on: output folder names, the Arrow schemas between stages,
manifest and shard readers (one row per image, all of its expressions)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..config import InputError
from ..storage import filesystem_for, is_uri

RESULTS_DIR = "results"
ERRORS_DIR = "errors"
OVERLAYS_DIR = "overlays"

# ----------------------------------------------------------------------------- schemas

LIST_STR = pa.list_(pa.string())
_RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
_BOX = pa.list_(pa.float64())

#: Image rows entering the decode stage. gt_* / split / height / width only for shard input.
IMAGE_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("image_bytes", pa.binary()),
        ("ids", LIST_STR),
        ("expressions", LIST_STR),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("gt_boxes", pa.list_(_BOX)),
        ("gt_masks", pa.list_(_RLE)),
    ]
)
PASSED_COLUMNS = ["image", "ids", "expressions", "split", "gt_boxes", "gt_masks"]
#: After decode: preprocessed pixels as raw float32 bytes (shapes come from the model config).
DECODED_SCHEMA = pa.schema(
    [IMAGE_SCHEMA.field(n) for n in PASSED_COLUMNS]
    + [
        ("texts", LIST_STR),  # cleaned expressions, null where the expression is invalid
        ("errors", LIST_STR),  # per expression: null, or why it cannot be segmented
        ("clip", pa.binary()),
        ("sam", pa.binary()),
        ("hw", pa.list_(pa.int32())),
        ("sam_hw", pa.list_(pa.int32())),
    ]
)
#: After the MLLM: the prompts of the expressions still without error, in order (E × D), and the boxes
#: stage 3 segments for them (sum(box_counts) × 4: box_counts[e] boxes for expression e, one each for
#: the single-target model, the kept slots for a multi-target one, 0 for no target; null box_counts
#: without a spatial stage).
REASONED_SCHEMA = pa.schema(
    list(DECODED_SCHEMA)
    + [("prompts", pa.binary()), ("boxes", pa.binary()), ("box_counts", pa.list_(pa.int32()))]
)
#: One object of an answer (`inference.Instance`): its box, mask and score.
_INSTANCE = pa.struct([pa.field("box", _BOX), pa.field("mask", _RLE), pa.field("score", pa.float64())])
#: One row per expression: what `write_parquet` writes (`output` names the folder: results / errors).
#: The answer is its instances (none = no target) and their union (`inference.Segmentation`).
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("expression", pa.string()),
        ("box", _BOX),  # pixel XYXY of the original image, enclosing the instances; null for no target
        ("mask", _RLE),  # the instances' union: COCO compressed RLE, size [H, W], as in the shard format
        ("score", pa.float64()),  # SAM's predicted IoU (the instances' mean); null for no target
        ("no_target", pa.bool_()),  # the answer has no instance
        ("instances", pa.list_(_INSTANCE)),  # each object: box, mask, score
        ("error", pa.string()),
        ("output", pa.string()),
    ]
)
_EVAL_FIELDS = [("split", pa.string()), ("gt_box", _BOX), ("gt_mask", _RLE)]
EVAL_RESULT_SCHEMA = pa.schema(list(RESULT_SCHEMA) + _EVAL_FIELDS)


# ----------------------------------------------------------------------------- input


_MANIFEST_COLUMNS = {"id": pa.string(), "image": pa.string(), "expression": pa.string()}
_MAX_BLOCK_BYTES = 2**31 - 1  # pyarrow's block_size is an int32


def _read_text_manifest(path: str, data: bytes, suffix: str) -> pa.Table:
    """CSV (RFC 4180: quoted values may hold commas, quotes and line breaks) or JSON lines, parsed as one
    block: pyarrow's block-wise parsing would fail on a row longer than a block (`straddling object`),
    and numbers the rows of a parse error within their block; one block has neither failure mode."""
    from pyarrow import csv as pacsv
    from pyarrow import json as pajson

    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the manifest as UTF-8"
        ) from None
    block_size = max(1, min(len(data) + 1, _MAX_BLOCK_BYTES))
    try:
        if suffix == "csv":
            return pacsv.read_csv(
                pa.BufferReader(data),
                # One block is parsed on one thread anyway; without threads, errors name their row.
                read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=_MANIFEST_COLUMNS),
            )
        return pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(block_size=block_size))
    except pa.ArrowInvalid as exc:
        if suffix == "csv":
            raise InputError(f"{path}: not a valid CSV manifest: {exc}") from None
        raise InputError(
            f"{path}: not a valid JSON lines manifest (one object per line): {exc} (rows count from 0)"
        ) from None


def read_manifest(path: str | Path) -> pa.Table:
    """A manifest (.parquet, .jsonl/.json lines, .csv) as a table of string columns id, image, expression.

    Each format is read by its own rules at any size: Parquet by pyarrow; CSV as RFC 4180 (a quoted
    value may span lines) and JSON lines, both UTF-8 (a file that is not names its first bad line).
    `id` defaults to a hash of image and expression (stable when the manifest is reordered; identical
    pairs share it and are segmented once). Relative local image paths resolve against the manifest's
    folder. Duplicate explicit ids raise InputError (a re-run could not tell them apart).
    """
    path = str(path)
    suffix = path.rsplit(".", 1)[-1].lower()
    filesystem, inner = filesystem_for(path)
    if suffix == "parquet":
        table = pq.read_table(inner, filesystem=filesystem)
    elif suffix in ("jsonl", "json", "csv"):
        with filesystem.open_input_stream(inner) as f:
            data = f.read()
        table = _read_text_manifest(path, data, suffix)
    else:
        raise InputError(f"{path}: manifest must be .parquet, .jsonl or .csv")
    missing = [c for c in ("image", "expression") if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: manifest lacks column(s) {missing} (has {table.column_names})")
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
            raise InputError(f"{path}: {ids.null_count} row(s) have no id")
        if pc.count_distinct(ids).as_py() != len(ids):
            raise InputError(f"{path}: ids are not unique")
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
        # Identical pairs share an id: keep the first of each, in manifest order.
        out = _groups_in_order(out, "id", [("image", "first"), ("expression", "first")])
        out = out.select(["id", "image_first", "expression_first"])
        out = out.rename_columns(["id", "image", "expression"])
    return out


def _groups_in_order(table: pa.Table, key: str, aggregations: list[tuple[str, str]]) -> pa.Table:
    """`table.group_by(key).aggregate(aggregations)` with its groups in order of first appearance:
    pyarrow's group_by promises no order (about 1 four-line manifest in 80 came back reordered)."""
    t = table.append_column("_order", pa.array(np.arange(len(table))))
    grouped = t.group_by(key, use_threads=False).aggregate([*aggregations, ("_order", "min")])
    return grouped.sort_by("_order_min")


def group_by_image(manifest: pa.Table) -> pa.Table:
    """Manifest rows -> IMAGE_SCHEMA rows, one per distinct image, in order of first appearance."""
    g = _groups_in_order(manifest, "image", [("id", "list"), ("expression", "list")])
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


def shard_rows_to_images(table: pa.Table, split: str, with_gt: bool, done: pa.Array | None) -> pa.Table:
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


def shard_dataset(split_dirs: Sequence[Path], with_gt: bool, done: pa.Array | None) -> ray.data.Dataset:
    parts = []
    for d in split_dirs:
        files = [str(f) for f in sorted(d.glob("part-*.parquet"))]
        ds = ray.data.read_parquet(files).select_columns(["file_name", "height", "width", "image", "refs"])
        parts.append(
            ds.map_batches(
                shard_rows_to_images,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"split": d.name, "with_gt": with_gt, "done": done},
            )
        )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
