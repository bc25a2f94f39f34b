"""Loader for the official REFER layout (RefCOCO / RefCOCO+ / RefCOCOg and our synthetic ``synthref``) and
the generalized gRefCOCO layout (``grefcoco`` and our synthetic ``synthgref``).

Layout::

    <refer_root>/<dataset>/refs(<split_by>).p   pickle: list of ref dicts
    <refer_root>/<dataset>/instances.json       COCO instances (images, annotations, categories)

Generalized data sets (:data:`GENERALIZED_DATASETS`, ReLA's gRefCOCO) keep their refs in
``grefs(<split_by>).json`` (or ``grefs(<split_by>).p`` when there is no JSON file: where both exist ppcr
reads the JSON, which needs no unpickling, and ReLA's ``grefer.py`` the pickle); a ref's ``ann_id`` and
``category_id`` are lists: several annotations for a multi-target expression, ``[-1]`` (with
``no_target: true``) for an expression that names nothing in the image. A target is the union of its
non-crowd annotations (ReLA's ``grefer.py``); crowd annotations are left out when the shards are built.

Images live elsewhere (COCO ``train2014/``) and are named ``COCO_train2014_%012d.jpg % image_id``.
Note that a ref's own ``file_name`` carries an extra ``_<ann_id>`` suffix and is *not* an image file name.

All RLE work goes through :mod:`ppcr.masks`; masks are ``bool`` arrays of shape ``(H, W)``.
Boxes are XYXY in continuous pixel coordinates (the image spans ``[0, W] x [0, H]``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import InputError
from ..masks import MaskError, bbox_xywh_to_xyxy, segmentation_rle

__all__ = [
    "DATASET_SPLITS",
    "GENERALIZED_DATASETS",
    "NO_TARGET",
    "ReferDataError",
    "ReferDataset",
    "ReferRef",
    "Sentence",
    "coco_image_filename",
    "valid_splits",
]

#: Known (dataset, split_by) combinations and their split names, in canonical order.
DATASET_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("synthref", "unc"): ("train", "val", "testA", "testB"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
    ("synthgref", "unc"): ("train", "val", "testA", "testB"),
}
#: Data sets in the generalized (gRefCOCO) layout: zero, one or several targets per expression.
GENERALIZED_DATASETS: tuple[str, ...] = ("grefcoco", "synthgref")
#: gRefCOCO's ``ann_id`` / ``category_id`` of an expression without a target.
NO_TARGET = -1


class ReferDataError(ValueError):
    """A record in a REFER file (or an image it points to) is unusable.

    The message always names the offending file and the record (``ref_id`` / ``ann_id`` /
    ``image_id``); the pieces are also kept as attributes for structured error reports.
    """

    def __init__(self, path: str | Path, reason: str, **record: Any) -> None:
        self.path = str(path)
        self.reason = reason
        self.record = {k: v for k, v in record.items() if v is not None}
        rec = ", ".join(f"{k}={v}" for k, v in self.record.items())
        super().__init__(f"{self.path}: {reason}" + (f" ({rec})" if rec else ""))


def valid_splits(dataset: str, split_by: str) -> tuple[str, ...]:
    """Split names of a known ``(dataset, split_by)``; InputError (a ValueError) listing the valid
    combinations otherwise, which the CLI prints as one line."""
    try:
        return DATASET_SPLITS[(dataset, split_by)]
    except KeyError:
        choices = ", ".join(f"{d}/{s}" for d, s in DATASET_SPLITS)
        raise InputError(
            f"unknown dataset/split_by {dataset!r}/{split_by!r}; valid choices: {choices}"
        ) from None


def coco_image_filename(image_id: int) -> str:
    """COCO train2014 image file name of ``image_id``, e.g. ``COCO_train2014_000000581857.jpg``."""
    return f"COCO_train2014_{int(image_id):012d}.jpg"


@dataclass(frozen=True)
class Sentence:
    """One referring expression (the normalised ``sent`` field of the REFER pickle)."""

    sent_id: int
    text: str


@dataclass
class ReferRef:
    """One referred object: an annotation plus the sentences that refer to it.

    Generalized data sets: ``ann_ids`` lists every annotation of the target (several for a multi-target
    expression, none when ``no_target``); ``ann_id`` and ``category_id`` are the first ones, ``-1`` (NO_TARGET)
    without a target. Classic data sets: ``ann_ids == (ann_id,)`` and ``no_target`` is False.
    """

    ref_id: int
    ann_id: int
    image_id: int
    split: str
    category_id: int
    sentences: list[Sentence] = field(default_factory=list)
    ann_ids: tuple[int, ...] = ()
    no_target: bool = False

    def __post_init__(self) -> None:
        if not self.ann_ids and not self.no_target:
            self.ann_ids = (self.ann_id,)


def _load_pickle(path: Path) -> Any:
    """The refs pickle. The official ones were written by Python 2, whose ``str`` is bytes: those are
    decoded as UTF-8, strictly, so text is never silently altered (a latin1 fallback would turn "café"
    into "cafÃ©"); bytes that are not UTF-8 raise ReferDataError naming the ref and the field.
    Only load pickles from a trusted source (unpickling runs code)."""
    data = path.read_bytes()
    try:
        return pickle.loads(data, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None
    except Exception as exc:  # a truncated or corrupt file: UnpicklingError, EOFError, ValueError, ...
        raise ReferDataError(path, f"not a readable pickle ({type(exc).__name__}: {exc})") from None


def _first_not_utf8(obj: Any, where: str = "") -> tuple[str, bytes] | None:
    """(field path, value) of the first byte string in ``obj`` that is not UTF-8, depth first."""
    if isinstance(obj, bytes):
        try:
            obj.decode("utf-8")
        except UnicodeDecodeError:
            return where or "value", obj
        return None
    items: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = k.decode("utf-8", "backslashreplace") if isinstance(k, bytes) else str(k)
            items += [(f"{where} key {name!r}".strip(), k), (f"{where}.{name}" if where else name, v)]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
    for field_path, value in items:
        found = _first_not_utf8(value, field_path)
        if found:
            return found
    return None


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> ReferDataError:
    """The error for a pickle holding byte strings that are not UTF-8, naming the ref and field."""
    try:
        refs = pickle.loads(data, encoding="bytes")  # every Python 2 str as bytes, to find the culprit
    except Exception:
        refs = None
    for index, ref in enumerate(refs if isinstance(refs, list) else []):
        found = _first_not_utf8(ref)
        if found:
            field_path, value = found
            ref_id = ref.get(b"ref_id", ref.get("ref_id")) if isinstance(ref, dict) else None
            return ReferDataError(
                path,
                f"ref #{index}: {field_path} is not UTF-8 text: {value!r}; REFER text must be UTF-8",
                ref_id=ref_id,
            )
    return ReferDataError(path, f"text that is not UTF-8 ({exc}); REFER text must be UTF-8")


def _load_json(path: Path) -> Any:
    """A JSON file (RFC 8259: UTF-8), or ReferDataError naming the file and the line of the problem."""
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        reason = f"line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON ({exc})"
    raise ReferDataError(path, reason)


def _id_list(value: Any, what: str) -> list[int]:
    """gRefCOCO's id list (a bare integer is a list of one); ValueError naming ``what`` otherwise."""
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{what} must be a non-empty list of integers; got {value!r}")
    return list(values)


def _text(value: Any, what: str) -> str:
    """A text field as it is: never ``str()`` of bytes or numbers, which would alter it silently."""
    if not isinstance(value, str):
        raise TypeError(f"{what} is {type(value).__name__} {value!r}, not text")
    return value


class ReferDataset:
    """The refs and COCO instances of one REFER dataset (e.g. ``refcoco``/``unc``).

    Attributes:
        dataset, split_by: as given; ``splits``: the valid split names (tuple).
        images: ``image_id -> COCO image dict`` (``id, file_name, height, width``).
        annotations: ``ann_id -> COCO annotation dict``; categories: ``category_id -> dict``.
        refs_path, instances_path: the two files that were loaded.
    """

    def __init__(self, refer_root: str | Path, dataset: str, split_by: str) -> None:
        self.splits: tuple[str, ...] = valid_splits(dataset, split_by)
        self.dataset = dataset
        self.split_by = split_by
        self.refer_root = Path(refer_root)
        self.generalized = dataset in GENERALIZED_DATASETS
        folder = self.refer_root / dataset
        if self.generalized:
            # JSON first: it is what gRefCOCO ships, and reading it runs no code (unpickling does).
            json_refs, pickle_refs = folder / f"grefs({split_by}).json", folder / f"grefs({split_by}).p"
            self.refs_path = json_refs if json_refs.is_file() or not pickle_refs.is_file() else pickle_refs
        else:
            self.refs_path = folder / f"refs({split_by}).p"
        self.instances_path = folder / "instances.json"
        for p in (self.refs_path, self.instances_path):
            if not p.is_file():
                also = f" (nor grefs({split_by}).p)" if self.generalized and p == self.refs_path else ""
                raise FileNotFoundError(f"REFER file not found: {p}{also}")

        inst = _load_json(self.instances_path)
        try:
            self.images: dict[int, dict] = {int(im["id"]): im for im in inst["images"]}
            self.annotations: dict[int, dict] = {int(a["id"]): a for a in inst["annotations"]}
            self.categories: dict[int, dict] = {int(c["id"]): c for c in inst["categories"]}
        except (KeyError, TypeError) as e:
            raise ReferDataError(self.instances_path, f"not a COCO instances file ({e!r})") from None

        if self.refs_path.suffix == ".json":
            raw_refs = _load_json(self.refs_path)
        else:
            raw_refs = _load_pickle(self.refs_path)
        if not isinstance(raw_refs, list):
            raise ReferDataError(self.refs_path, f"expected a list of refs, got {type(raw_refs).__name__}")
        parse = self._parse_gref if self.generalized else self._parse_ref
        self._refs = [parse(i, r) for i, r in enumerate(raw_refs)]
        seen: set[int] = set()
        for ref in self._refs:
            if self.generalized and ref.ref_id in seen:
                raise ReferDataError(self.refs_path, "ref_id appears twice", ref_id=ref.ref_id)
            seen.add(ref.ref_id)

    def _sentences(self, r: dict) -> list[Sentence]:
        return [
            Sentence(int(s["sent_id"]), _text(s.get("sent", s.get("raw", "")), f"sentences[{k}].sent"))
            for k, s in enumerate(r["sentences"])
        ]

    def _parse_ref(self, index: int, r: Any) -> ReferRef:
        ref_id = r.get("ref_id") if isinstance(r, dict) else None
        try:
            ref = ReferRef(
                ref_id=int(r["ref_id"]),
                ann_id=int(r["ann_id"]),
                image_id=int(r["image_id"]),
                split=_text(r["split"], "split"),
                category_id=int(r["category_id"]),
                sentences=self._sentences(r),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReferDataError(self.refs_path, f"malformed ref #{index}: {e!r}", ref_id=ref_id) from None
        return self._check_ref_split(ref)

    def _parse_gref(self, index: int, r: Any) -> ReferRef:
        """A gRefCOCO ref: ``ann_id`` / ``category_id`` lists (``[-1]`` = no target), optional ``no_target``."""
        ref_id = r.get("ref_id") if isinstance(r, dict) else None

        def bad(reason: str) -> ReferDataError:
            return ReferDataError(self.refs_path, f"ref #{index}: {reason}", ref_id=ref_id)

        try:
            ann_ids = _id_list(r["ann_id"], "ann_id")
            cat_ids = _id_list(r["category_id"], "category_id")
            flag = r.get("no_target")
            if flag is not None and not isinstance(flag, bool):
                raise bad(f"no_target must be true or false; got {flag!r}")
            no_target = ann_ids == [NO_TARGET]
            if NO_TARGET in ann_ids and not no_target:
                raise bad(f"ann_id {ann_ids} mixes -1 (no target) with annotation ids")
            if len(set(ann_ids)) != len(ann_ids):
                raise bad(f"ann_id {ann_ids} repeats an annotation")
            if flag is not None and flag != no_target:
                raise bad(f"no_target is {str(flag).lower()} but ann_id is {ann_ids}")
            if no_target and cat_ids != [NO_TARGET]:
                raise bad(f"a ref without target (ann_id [-1]) must have category_id [-1]; got {cat_ids}")
            if not no_target and NO_TARGET in cat_ids:
                raise bad(f"category_id {cat_ids} holds -1 (no target) but ann_id is {ann_ids}")
            ref = ReferRef(
                ref_id=int(r["ref_id"]),
                ann_id=ann_ids[0],
                image_id=int(r["image_id"]),
                split=_text(r["split"], "split"),
                category_id=cat_ids[0],
                sentences=self._sentences(r),
                ann_ids=() if no_target else tuple(ann_ids),
                no_target=no_target,
            )
        except ReferDataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"malformed ref: {e!r}") from None
        return self._check_ref_split(ref)

    def _check_ref_split(self, ref: ReferRef) -> ReferRef:
        if ref.split not in self.splits:
            raise ReferDataError(
                self.refs_path,
                f"split {ref.split!r} is not one of {self.splits} for {self.dataset}/{self.split_by}",
                ref_id=ref.ref_id,
            )
        return ref

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"unknown split {split!r} for {self.dataset}/{self.split_by}; valid splits: {', '.join(self.splits)}"
            )

    def refs(self, split: str | None = None) -> list[ReferRef]:
        """All refs (file order), or those of one split; unknown split -> ValueError naming the valid ones."""
        if split is None:
            return list(self._refs)
        self._check_split(split)
        return [r for r in self._refs if r.split == split]

    def image_ids(self, split: str) -> list[int]:
        """Sorted unique image ids that have at least one ref in ``split``."""
        return sorted({r.image_id for r in self.refs(split)})

    def image_filename(self, image_id: int) -> str:
        """Image file name from instances.json (falls back to the COCO naming scheme)."""
        im = self.images.get(int(image_id))
        if im is None:
            raise ReferDataError(self.instances_path, "image id not in instances.json", image_id=image_id)
        return str(im.get("file_name") or coco_image_filename(image_id))

    def _ann(self, ann_id: int) -> dict:
        ann = self.annotations.get(int(ann_id))
        if ann is None:
            raise ReferDataError(self.instances_path, "annotation id not in instances.json", ann_id=ann_id)
        return ann

    def ann_rle(self, ann_id: int) -> dict:
        """Mask of annotation ``ann_id`` as COCO compressed RLE ``{"size": [h, w], "counts": str}``.

        Polygons are rasterised at the image's size and merged (union); RLE is passed through
        (uncompressed counts are compressed). Both are checked and their work bounded before pycocotools
        runs (`ppcr.masks.segmentation_rle`). Malformed or out-of-bounds data -> ReferDataError naming
        instances.json and the ann id.
        """
        ann = self._ann(ann_id)
        image_id = ann.get("image_id")
        im = self.images.get(int(image_id)) if image_id is not None else None
        if im is None:
            raise ReferDataError(
                self.instances_path, "annotation's image not in instances.json", ann_id=ann_id
            )
        try:
            h, w = int(im["height"]), int(im["width"])
        except (KeyError, TypeError, ValueError) as e:
            raise ReferDataError(
                self.instances_path, f"image without a valid height/width ({e!r})", image_id=image_id
            ) from None
        try:
            return segmentation_rle(ann.get("segmentation"), h, w)
        except MaskError as e:
            raise ReferDataError(self.instances_path, str(e), ann_id=ann_id, image_id=image_id) from None

    def ann_target_info(self, ann_id: int, image_id: int) -> tuple[bool, int]:
        """(is it a crowd annotation, its category id) of ``ann_id``, which must belong to image
        ``image_id``; ReferDataError naming instances.json and the ann id otherwise."""
        ann = self._ann(ann_id)
        if ann.get("image_id") != image_id:
            raise ReferDataError(
                self.instances_path,
                f"annotation belongs to image {ann.get('image_id')!r}, not to the ref's image {image_id}",
                ann_id=ann_id,
            )
        crowd, category = ann.get("iscrowd", 0), ann.get("category_id")
        if crowd not in (0, 1) or isinstance(category, bool) or not isinstance(category, int):
            raise ReferDataError(
                self.instances_path,
                f"iscrowd must be 0 or 1 and category_id an integer; got {crowd!r}, {category!r}",
                ann_id=ann_id,
            )
        return bool(crowd), category

    def ann_bbox_xyxy(self, ann_id: int) -> list[float]:
        """COCO XYWH bbox of ``ann_id`` as ``[x1, y1, x2, y2]`` in continuous pixel coords."""
        ann = self._ann(ann_id)
        try:
            return bbox_xywh_to_xyxy(ann.get("bbox"))
        except MaskError as e:
            raise ReferDataError(
                self.instances_path, f"missing or malformed bbox: {e}", ann_id=ann_id
            ) from None

    def __repr__(self) -> str:
        return (
            f"ReferDataset({self.dataset}/{self.split_by}: {len(self._refs)} refs, "
            f"{len(self.images)} images, {len(self.annotations)} annotations)"
        )
