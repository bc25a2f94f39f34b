"""Bring your own data: a JSONL manifest, or COCO instances + expressions, -> the documented shards.

    ppcr prepare --format jsonl --manifest refs.jsonl --dataset NAME --out DIR [--skip-bad] [--ray]
    ppcr prepare --format coco --instances instances.json --expressions refs.jsonl --images DIR
                 --dataset NAME --out DIR [--skip-bad] [--ray]

Both write ``<out>/<NAME>_custom/<split>/part-*.parquet`` in the shard format (docs/shard_format.md),
so training, evaluation and batch read them with ``--dataset NAME --split-by custom``. The formats,
with examples, are in docs/custom_data.md. One line is one referred object; lines of the same image and
split become the refs of one row (one row per image, rows in ``image_id`` order).

Ids (all int64, as the schema says):

- ``image_id``: JSONL, images numbered from 1 in order of first appearance among the lines read;
  COCO, the instances.json image id.
- ``ref_id``: the line's ``id`` if it has one, else its line number (1-based); unique per file.
- ``ann_id``: JSONL, the ``ref_id``; COCO, the annotation id.
- ``sent_id``: ``ref_id * 1000 + k`` for the line's k-th expression (at most 1000 per line), so a
  result in a predictions file leads back to its line.

Images are read as ``ppcr.geometry.decode_image`` reads them everywhere (EXIF orientation applied):
``height``/``width`` are the displayed size, and masks must have that size. Every mask goes through
``ppcr.masks`` (bounded work, pixel-exact). A bad line raises ManifestLineError naming the file
and line; with ``skip_bad`` it is reported (``errors.jsonl``, with its ``line``) and the rest is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import InputError
from ..masks import MaskError, bbox_xywh_to_xyxy, png_mask_rle, rle_bbox_xyxy, segmentation_rle
from ..storage import is_uri, read_bytes
from .refer import ReferDataError
from .shards import DONE_DIR, PrepareReport, _atomic_write_text, ref_row, shard_dir, write_split

__all__ = [
    "FORMATS",
    "MAX_EXPRESSIONS_PER_LINE",
    "SPLIT_BY",
    "CustomSource",
    "ManifestLineError",
    "Record",
    "build_custom_row",
    "clear_other_splits",
    "prepare_custom",
    "prepare_custom_ray",
    "read_coco",
    "read_jsonl",
]

#: The `split_by` of every imported data set: shards go to `<out>/<dataset>_custom/<split>/`.
SPLIT_BY = "custom"
FORMATS = ("jsonl", "coco")
MAX_EXPRESSIONS_PER_LINE = 1000  # sent_id = ref_id * 1000 + k
MAX_ID = 10**15  # ref_id * 1000 + k must stay below 2**63
JSONL_KEYS = (
    "image",
    "expression",
    "expressions",
    "mask",
    "masks",
    "no_target",
    "split",
    "bbox",
    "category",
    "id",
)
COCO_REF_KEYS = ("ann_id", "image_id", "no_target", "expression", "expressions", "split", "id")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a folder name: no separators, no leading . or _


class ManifestLineError(ReferDataError):
    """A line of a manifest (or refs file) is unusable; the message names the file and the line number."""

    def __init__(self, path: str | Path, line: int, reason: str, **record: Any) -> None:
        super().__init__(path, reason, line=line, **record)
        self.line = line
        self.args = (f"{self.path}, line {line}: {reason}",)


@dataclass(frozen=True)
class Record:
    """One line: the expressions and what they refer to (JSON-serialisable, so Ray tasks can carry it).

    ``targets``: the referred objects, each ``{"mask": PNG location (str) | COCO RLE (dict) | polygons
    (list), "bbox_xyxy": from the line's / annotation's XYWH bbox, None = the mask's extent, "ann_id",
    "category_id", "note": COCO's "instances.json ann_id N: " prefixed to its mask errors}``; none when
    ``no_target``.
    """

    line: int
    split: str
    image: str  # where the image is read: a local path or a URI
    file_name: str  # the shard's file_name: the path as written (unique per image)
    texts: list[str]
    targets: list[dict]
    category_id: int  # the ref's: its first target's, -1 without a target
    ref_id: int
    image_id: int
    no_target: bool = False
    image_hw: list[int] | None = None  # COCO: instances.json's [height, width], checked on decode


@dataclass
class CustomSource:
    """A parsed manifest: its records (one per good line) and the lines refused while parsing."""

    format: str
    path: str  # the file line numbers refer to (the manifest, or the COCO refs file)
    dataset: str
    records: list[Record]
    errors: list[dict]  # {"line", "file", "reason"}

    @property
    def splits(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(r.split for r in self.records))


# ----------------------------------------------------------------------------- reading files


def _join(base: str, rel: str) -> str:
    """``rel`` (a path or URI) as read from a file in folder ``base`` (a folder path or URI)."""
    if is_uri(rel) or Path(rel).is_absolute():
        return rel
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(rest.rstrip("/") + "/" + rel)
    return str(Path(base, rel).absolute())  # absolute: a Ray worker's working folder may differ


def _folder(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _json_lines(path: str, data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, error or None) for each non-blank line of a JSON Lines file."""
    lines = data.split(b"\n")
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as Windows tools write
        lines[0] = lines[0][3:]
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8 text ({e})"
            continue
        try:
            yield n, json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys), None
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            yield n, None, f"invalid JSON: {e}"


# ----------------------------------------------------------------------------- line fields


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what} must be a name of letters, digits and _ . + - (not starting with . or _); got {value!r}"
        )
    return value


def _check_dataset(dataset: Any) -> str:
    try:
        return _check_name(dataset, "dataset")
    except ValueError as e:
        raise InputError(str(e)) from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}); got {value!r}")
    return value


def _texts(obj: dict) -> list[str]:
    from ..prompts import clean_expression

    if "expression" in obj and "expressions" in obj:
        raise ValueError("give either expression (a string) or expressions (a list of strings), not both")
    if "expression" not in obj and "expressions" not in obj:
        raise ValueError("missing expression (a string) or expressions (a list of strings)")
    if "expression" in obj:
        texts = [obj["expression"]]
    else:
        texts = obj["expressions"]
        if not isinstance(texts, list) or not texts:
            raise ValueError(f"expressions must be a non-empty list of strings; got {texts!r}"[:200])
        if len(texts) > MAX_EXPRESSIONS_PER_LINE:
            raise ValueError(f"{len(texts)} expressions; at most {MAX_EXPRESSIONS_PER_LINE} per line")
    for k, text in enumerate(texts):
        try:
            clean_expression(text)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e) if "expression" in obj else f"expressions[{k}]: {e}") from None
    return list(texts)


def _unknown(obj: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")


def _line_object(obj: object, err: str | None, allowed: tuple[str, ...]) -> None:
    """Check one manifest line: ValueError if it did not parse, is not a JSON object, or has a key
    outside `allowed` (the same rules for the JSONL and the COCO-expressions manifest)."""
    if err is not None:
        raise ValueError(err)
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object; got {type(obj).__name__}")
    _unknown(obj, allowed)


def _bbox(obj: dict) -> list[float] | None:
    if "bbox" not in obj:
        return None
    try:
        return bbox_xywh_to_xyxy(obj["bbox"])
    except MaskError as e:
        raise ValueError(str(e)) from None


def _ref_id(obj: dict, line: int, used: dict[int, int]) -> int:
    ref_id = _int(obj["id"], "id", 0, MAX_ID) if "id" in obj else line
    if ref_id in used:
        raise ValueError(
            f"id {ref_id} is already the id of line {used[ref_id]} (without id, a line's id is its number)"
        )
    used[ref_id] = line
    return ref_id


def read_jsonl(manifest: str | Path, dataset: str) -> CustomSource:
    """Parse a JSONL manifest (docs/custom_data.md): one referred object per line.

    Keys: ``image`` (path relative to the manifest's folder, absolute, or a URI), ``expression`` or
    ``expressions``, ``mask`` (PNG path, COCO RLE, or polygons in pixels), optional ``split`` (default
    ``train``), ``bbox`` (XYWH pixels), ``category`` (int), ``id`` (int). Checks everything that needs no
    image (JSON, keys, types, expressions, ids); lines that fail are in ``errors``. Raises
    FileNotFoundError if the manifest is missing, InputError on a bad dataset name.
    """
    _check_dataset(dataset)
    path = str(manifest)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {path}") from None
    base = _folder(path)
    records: list[Record] = []
    errors: list[dict] = []
    used: dict[int, int] = {}
    image_ids: dict[str, int] = {}
    for line, obj, err in _json_lines(path, data):
        try:
            _line_object(obj, err, JSONL_KEYS)
            image = obj.get("image")
            if not isinstance(image, str) or not image.strip():
                raise ValueError(f"image must be a non-empty path or URI; got {image!r}")
            masks, no_target = _jsonl_masks(obj, base)
            texts = _texts(obj)
            split = _check_name(obj.get("split", "train"), "split")
            bbox = _bbox(obj)
            category = -1 if no_target else _int(obj.get("category", 0), "category", 0, 2**31)
            ref_id = _ref_id(obj, line, used)
        except ValueError as e:
            errors.append({"line": line, "file": path, "reason": str(e)})
            continue
        location = _join(base, image)
        file_name = image if is_uri(image) or Path(image).is_absolute() else posixpath.normpath(image)
        key = location if is_uri(location) else str(Path(location).resolve())
        image_id = image_ids.setdefault(key, len(image_ids) + 1)
        # ann_id: the ref_id for a line's one mask, ref_id * 1000 + k for the k-th of its `masks`.
        ids = (
            [ref_id] if "mask" in obj else [ref_id * MAX_EXPRESSIONS_PER_LINE + k for k in range(len(masks))]
        )
        targets = [
            {"mask": m, "bbox_xyxy": bbox, "ann_id": i, "category_id": category, "note": ""}
            for m, i in zip(masks, ids, strict=True)
        ]
        records.append(
            Record(
                line=line,
                split=split,
                image=location,
                file_name=file_name,
                texts=texts,
                targets=targets,
                category_id=category,
                ref_id=ref_id,
                image_id=image_id,
                no_target=no_target,
            )
        )
    return CustomSource("jsonl", path, dataset, records, errors)


def _one_mask(mask: Any, base: str, what: str) -> Any:
    if isinstance(mask, str):
        if not mask.strip():
            raise ValueError(f"{what} path is empty")
        return _join(base, mask)
    if not isinstance(mask, (dict, list)):
        raise ValueError(
            f"{what} must be a PNG path, a COCO RLE {{size, counts}} or polygons [[x1, y1, ...], ...]; "
            f"got {type(mask).__name__}"
        )
    return mask


def _jsonl_masks(obj: dict, base: str) -> tuple[list[Any], bool]:
    """(the line's masks, no target): exactly one of ``mask`` (one object), ``masks`` (a non-empty list:
    several objects) and ``no_target: true`` (none)."""
    no_target = obj.get("no_target", False)
    if not isinstance(no_target, bool):
        raise ValueError(f"no_target must be true or false; got {no_target!r}")
    given = [k for k in ("mask", "masks") if k in obj]
    if no_target:
        if given or "bbox" in obj or "category" in obj:
            extra = [*given, *(k for k in ("bbox", "category") if k in obj)]
            raise ValueError(f"a line with no_target true names no object: drop {', '.join(extra)}")
        return [], True
    if not given:
        raise ValueError(
            "missing mask (a PNG path, a COCO RLE {size, counts}, or polygons), masks (a list of them), "
            "or no_target: true"
        )
    if len(given) == 2:
        raise ValueError("give either mask (one object) or masks (a list: several objects), not both")
    if "mask" in obj:
        return [_one_mask(obj["mask"], base, "mask")], False
    masks = obj["masks"]
    if not isinstance(masks, list) or not masks:
        raise ValueError(f"masks must be a non-empty list of masks; got {masks!r}"[:200])
    if len(masks) > MAX_EXPRESSIONS_PER_LINE:
        raise ValueError(f"{len(masks)} masks; at most {MAX_EXPRESSIONS_PER_LINE} per line")
    if "bbox" in obj:
        raise ValueError("bbox goes with mask; with masks each object's box is its mask's extent")
    return [_one_mask(m, base, f"masks[{k}]") for k, m in enumerate(masks)], False


def _coco_index(path: str, inst: Any) -> tuple[dict[int, dict], dict[int, dict]]:
    def bad(reason: str) -> ReferDataError:
        return ReferDataError(path, f"not a COCO instances file: {reason}")

    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list):
        raise bad("no images list")
    if not isinstance(inst.get("annotations"), list):
        raise bad("no annotations list")
    images: dict[int, dict] = {}
    for k, im in enumerate(inst["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            raise bad(f"images[{k}] has no integer id")
        if im["id"] in images:
            raise bad(f"image id {im['id']} appears twice")
        images[im["id"]] = im
    anns: dict[int, dict] = {}
    for k, a in enumerate(inst["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("id"), int):
            raise bad(f"annotations[{k}] has no integer id")
        if a["id"] in anns:
            raise bad(f"annotation id {a['id']} appears twice")
        anns[a["id"]] = a
    return images, anns


def read_coco(
    instances: str | Path, expressions: str | Path, images_dir: str | Path, dataset: str
) -> CustomSource:
    """Parse COCO ``instances.json`` (a labelling tool's export) + an expressions file.

    Each expressions line is ``{"ann_id": int, "expressions": [...]}`` (or ``"expression": str``) with
    optional ``split`` (default ``train``) and ``id``; masks, boxes and categories come from the
    annotation (``segmentation``: polygons or RLE; ``bbox`` XYWH, else the mask's extent); images are
    ``<images_dir>/<file_name>``. Line errors (unknown ann_id, bad keys, ...) are in ``errors``; a file
    that is not COCO instances raises ReferDataError naming it.
    """
    _check_dataset(dataset)
    inst_path, refs_path = str(instances), str(expressions)
    try:
        inst_bytes = read_bytes(inst_path)
        refs_bytes = read_bytes(refs_path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"not found: {e.filename or e}") from None
    try:
        inst = json.loads(inst_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReferDataError(inst_path, f"invalid JSON ({e})") from None
    images, anns = _coco_index(inst_path, inst)
    records: list[Record] = []
    errors: list[dict] = []
    used: dict[int, int] = {}
    for line, obj, err in _json_lines(refs_path, refs_bytes):
        try:
            _line_object(obj, err, COCO_REF_KEYS)
            no_target = obj.get("no_target", False)
            if not isinstance(no_target, bool):
                raise ValueError(f"no_target must be true or false; got {no_target!r}")
            if no_target:
                if "ann_id" in obj:
                    raise ValueError("a line with no_target true names no annotation: drop ann_id")
                if "image_id" not in obj:
                    raise ValueError("a line with no_target true needs image_id (the image it is about)")
                ann_ids: list[int] = []
            else:
                if "ann_id" not in obj:
                    raise ValueError(
                        "missing ann_id (an annotation id, or a list of them), or no_target: true"
                    )
                raw = obj["ann_id"]
                if isinstance(raw, list):
                    if not raw:
                        raise ValueError(
                            "ann_id must be an annotation id or a non-empty list of them; got []"
                        )
                    ann_ids = [_int(a, "ann_id", 0, 2**63) for a in raw]
                    if len(set(ann_ids)) != len(ann_ids):
                        raise ValueError(f"ann_id {ann_ids} repeats an annotation")
                else:
                    ann_ids = [_int(raw, "ann_id", 0, 2**63)]
            targets, image_id = [], None
            for ann_id in ann_ids:
                ann = anns.get(ann_id)
                if ann is None:
                    raise ValueError(f"ann_id {ann_id} is not in {inst_path}")
                note = f"{Path(inst_path).name} ann_id {ann_id}: "
                if image_id is not None and ann.get("image_id") != image_id:
                    raise ValueError(
                        f"{note}its image {ann.get('image_id')!r} is not image {image_id} of ann_id {ann_ids[0]}"
                    )
                image_id = ann.get("image_id")
                if "segmentation" not in ann:
                    raise ValueError(f"{note}no segmentation")
                try:
                    bbox = bbox_xywh_to_xyxy(ann["bbox"]) if "bbox" in ann else None
                except MaskError as e:
                    raise ValueError(f"{note}{e}") from None
                category = _int(ann.get("category_id", 0), f"{note}category_id", 0, 2**31)
                targets.append(
                    {
                        "mask": ann["segmentation"],
                        "bbox_xyxy": bbox,
                        "ann_id": ann_id,
                        "category_id": category,
                        "note": note,
                    }
                )
            if "image_id" in obj:
                given = _int(obj["image_id"], "image_id", 0, 2**63)
                if image_id is not None and given != image_id:
                    raise ValueError(f"image_id {given} is not the image {image_id} of ann_id {ann_ids[0]}")
                image_id = given
            note = targets[0]["note"] if targets else ""
            im = images.get(image_id)
            if im is None:
                raise ValueError(f"{note}image_id {image_id!r} is not in images of {inst_path}")
            file_name, hw = im.get("file_name"), [im.get("height"), im.get("width")]
            if not isinstance(file_name, str) or not file_name:
                raise ValueError(f"{note}image {im['id']} has no file_name")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
                raise ValueError(f"{note}image {im['id']} has no positive integer height/width: {hw}")
            texts = _texts(obj)
            split = _check_name(obj.get("split", "train"), "split")
            ref_id = _ref_id(obj, line, used)
        except ValueError as e:
            errors.append({"line": line, "file": refs_path, "reason": str(e)})
            continue
        records.append(
            Record(
                line=line,
                split=split,
                image=_join(str(images_dir), file_name),
                file_name=file_name,
                texts=texts,
                targets=targets,
                category_id=targets[0]["category_id"] if targets else -1,
                ref_id=ref_id,
                image_id=im["id"],
                no_target=no_target,
                image_hw=hw,
            )
        )
    return CustomSource("coco", refs_path, dataset, records, errors)


# ----------------------------------------------------------------------------- rows


def _target_entry(target: dict, h: int, w: int, where: str) -> dict:
    """A target of a shard ref from a record's target: its mask read and checked (``where`` names it
    in errors: the COCO annotation, or ``masks[k]: `` of a JSONL line)."""
    mask, where = target["mask"], target["note"] + where
    try:
        if isinstance(mask, str):
            try:
                data = read_bytes(mask)
            except FileNotFoundError:
                raise MaskError(f"mask file missing: {mask}") from None
            except OSError as e:
                raise MaskError(f"mask file cannot be read: {mask} ({e})") from None
            rle = png_mask_rle(data, h, w, mask)
        else:
            rle = segmentation_rle(mask, h, w)
    except MaskError as e:
        raise ValueError(f"{where}{e}") from None
    extent = rle_bbox_xyxy(rle)
    if extent[2] <= extent[0]:
        raise ValueError(f"{where}mask is empty (no object pixels in the {w}x{h} image)")
    bbox = target["bbox_xyxy"]
    return {
        "ann_id": target["ann_id"],
        "category_id": target["category_id"],
        "bbox": bbox if bbox is not None else extent,
        "mask": rle,
    }


def _ref_entry(rec: Record, h: int, w: int) -> dict:
    several = len(rec.targets) > 1
    targets = [
        _target_entry(t, h, w, f"masks[{k}]: " if several and not t["note"] else "")
        for k, t in enumerate(rec.targets)
    ]
    sentences = [
        {"sent_id": rec.ref_id * MAX_EXPRESSIONS_PER_LINE + k, "text": t} for k, t in enumerate(rec.texts)
    ]
    return ref_row(rec.ref_id, rec.category_id, rec.no_target, targets, sentences, h, w)


def build_custom_row(records: list[Record], source_path: str) -> tuple[dict | None, list[dict]]:
    """The shard row (SHARD_SCHEMA) of one image from its records (same image_id and split).

    Reads and decodes the image once (``geometry.decode_image``: EXIF orientation applied; height and
    width are the decoded size), then each record's mask (must be that size, non-empty) and box.
    Returns (row, or None when no record is usable; an error entry ``{"line", "split", "image_id",
    "file", "reason"}`` per bad record). Refs are ordered by ref_id.
    """
    from ..geometry import decode_image

    first = records[0]

    def error(rec: Record, reason: str) -> dict:
        return {
            "line": rec.line,
            "split": rec.split,
            "image_id": rec.image_id,
            "file": source_path,
            "reason": reason,
        }

    try:
        data = read_bytes(first.image)
    except FileNotFoundError:
        return None, [error(r, f"image file missing: {first.image}") for r in records]
    except OSError as e:
        return None, [error(r, f"image cannot be read: {first.image} ({e})") for r in records]
    try:
        h, w = decode_image(data, first.image).shape[:2]
    except ValueError as e:  # ImageDecodeError and its kin
        return None, [error(r, f"image does not decode ({e})") for r in records]
    if first.image_hw is not None and [h, w] != list(first.image_hw):
        hw = first.image_hw
        reason = (
            f"image {first.image} is {w}x{h} (WxH, EXIF orientation applied) but instances.json says "
            f"{hw[1]}x{hw[0]}"
        )
        return None, [error(r, reason) for r in records]
    refs, errors = [], []
    for rec in sorted(records, key=lambda r: r.ref_id):
        try:
            refs.append(_ref_entry(rec, h, w))
        except ValueError as e:
            errors.append(error(rec, str(e)))
    if not refs:
        return None, errors
    row = {"image_id": first.image_id, "file_name": first.file_name, "height": h, "width": w, "image": data}
    return {**row, "refs": refs}, errors


def _group(records: list[Record], splits: list[str]) -> dict[str, dict[int, list[Record]]]:
    """split -> image_id -> records, for the given splits, image ids sorted."""
    out: dict[str, dict[int, list[Record]]] = {s: {} for s in splits}
    for r in records:
        if r.split in out:
            out[r.split].setdefault(r.image_id, []).append(r)
    return {s: dict(sorted(by.items())) for s, by in out.items()}


def _strict(err: dict) -> ManifestLineError:
    return ManifestLineError(err["file"], err["line"], err["reason"])


def _plan_splits(source: CustomSource, splits: list[str] | None) -> list[str]:
    if splits is None:
        return source.splits
    missing = [s for s in splits if s not in source.splits]
    if missing:
        raise InputError(f"split(s) {missing} have no lines in {source.path}; its splits: {source.splits}")
    return list(splits)


def clear_other_splits(root: Path, keep: list[str]) -> None:
    """Remove the part files (and --ray markers) of split folders under ``root`` not in ``keep``: after a
    full import the data set holds exactly the manifest's splits."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.is_dir() and d.name not in keep and any(d.glob("part-*.parquet")):
            for f in d.glob("part-*.parquet*"):
                f.unlink()
            if (d / DONE_DIR).is_dir():
                shutil.rmtree(d / DONE_DIR)


def _finish(report: PrepareReport, root: Path) -> PrepareReport:
    report.errors.sort(key=lambda e: (e["line"], e["file"]))
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_text("".join(json.dumps(e) + "\n" for e in report.errors), root / "errors.jsonl")
    return report


def prepare_custom(
    source: CustomSource,
    out: str | Path,
    *,
    splits: list[str] | None = None,
    rows_per_file: int = 256,
    skip_bad: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Write ``source`` as shards under ``<out>/<dataset>_custom/<split>/`` (docs/shard_format.md).

    ``splits``: the splits to (re)write (default: every split of the source; split folders of an
    earlier import that the source no longer has are then emptied). Without ``skip_bad`` the first bad
    line raises ManifestLineError (file, line number, reason) — parse errors before anything is
    written. With ``skip_bad`` bad lines go to ``report.errors`` and ``errors.jsonl`` (sorted by line).
    """
    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    if not skip_bad and source.errors:
        raise _strict(source.errors[0])
    chosen = _plan_splits(source, splits)
    root = Path(out) / f"{source.dataset}_{SPLIT_BY}"
    report = PrepareReport(errors=[dict(e) for e in source.errors])
    groups = _group(source.records, chosen)

    def rows(split: str) -> Iterator[dict]:
        by_image = groups[split]
        for image_id in tqdm(by_image, desc=f"{root.name}/{split}", disable=not progress):
            row, errors = build_custom_row(by_image[image_id], source.path)
            if errors and not skip_bad:
                raise _strict(errors[0])
            report.errors.extend(errors)
            if row is not None:
                yield row

    for split in chosen:
        files, report.written[split] = write_split(
            rows(split), shard_dir(out, source.dataset, SPLIT_BY, split), rows_per_file
        )
        report.files += files
    if splits is None:  # after every split is written: a failed import leaves the old ones alone
        clear_other_splits(root, chosen)
    return _finish(report, root)


def records_to_json(records: list[Record]) -> str:
    """Records as one JSON string (what a --ray task carries)."""
    return json.dumps([dataclasses.asdict(r) for r in records], separators=(",", ":"))


def records_from_json(text: str) -> list[Record]:
    return [Record(**d) for d in json.loads(text)]


class CustomParts:
    """Builds the rows of one part of a custom import from the records its task carries (a --ray actor's
    builder, see ``ppcr.data.distributed_prepare.run_parts``)."""

    def __init__(self, source_path: str):
        self.source_path = source_path

    def __call__(self, task: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        by_image: dict[int, list[Record]] = {}
        for r in records_from_json(task["records"]):
            by_image.setdefault(r.image_id, []).append(r)
        rows, errors = [], []
        for image_id in sorted(by_image):
            row, errs = build_custom_row(by_image[image_id], self.source_path)
            errors += errs
            if row is not None:
                rows.append(row)
        return rows, errors


def prepare_custom_ray(
    source: CustomSource,
    out: str | Path,
    *,
    splits: list[str] | None = None,
    rows_per_file: int = 256,
    concurrency: int = 2,
) -> tuple[PrepareReport, dict]:
    """``prepare_custom`` as a Ray Data job (`ppcr prepare --format jsonl|coco --ray`): parts of
    ``rows_per_file`` images are built by a pool of actors, bad lines always reported (never fatal),
    finished parts skipped on a re-run (a part's key covers its lines, so an edited manifest redoes the
    parts it changes). The driver parses the manifest (no pixels); the tasks carry their lines. Same
    rows as ``prepare_custom(..., skip_bad=True)``. Returns (report, {"written", "skipped"} parts).
    """
    from .distributed_prepare import _plan_key, run_parts

    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    chosen = _plan_splits(source, splits)
    root = Path(out) / f"{source.dataset}_{SPLIT_BY}"
    plan: dict[str, list[dict]] = {}
    for split, by_image in _group(source.records, chosen).items():
        ids = list(by_image)
        plan[split] = []
        for part, start in enumerate(range(0, len(ids), rows_per_file)):
            chunk = ids[start : start + rows_per_file]
            payload = records_to_json([r for i in chunk for r in by_image[i]])
            content = hashlib.sha256(payload.encode()).hexdigest()
            plan[split].append(
                {
                    "part": part,
                    "image_ids": chunk,
                    "records": payload,
                    "key": _plan_key(split, part, chunk, content),
                }
            )
    report, parts = run_parts(root, plan, CustomParts, {"source_path": source.path}, concurrency)
    if splits is None:
        clear_other_splits(root, chosen)
    report.errors = [dict(e) for e in source.errors] + report.errors
    return _finish(report, root), parts
