"""Parquet shards of a REFER dataset: schema (a public contract, see docs/shard_format.md), writer, reader.

Layout: ``<out>/<dataset>_<split_by>/<split>/part-%05d.parquet``, one row per image, images sorted by
id; ``<out>/<dataset>_<split_by>/errors.jsonl`` lists records skipped by the latest
``prepare_shards(..., skip_bad=True)`` run. Boxes are XYXY in continuous pixel coordinates; masks are
COCO compressed RLE (``{"size": [h, w], "counts": str}``, column-major as pycocotools defines it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from ..config import InputError
from ..geometry import ImageDecodeError, decode_image
from ..inputs import Item
from ..masks import decode_rle, encode_mask
from ..prompts import clean_expression
from ..storage import parquet_files
from .refer import ReferDataError, ReferDataset, ReferRef

__all__ = [
    "READABLE_VERSIONS",
    "SHARD_FORMAT_VERSION",
    "SHARD_SCHEMA",
    "SHARD_SCHEMA_V1",
    "ExpressionSample",
    "ImageCache",
    "PrepareReport",
    "build_image_row",
    "check_single_target",
    "file_version",
    "generalized_counts",
    "iter_expressions",
    "prepare_shards",
    "read_image_rows",
    "ref_row",
    "shard_dir",
    "to_item",
    "union_target",
    "upgrade_row",
    "validate_shard_schema",
    "write_split",
]

SHARD_FORMAT_VERSION = "2"
#: Versions the readers accept: version 1 files (no ``no_target`` / ``targets``) read as single-target refs.
READABLE_VERSIONS = ("1", "2")
#: Per split folder, `prepare --ray` marks its finished parts here (ppcr/data/distributed_prepare.py).
DONE_DIR = "_done"


def _list(value_type: pa.DataType) -> pa.DataType:
    # Parquet's compliant nested-list element name is "element" (pyarrow's default is "item"); using it
    # here makes the schema read back from a file identical to SHARD_SCHEMA, names included.
    return pa.list_(pa.field("element", value_type))


_MASK_TYPE = pa.struct([pa.field("size", _list(pa.int32())), pa.field("counts", pa.string())])
_SENTENCE_TYPE = pa.struct([pa.field("sent_id", pa.int64()), pa.field("text", pa.string())])
_V1_REF_FIELDS = [
    pa.field("ref_id", pa.int64()),
    pa.field("ann_id", pa.int64()),
    pa.field("category_id", pa.int32()),
    pa.field("bbox", _list(pa.float64())),
    pa.field("mask", _MASK_TYPE),
    pa.field("sentences", _list(_SENTENCE_TYPE)),
]
#: One target (a referred object) of an expression: an annotation's id, category, box and mask.
_TARGET_TYPE = pa.struct(
    [
        pa.field("ann_id", pa.int64()),
        pa.field("category_id", pa.int32()),
        pa.field("bbox", _list(pa.float64())),
        pa.field("mask", _MASK_TYPE),
    ]
)
_REF_TYPE = pa.struct(
    [*_V1_REF_FIELDS, pa.field("no_target", pa.bool_()), pa.field("targets", _list(_TARGET_TYPE))]
)


def _schema(ref_type: pa.DataType, version: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.int64()),
            pa.field("file_name", pa.string()),
            pa.field("height", pa.int32()),
            pa.field("width", pa.int32()),
            pa.field("image", pa.binary()),
            pa.field("refs", _list(ref_type)),
        ],
        metadata={"ppcr.shard_format_version": version},
    )


#: The exact schema of every shard file written now (field names, order, types). Writers never write nulls.
SHARD_SCHEMA: pa.Schema = _schema(_REF_TYPE, SHARD_FORMAT_VERSION)
#: The schema of version 1 files (before ``no_target`` / ``targets``), still read.
SHARD_SCHEMA_V1: pa.Schema = _schema(pa.struct(_V1_REF_FIELDS), "1")


def shard_dir(root: str | Path, dataset: str, split_by: str, split: str) -> Path:
    """Folder holding the shards of one split: ``<root>/<dataset>_<split_by>/<split>``."""
    return Path(root) / f"{dataset}_{split_by}" / split


# ----------------------------------------------------------------------------- writer


def error_entry(split: str, image_id: int, ref_id: int | None, err: ReferDataError) -> dict[str, Any]:
    """One line of ``errors.jsonl`` (``--skip-bad``): where the bad record is and why."""
    entry: dict[str, Any] = {"split": split, "image_id": image_id}
    if ref_id is not None:
        entry["ref_id"] = ref_id
    entry.update(file=err.path, reason=err.reason)
    return entry


def union_target(targets: list[dict], h: int, w: int) -> tuple[list[float], dict]:
    """(box, mask) of a ref's targets taken together: the enclosing pixel XYXY box and the union mask
    (COCO compressed RLE of size [h, w]). One target: its own box and mask; none: ``[0, 0, 0, 0]`` and
    an empty mask."""
    if len(targets) == 1:
        return list(targets[0]["bbox"]), dict(targets[0]["mask"])
    if not targets:
        return [0.0, 0.0, 0.0, 0.0], encode_mask(np.zeros((h, w), dtype=bool))
    merged = mask_utils.merge(
        [{"size": [h, w], "counts": t["mask"]["counts"].encode("ascii")} for t in targets], intersect=0
    )
    boxes = np.asarray([t["bbox"] for t in targets], dtype=np.float64)
    box = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]
    return box, {"size": [h, w], "counts": merged["counts"].decode("ascii")}


def ref_row(
    ref_id: int, category_id: int, no_target: bool, targets: list[dict], sentences: list[dict], h: int, w: int
) -> dict:
    """A ``refs`` element (SHARD_SCHEMA): the targets (``{ann_id, category_id, bbox, mask}``, none when
    ``no_target``) and, as version 1 had them, ``ann_id`` (the first target's, -1 without), ``bbox`` and
    ``mask`` of all targets together (`union_target`)."""
    if no_target == bool(targets):
        raise ValueError("a ref has targets exactly when no_target is false")
    bbox, mask = union_target(targets, h, w)
    return {
        "ref_id": ref_id,
        "ann_id": targets[0]["ann_id"] if targets else -1,
        "category_id": category_id,
        "bbox": bbox,
        "mask": mask,
        "sentences": sentences,
        "no_target": no_target,
        "targets": targets,
    }


def _ref_entry(refer: ReferDataset, ref: ReferRef, h: int, w: int) -> dict:
    if not ref.sentences:
        raise ReferDataError(refer.refs_path, "ref has no sentences", ref_id=ref.ref_id)
    for s in ref.sentences:  # the text rules every entry point applies: a shard never holds what they refuse
        try:
            clean_expression(s.text)
        except InputError as exc:
            raise ReferDataError(refer.refs_path, f"sentence {s.sent_id}: {exc}", ref_id=ref.ref_id) from None
    targets = []
    for ann_id in ref.ann_ids:
        category = ref.category_id
        if refer.generalized:  # a target is the union of its non-crowd annotations (ReLA's grefer.py)
            crowd, category = refer.ann_target_info(ann_id, ref.image_id)
            if crowd:
                continue
        rle = refer.ann_rle(ann_id)
        if list(rle["size"]) != [h, w]:
            raise ReferDataError(
                refer.instances_path,
                f"mask size {rle['size']} != image size [{h}, {w}]",
                ref_id=ref.ref_id,
                ann_id=ann_id,
            )
        if (
            refer.generalized
            and mask_utils.area({"size": [h, w], "counts": rle["counts"].encode("ascii")}) == 0
        ):
            # An empty target would read as "no target" wherever only the union mask travels.
            raise ReferDataError(
                refer.instances_path, "annotation mask is empty", ref_id=ref.ref_id, ann_id=ann_id
            )
        bbox = refer.ann_bbox_xyxy(ann_id)
        targets.append({"ann_id": ann_id, "category_id": category, "bbox": bbox, "mask": rle})
    if not ref.no_target and not targets:
        raise ReferDataError(
            refer.instances_path,
            f"every annotation of the target {list(ref.ann_ids)} is a crowd annotation (iscrowd 1)",
            ref_id=ref.ref_id,
        )
    sentences = [{"sent_id": s.sent_id, "text": s.text} for s in ref.sentences]
    return ref_row(ref.ref_id, ref.category_id, ref.no_target, targets, sentences, h, w)


_EXIF_ORIENTATION = 0x0112


def _size_mismatch(data: bytes, shown: tuple[int, int], annotated: tuple[int, int]) -> str:
    """Why a decoded (displayed) size differs from instances.json's, naming the EXIF orientation."""
    with Image.open(io.BytesIO(data)) as im:
        stored, orientation = im.size, im.getexif().get(_EXIF_ORIENTATION, 1)
    (sw, sh), (aw, ah) = shown, annotated
    if orientation != 1 and stored == annotated:
        return (
            f"EXIF orientation {orientation} shows this {stored[0]}x{stored[1]} image as {sw}x{sh}, but "
            f"instances.json gives the stored size {aw}x{ah}: annotations made on the stored pixels would "
            "be misaligned, since every ppcr reader shows the image as displayed (docs/shard_format.md). "
            "Remove the orientation tag from the file if the annotations are on the stored pixels, or "
            "annotate the displayed image"
        )
    shown_as = f" (as displayed, EXIF orientation {orientation})" if orientation != 1 else ""
    return f"image size {sw}x{sh}{shown_as} != instances.json {aw}x{ah} (WxH)"


def _build_row(
    refer: ReferDataset,
    image_id: int,
    images_dir: str | Path,
    refs_of_image: list[ReferRef],
    on_bad_ref: Callable[[ReferRef, ReferDataError], None] | None,
) -> dict:
    info = refer.images.get(int(image_id))
    if info is None:
        raise ReferDataError(refer.instances_path, "image id not in instances.json", image_id=image_id)
    file_name = refer.image_filename(image_id)
    path = Path(images_dir) / file_name
    h, w = int(info["height"]), int(info["width"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReferDataError(path, "image file missing", image_id=image_id) from None
    try:
        # A full decode (header-only checks miss truncated files) by the function every reader uses:
        # the displayed image (EXIF orientation applied), its mode and shape checked as they will be.
        shown_h, shown_w = decode_image(data, path.name).shape[:2]
    except ImageDecodeError as e:
        raise ReferDataError(path, f"image does not decode or is refused ({e})", image_id=image_id) from None
    if (shown_w, shown_h) != (w, h):
        raise ReferDataError(path, _size_mismatch(data, (shown_w, shown_h), (w, h)), image_id=image_id)
    entries = []
    for ref in sorted(refs_of_image, key=lambda r: r.ref_id):
        try:
            entries.append(_ref_entry(refer, ref, h, w))
        except ReferDataError as e:
            if on_bad_ref is None:
                # Name the ref as well as the annotation so the record can be found either way.
                e.record.setdefault("ref_id", ref.ref_id)
                raise ReferDataError(e.path, e.reason, **e.record) from None
            on_bad_ref(ref, e)
    return {
        "image_id": int(image_id),
        "file_name": file_name,
        "height": h,
        "width": w,
        "image": data,
        "refs": entries,
    }


def build_image_row(
    refer: ReferDataset, image_id: int, images_dir: str | Path, refs_of_image: list[ReferRef]
) -> dict:
    """One shard row (a dict matching SHARD_SCHEMA) for ``image_id``.

    ``image`` holds the original file bytes (never re-encoded). The image must decode as every reader
    decodes it (``geometry.decode_image``: supported mode, shape within ``ImageLimits``) and its
    *displayed* size (EXIF orientation applied, docs/shard_format.md) must match the instances.json
    height/width, else ReferDataError naming the file path and image_id (also for a missing file, and
    for annotations given in the stored frame of an EXIF-rotated image); a bad ref (e.g. malformed
    polygon) raises ReferDataError naming its record.
    Refs are ordered by ref_id; ``bbox`` is XYXY pixels; ``mask`` is compressed RLE of size [h, w].
    """
    return _build_row(refer, image_id, images_dir, refs_of_image, None)


@dataclass
class PrepareReport:
    """Outcome of prepare_shards: rows per split, files written, and skipped records."""

    written: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {split, image_id, ref_id?, file, reason}

    @property
    def ok(self) -> bool:
        """True when nothing had to be skipped."""
        return not self.errors


def _atomic_write_table(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    # One row group per file; images are already compressed, so parquet compression hardly matters.
    pq.write_table(table, tmp, row_group_size=max(1, len(rows)))
    os.replace(tmp, path)  # readers never see a half-written part file


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _refer_rows(
    refer: ReferDataset,
    split: str,
    images_dir: str | Path,
    skip_bad: bool,
    errors: list[dict],
    progress: bool,
) -> Iterator[dict]:
    """The rows of one REFER split in image_id order; with ``skip_bad`` bad records go to ``errors``."""
    by_image: dict[int, list[ReferRef]] = {}
    for ref in refer.refs(split):
        by_image.setdefault(ref.image_id, []).append(ref)

    def record(err: ReferDataError, image_id: int, ref_id: int | None) -> None:
        errors.append(error_entry(split, image_id, ref_id, err))

    name = f"{refer.dataset}_{refer.split_by}/{split}"
    for image_id in tqdm(sorted(by_image), desc=name, disable=not progress):
        on_bad = (lambda ref, e, i=image_id: record(e, i, ref.ref_id)) if skip_bad else None
        try:
            row = _build_row(refer, image_id, images_dir, by_image[image_id], on_bad)
        except ReferDataError as e:
            if not skip_bad:
                raise
            record(e, image_id, None)
            continue
        if row["refs"]:  # else every ref of this image was bad; each is already in errors
            yield row


def write_split(rows: Iterable[dict], out_dir: Path, rows_per_file: int) -> tuple[list[str], int]:
    """Write one split's rows (SHARD_SCHEMA dicts, already in image_id order) into ``out_dir``.

    The split's old ``part-*`` files (and ``--ray`` markers) are removed first; then every ``rows_per_file`` rows become
    ``part-%05d.parquet`` (written to ``.tmp``, then renamed). ``rows`` is consumed lazily, so a split
    never has to fit in memory. Returns (the files written, the number of rows).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("part-*.parquet"), *out_dir.glob("part-*.parquet.tmp")]:
        stale.unlink()
    if (out_dir / DONE_DIR).is_dir():  # an earlier --ray run's markers describe parts no longer there
        shutil.rmtree(out_dir / DONE_DIR)
    files: list[str] = []
    chunk: list[dict] = []
    n = 0

    def flush() -> None:
        nonlocal n
        path = out_dir / f"part-{n // rows_per_file:05d}.parquet"
        _atomic_write_table(chunk, path)
        files.append(str(path))
        n += len(chunk)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) == rows_per_file:
            flush()
    if chunk:
        flush()
    return files, n


def prepare_shards(
    refer_root: str | Path,
    images_dir: str | Path,
    dataset: str,
    split_by: str,
    out: str | Path,
    *,
    splits: list[str] | tuple[str, ...] | None = None,
    rows_per_file: int = 256,
    skip_bad: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Convert a REFER dataset into Parquet shards under ``<out>/<dataset>_<split_by>/<split>/``.

    Images are written in increasing image_id order, ``rows_per_file`` rows per ``part-%05d.parquet``
    (each written to ``.tmp`` then renamed); stale part files of a rewritten split are removed first.
    Without ``skip_bad`` the first bad record raises ReferDataError. With ``skip_bad`` bad images are
    skipped and bad refs dropped (an image left without refs is skipped too); each is reported in
    ``report.errors`` and in ``<out>/<dataset>_<split_by>/errors.jsonl``.
    """
    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    refer = ReferDataset(refer_root, dataset, split_by)
    splits = list(refer.splits if splits is None else splits)
    for s in splits:
        refer.refs(s)  # ValueError naming the valid splits, before anything is written
    report = PrepareReport()
    root = Path(out) / f"{dataset}_{split_by}"

    for split in splits:
        rows = _refer_rows(refer, split, images_dir, skip_bad, report.errors, progress)
        files, report.written[split] = write_split(
            rows, shard_dir(out, dataset, split_by, split), rows_per_file
        )
        report.files += files

    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_text("".join(json.dumps(e) + "\n" for e in report.errors), root / "errors.jsonl")
    return report


# ----------------------------------------------------------------------------- reader


def file_version(schema: pa.Schema) -> str:
    """The shard format version a file's schema metadata declares (files without one are version 1)."""
    meta = schema.metadata or {}
    return meta.get(b"ppcr.shard_format_version", b"1").decode("utf-8", "replace")


def validate_shard_schema(path: str | Path) -> str:
    """The format version of the shard file ``path`` ("1" or "2"); InputError naming ``path`` and the
    first differing column if its schema is not that version's (SHARD_SCHEMA, SHARD_SCHEMA_V1), or
    naming the version if no reader knows it."""
    schema = pq.read_schema(path)
    version = file_version(schema)
    if version not in READABLE_VERSIONS:
        raise InputError(
            f"{path}: shard format version {version!r}; this ppcr reads versions {', '.join(READABLE_VERSIONS)}"
        )
    want = SHARD_SCHEMA_V1 if version == "1" else SHARD_SCHEMA
    expected = {f.name: f for f in want}
    got = {f.name: f for f in schema}
    # Iterate in schema order (not set order) so the reported column is deterministic.
    for name in want.names:
        if name not in got:
            raise InputError(f"{path}: missing column {name!r} (expected {expected[name].type})")
    for name in schema.names:
        if name not in expected:
            raise InputError(f"{path}: unexpected column {name!r} ({got[name].type})")
    for name, f in expected.items():
        if not got[name].equals(f):
            raise InputError(
                f"{path}: column {name!r} is {got[name]}, expected {f} (format version {version})"
            )
    if schema.names != want.names:
        raise InputError(f"{path}: column order {schema.names} != {want.names}")
    return version


def upgrade_row(row: dict) -> dict:
    """A version 1 row as version 2 has it (in place): each ref gets ``no_target`` False and its one
    target. Version 2 rows are returned as they are."""
    for ref in row["refs"]:
        if "targets" not in ref:
            ref["no_target"] = False
            ref["targets"] = [{k: ref[k] for k in ("ann_id", "category_id", "bbox", "mask")}]
    return row


def read_image_rows(split_dir: str | Path, batch_size: int = 32) -> Iterator[dict]:
    """Yield shard rows as python dicts (SHARD_SCHEMA, version 2: version 1 files are upgraded, see
    `upgrade_row`), file by file in file-name order.

    Streams ``batch_size`` rows at a time so a split never has to fit in memory.
    """
    files = parquet_files(split_dir, "part-")
    if not files:
        raise FileNotFoundError(f"no part-*.parquet shard files in {split_dir}")
    for path in files:
        version = validate_shard_schema(path)
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_size):
            rows = batch.to_pylist()
            yield from (map(upgrade_row, rows) if version == "1" else rows)


def generalized_counts(files: Iterable[str | Path]) -> dict[str, Any]:
    """How many expressions of these shard files have no target, and how many several: ``{"no_target",
    "multi_target", "expressions", "first_file"}`` (``first_file``: the first file holding either, or
    None). Reads the ``refs`` column only, never the images; version 1 files hold neither."""
    out: dict[str, Any] = {"no_target": 0, "multi_target": 0, "expressions": 0, "first_file": None}
    for path in files:
        version = validate_shard_schema(path)
        refs = pq.read_table(path, columns=["refs"]).column("refs").combine_chunks()
        flat = pc.list_flatten(refs)
        sentences = pc.list_value_length(flat.field("sentences")).to_numpy(zero_copy_only=False)
        out["expressions"] += int(sentences.sum())
        if version == "1" or len(flat) == 0:
            continue
        none = flat.field("no_target").to_numpy(zero_copy_only=False).astype(bool)
        several = pc.list_value_length(flat.field("targets")).to_numpy(zero_copy_only=False) > 1
        n_none, n_several = int(sentences[none].sum()), int(sentences[several].sum())
        out["no_target"] += n_none
        out["multi_target"] += n_several
        if (n_none or n_several) and out["first_file"] is None:
            out["first_file"] = str(path)
    return out


def check_single_target(files: list[str], where: str) -> None:
    """InputError in one line when shard files hold expressions with no target or with several:
    training learns exactly one target per expression, and dropping those rows would mis-train silently."""
    counts = generalized_counts(files)
    if counts["no_target"] or counts["multi_target"]:
        raise InputError(
            f"{where}: {counts['no_target']} expression(s) without a target and {counts['multi_target']} "
            f"with several targets (of {counts['expressions']}; first in {counts['first_file']}): training "
            "learns exactly one target per expression with model.targets single; set model.targets: multi "
            "to train on them, train on single-target data, or evaluate these with `ppcr evaluate`"
        )


@dataclass
class ExpressionSample:
    """One (image, referred object, sentence) triple read from the shards.

    ``bbox_xyxy``: float64 ``(4,)`` in continuous pixel coords of the original image;
    ``mask_rle``: COCO compressed RLE ``{"size": [height, width], "counts": str}``. Both cover every
    target together (the union mask and its enclosing box; ``[0, 0, 0, 0]`` and an empty mask when
    ``no_target``). ``targets``: each target's ``{ann_id, category_id, bbox, mask}`` (none when
    ``no_target``, one for a classic REFER expression). ``ann_id`` is the first target's, -1 without.
    """

    image_id: int
    file_name: str
    height: int
    width: int
    image_bytes: bytes
    ref_id: int
    ann_id: int
    sent_id: int
    text: str
    bbox_xyxy: np.ndarray
    mask_rle: dict
    no_target: bool = False
    targets: list[dict] = field(default_factory=list)

    @property
    def generalized(self) -> bool:
        """True when the expression has no target or several (what a single-target model cannot answer)."""
        return self.no_target or len(self.targets) > 1

    def mask(self) -> np.ndarray:
        """Decoded bool mask of shape ``(height, width)``."""
        return decode_rle(self.mask_rle)


class ImageCache:
    """Decoded images by id, bounded (FIFO), so each training image is decoded about once."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._data: dict[int, np.ndarray] = {}

    def get(self, sample: ExpressionSample) -> np.ndarray:
        img = self._data.get(sample.image_id)
        if img is None:
            img = decode_image(
                sample.image_bytes,
                f"image {sample.image_id} ({sample.file_name})",
                expected_hw=(sample.height, sample.width),
            )
            if len(self._data) >= self.capacity:
                self._data.pop(next(iter(self._data)))
            self._data[sample.image_id] = img
        return img


def to_item(sample: ExpressionSample, cache: ImageCache, instances: bool = False) -> Item:
    """A shard expression as a model input with ground truth (mask bool H×W, box pixel XYXY; with
    `instances`, each target's box and mask too, as the multi-target model trains on them)."""
    inst = None
    if instances:
        h, w = sample.height, sample.width
        boxes = np.asarray([t["bbox"] for t in sample.targets], dtype=np.float64).reshape(-1, 4)
        masks = [decode_rle(t["mask"]) for t in sample.targets]
        inst = (boxes, np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool))
    return Item(
        key=sample.image_id,
        image=cache.get(sample),
        expression=sample.text,
        gt_mask=sample.mask(),
        gt_box=sample.bbox_xyxy,
        meta={"image_id": sample.image_id, "ref_id": sample.ref_id, "sent_id": sample.sent_id},
        gt_instances=inst,
    )


def iter_expressions(split_dir: str | Path, limit_images: int | None = None) -> Iterator[ExpressionSample]:
    """Every sentence of every ref, in shard order (images by id, refs by ref_id, sentences as stored)."""
    for n, row in enumerate(read_image_rows(split_dir)):
        if limit_images is not None and n >= limit_images:
            return
        for ref in row["refs"]:
            mask = {"size": list(ref["mask"]["size"]), "counts": ref["mask"]["counts"]}
            bbox = np.asarray(ref["bbox"], dtype=np.float64)
            for s in ref["sentences"]:
                yield ExpressionSample(
                    image_id=row["image_id"],
                    file_name=row["file_name"],
                    height=row["height"],
                    width=row["width"],
                    image_bytes=row["image"],
                    ref_id=ref["ref_id"],
                    ann_id=ref["ann_id"],
                    sent_id=s["sent_id"],
                    text=s["text"],
                    bbox_xyxy=bbox.copy(),  # fresh per sample: consumers may mutate in place
                    mask_rle=dict(mask),
                    no_target=bool(ref["no_target"]),
                    targets=[dict(t) for t in ref["targets"]],
                )
