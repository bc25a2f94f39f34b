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
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from ..config import InputError
from ..geometry import ImageDecodeError, decode_image
from ..inputs import Item
from ..masks import decode_rle
from ..prompts import clean_expression
from ..storage import parquet_files
from .refer import ReferDataError, ReferDataset, ReferRef

__all__ = [
    "SHARD_FORMAT_VERSION",
    "SHARD_SCHEMA",
    "ExpressionSample",
    "ImageCache",
    "PrepareReport",
    "build_image_row",
    "iter_expressions",
    "prepare_shards",
    "read_image_rows",
    "shard_dir",
    "to_item",
    "validate_shard_schema",
    "write_split",
]

SHARD_FORMAT_VERSION = "1"
#: Per split folder, `prepare --ray` marks its finished parts here (ppcr/data/distributed_prepare.py).
DONE_DIR = "_done"


def _list(value_type: pa.DataType) -> pa.DataType:
    # Parquet's compliant nested-list element name is "element" (pyarrow's default is "item"); using it
    # here makes the schema read back from a file identical to SHARD_SCHEMA, names included.
    return pa.list_(pa.field("element", value_type))


_MASK_TYPE = pa.struct([pa.field("size", _list(pa.int32())), pa.field("counts", pa.string())])
_SENTENCE_TYPE = pa.struct([pa.field("sent_id", pa.int64()), pa.field("text", pa.string())])
_REF_TYPE = pa.struct(
    [
        pa.field("ref_id", pa.int64()),
        pa.field("ann_id", pa.int64()),
        pa.field("category_id", pa.int32()),
        pa.field("bbox", _list(pa.float64())),
        pa.field("mask", _MASK_TYPE),
        pa.field("sentences", _list(_SENTENCE_TYPE)),
    ]
)
#: The exact schema of every shard file (field names, order, types). Writers never write nulls.
SHARD_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("image_id", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("image", pa.binary()),
        pa.field("refs", _list(_REF_TYPE)),
    ],
    metadata={"ppcr.shard_format_version": SHARD_FORMAT_VERSION},
)


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


def _ref_entry(refer: ReferDataset, ref: ReferRef, h: int, w: int) -> dict:
    rle = refer.ann_rle(ref.ann_id)
    if list(rle["size"]) != [h, w]:
        raise ReferDataError(
            refer.instances_path, f"mask size {rle['size']} != image size [{h}, {w}]", ref_id=ref.ref_id
        )
    if not ref.sentences:
        raise ReferDataError(refer.refs_path, "ref has no sentences", ref_id=ref.ref_id)
    for s in ref.sentences:  # the text rules every entry point applies: a shard never holds what they refuse
        try:
            clean_expression(s.text)
        except InputError as exc:
            raise ReferDataError(refer.refs_path, f"sentence {s.sent_id}: {exc}", ref_id=ref.ref_id) from None
    return {
        "ref_id": ref.ref_id,
        "ann_id": ref.ann_id,
        "category_id": ref.category_id,
        "bbox": refer.ann_bbox_xyxy(ref.ann_id),
        "mask": {"size": [h, w], "counts": rle["counts"]},
        "sentences": [{"sent_id": s.sent_id, "text": s.text} for s in ref.sentences],
    }


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


def validate_shard_schema(path: str | Path) -> None:
    """Raise ValueError naming ``path`` and the first differing column if its schema != SHARD_SCHEMA."""
    schema = pq.read_schema(path)
    expected = {f.name: f for f in SHARD_SCHEMA}
    got = {f.name: f for f in schema}
    # Iterate in schema order (not set order) so the reported column is deterministic.
    for name in SHARD_SCHEMA.names:
        if name not in got:
            raise InputError(f"{path}: missing column {name!r} (expected {expected[name].type})")
    for name in schema.names:
        if name not in expected:
            raise InputError(f"{path}: unexpected column {name!r} ({got[name].type})")
    for name, f in expected.items():
        if not got[name].equals(f):
            raise InputError(f"{path}: column {name!r} is {got[name]}, expected {f}")
    if schema.names != SHARD_SCHEMA.names:
        raise InputError(f"{path}: column order {schema.names} != {SHARD_SCHEMA.names}")


def read_image_rows(split_dir: str | Path, batch_size: int = 32) -> Iterator[dict]:
    """Yield shard rows as python dicts (SHARD_SCHEMA), file by file in file-name order.

    Streams ``batch_size`` rows at a time so a split never has to fit in memory.
    """
    files = parquet_files(split_dir, "part-")
    if not files:
        raise FileNotFoundError(f"no part-*.parquet shard files in {split_dir}")
    for path in files:
        validate_shard_schema(path)
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()


@dataclass
class ExpressionSample:
    """One (image, referred object, sentence) triple read from the shards.

    ``bbox_xyxy``: float64 ``(4,)`` in continuous pixel coords of the original image;
    ``mask_rle``: COCO compressed RLE ``{"size": [height, width], "counts": str}``.
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


def to_item(sample: ExpressionSample, cache: ImageCache) -> Item:
    """A shard expression as a model input with ground truth (mask bool H×W, box pixel XYXY)."""
    return Item(
        key=sample.image_id,
        image=cache.get(sample),
        expression=sample.text,
        gt_mask=sample.mask(),
        gt_box=sample.bbox_xyxy,
        meta={"image_id": sample.image_id, "ref_id": sample.ref_id, "sent_id": sample.sent_id},
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
                )
