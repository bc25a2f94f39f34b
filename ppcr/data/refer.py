"""Loader for the official REFER layout (RefCOCO / RefCOCO+ / RefCOCOg and our synthetic ``synthref``).

Layout::

    <refer_root>/<dataset>/refs(<split_by>).p   pickle: list of ref dicts
    <refer_root>/<dataset>/instances.json       COCO instances (images, annotations, categories)

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
}


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
    """One referred object: an annotation plus the sentences that refer to it."""

    ref_id: int
    ann_id: int
    image_id: int
    split: str
    category_id: int
    sentences: list[Sentence] = field(default_factory=list)


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
        self.refs_path = self.refer_root / dataset / f"refs({split_by}).p"
        self.instances_path = self.refer_root / dataset / "instances.json"
        for p in (self.refs_path, self.instances_path):
            if not p.is_file():
                raise FileNotFoundError(f"REFER file not found: {p}")

        inst = _load_json(self.instances_path)
        try:
            self.images: dict[int, dict] = {int(im["id"]): im for im in inst["images"]}
            self.annotations: dict[int, dict] = {int(a["id"]): a for a in inst["annotations"]}
            self.categories: dict[int, dict] = {int(c["id"]): c for c in inst["categories"]}
        except (KeyError, TypeError) as e:
            raise ReferDataError(self.instances_path, f"not a COCO instances file ({e!r})") from None

        raw_refs = _load_pickle(self.refs_path)
        if not isinstance(raw_refs, list):
            raise ReferDataError(self.refs_path, f"expected a list of refs, got {type(raw_refs).__name__}")
        self._refs = [self._parse_ref(i, r) for i, r in enumerate(raw_refs)]

    def _parse_ref(self, index: int, r: Any) -> ReferRef:
        ref_id = r.get("ref_id") if isinstance(r, dict) else None
        try:
            sentences = [
                Sentence(int(s["sent_id"]), _text(s.get("sent", s.get("raw", "")), f"sentences[{k}].sent"))
                for k, s in enumerate(r["sentences"])
            ]
            ref = ReferRef(
                ref_id=int(r["ref_id"]),
                ann_id=int(r["ann_id"]),
                image_id=int(r["image_id"]),
                split=_text(r["split"], "split"),
                category_id=int(r["category_id"]),
                sentences=sentences,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReferDataError(self.refs_path, f"malformed ref #{index}: {e!r}", ref_id=ref_id) from None
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
