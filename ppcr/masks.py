"""Masks <-> COCO RLE, the one codec: annotations, training targets, answers and metrics all go through it.

`encode_mask` / `decode_rle` turn a bool (H, W) mask into COCO compressed RLE and back (the shards'
masks, the Serve answers, the batch job's rows, the evaluator's records). The rest of this module turns
annotation geometry (polygons, RLE, PNG masks) into the shard's RLE.

Annotation files are untrusted input. pycocotools' C code trusts what it is given: a polygon is
rasterised along its whole boundary (``rleFrPoly``: about 20 bytes per boundary point, five points per
pixel of perimeter, so coordinates of 3.5e8 on a 512×512 image ask for ~20 GiB), and RLE counts are
decoded without a bounds check (``rleDecode``: counts summing past ``h*w`` write past the mask buffer).
So every annotation is checked here *before* pycocotools sees it, and the work it may cause is bounded:

- polygons: finite numbers, an even count >= 6 (3 points), every point within one image size of the
  image (``[-m, W + m] × [-m, H + m]`` with ``m = max(H, W)``; points outside the image are legal and
  clipped exactly by pycocotools, points farther out are refused rather than clipped: clipping a
  polygon changes its pixels), and at most :data:`MAX_BOUNDARY_POINTS` boundary points per annotation
  (counted exactly as ``rleFrPoly`` counts them, before it allocates them);
- RLE: ``size == [H, W]``; counts non-negative integers summing to exactly ``H * W`` (compressed strings
  are parsed as ``rleFrString`` parses them, to check that sum);
- PNG masks: a PNG of exactly the image's size (checked from the header, before decoding).

Callers (``ReferDataset.ann_rle``, ``ppcr.data.custom``) catch :class:`MaskError` and name the file and
record. Masks are ``bool (H, W)``; RLE is COCO's (column-major runs starting with zeros, docs/shard_format.md);
boxes are XYXY in continuous pixel coordinates.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "MAX_BOUNDARY_POINTS",
    "MaskError",
    "bbox_xywh_to_xyxy",
    "decode_rle",
    "encode_mask",
    "png_mask_rle",
    "polygon_boundary_points",
    "rle_bbox_xyxy",
    "rle_string_counts",
    "segmentation_rle",
]

#: Upper bound on the boundary points pycocotools' ``rleFrPoly`` allocates for one annotation (the sum
#: over its polygons). ~20 bytes each: 2**23 points is ~170 MB of work memory. A polygon tracing the
#: border of a 640×480 image has ~11,000; of an 8000×8000 image ~160,000.
MAX_BOUNDARY_POINTS = 2**23

_POLY_SCALE = 5  # rleFrPoly upsamples coordinates by 5 before tracing the boundary


def _counts_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


def decode_rle(rle: dict) -> np.ndarray:
    """Decode a COCO RLE ``{"size": [h, w], "counts": str | bytes | list[int]}`` to a bool ``(h, w)`` mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE -> compressed first
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        compressed = {"size": [h, w], "counts": _counts_bytes(counts)}
    return mask_utils.decode(compressed).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """Encode a bool ``(h, w)`` mask as COCO compressed RLE ``{"size": [h, w], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects a 2-D (H, W) mask, got shape {mask.shape}")
    # pycocotools reads column-major memory; a C-ordered array would silently encode the transpose.
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


class MaskError(ValueError):
    """An annotation's mask is unusable; the message says why (the caller adds the file and record)."""


def _check_size(height: int, width: int) -> tuple[int, int]:
    from .geometry import MAX_PIXELS  # the image limit: a mask is never larger than its image

    h, w = int(height), int(width)
    if h < 1 or w < 1:
        raise MaskError(f"image size {h}x{w} (HxW) is empty")
    if h * w > MAX_PIXELS:
        raise MaskError(f"image size {h}x{w} (HxW) exceeds {MAX_PIXELS} pixels")
    return h, w


def polygon_boundary_points(coords: np.ndarray) -> int:
    """Boundary points pycocotools' ``rleFrPoly`` traces for one polygon ``[x1, y1, x2, y2, ...]`` (pixels).

    The exact count it allocates (``maskApi.c``: points scaled by 5 and truncated, then per closed edge
    ``max(|dx|, |dy|) + 1``), computed in int64 without allocating the points.
    """
    xy = np.trunc(_POLY_SCALE * np.asarray(coords, dtype=np.float64).reshape(-1, 2) + 0.5).astype(np.int64)
    d = np.abs(xy - np.roll(xy, -1, axis=0))
    return int(np.maximum(d[:, 0], d[:, 1]).sum() + len(xy))


def _polygons(seg: list, h: int, w: int) -> list[list[float]]:
    if not seg:
        raise MaskError("empty polygon list")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seg):
        raise MaskError(
            f"polygons must be a list of polygons [[x1, y1, x2, y2, ...], ...]; got a flat list of {len(seg)} numbers"
        )
    margin = max(h, w)
    lo_x, hi_x, lo_y, hi_y = -margin, w + margin, -margin, h + margin
    polys: list[list[float]] = []
    work = 0
    for k, poly in enumerate(seg):
        if not isinstance(poly, (list, tuple)):
            raise MaskError(f"polygon {k} is not a list of numbers")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in poly):
            raise MaskError(f"polygon {k} has non-numeric coordinates")
        coords = np.asarray(poly, dtype=np.float64)
        if len(coords) < 6 or len(coords) % 2:
            raise MaskError(f"malformed polygon {k}: {len(coords)} numbers (need an even count >= 6)")
        if not np.all(np.isfinite(coords)):
            raise MaskError(f"malformed polygon {k}: non-finite coordinate")
        xs, ys = coords[0::2], coords[1::2]
        outside = (xs < lo_x) | (xs > hi_x) | (ys < lo_y) | (ys > hi_y)
        if outside.any():
            i = int(np.argmax(outside))
            raise MaskError(
                f"polygon {k}: point {i} ({xs[i]:g}, {ys[i]:g}) is far outside the {w}x{h} (WxH) image "
                f"(points must lie within [{lo_x}, {hi_x}] x [{lo_y}, {hi_y}]: pixel coordinates of this image)"
            )
        work += polygon_boundary_points(coords)
        if work > MAX_BOUNDARY_POINTS:
            raise MaskError(
                f"polygons up to {k} trace {work} boundary points when rasterised, over the limit of "
                f"{MAX_BOUNDARY_POINTS} per annotation (a perimeter far longer than any object of this image)"
            )
        polys.append(coords.tolist())
    return polys


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string, parsed exactly as pycocotools' ``rleFrString`` does.

    Used to validate a string before pycocotools decodes it (its decoder has no bounds check). Raises
    MaskError on a character outside the alphabet, a truncated value, or a negative run.
    """
    s = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise MaskError("RLE counts string is truncated (its last value is incomplete)")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise MaskError(f"RLE counts string has an invalid character {chr(s[p])!r} at {p}")
            if k >= 7:  # 7 groups of 5 bits hold any uint32 run; more is not a valid count
                raise MaskError(f"RLE counts string has an over-long value at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:  # rleFrString's delta coding applies from the fourth value on
            x += out[-2]
        if x < 0:
            raise MaskError(f"RLE counts string decodes to a negative run ({x}) at value {len(out)}")
        out.append(x)
    return out


def _rle(seg: dict, h: int, w: int) -> dict:
    unknown = set(seg) - {"size", "counts"}
    if unknown:
        raise MaskError(f"RLE has unknown keys {sorted(unknown)} (expected size, counts)")
    size = seg.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise MaskError(f"RLE size must be [height, width] integers; got {size!r}")
    if list(size) != [h, w]:
        raise MaskError(f"RLE size {list(size)} != image size [{h}, {w}]")
    counts = seg.get("counts")
    if isinstance(counts, list):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in counts):
            raise MaskError("RLE counts list must hold integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        runs = rle_string_counts(counts)
    else:
        raise MaskError(f"RLE counts of unsupported type {type(counts).__name__}")
    if any(v < 0 for v in runs):
        raise MaskError("RLE counts must not be negative")
    total = sum(runs)
    if total != h * w:
        raise MaskError(f"RLE counts sum to {total}, not height*width = {h * w}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}


def _as_output(rle: dict, h: int, w: int) -> dict:
    counts = rle["counts"]
    return {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO ``segmentation`` -> compressed RLE ``{"size": [H, W], "counts": str}`` of an H×W image.

    ``segmentation``: polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixel coordinates (rasterised exactly as
    pycocotools does, merged into one mask), or RLE ``{"size": [H, W], "counts": str | bytes | list[int]}``
    (compressed or uncompressed; re-emitted compressed). Source: the COCO data format
    (cocodataset.org/#format-data) and pycocotools' ``maskApi.c``. Every bound in the module docstring is
    checked before pycocotools runs; a violation raises MaskError naming the polygon/point or the field.
    """
    h, w = _check_size(height, width)
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(_polygons(segmentation, h, w), h, w))
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise MaskError(f"RLE must have size and counts; got keys {sorted(segmentation)}")
        rle = _rle(segmentation, h, w)
    else:
        raise MaskError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return _as_output(rle, h, w)


def png_mask_rle(data: bytes, height: int, width: int, name: str = "mask") -> dict:
    """A PNG mask file -> compressed RLE ``{"size": [H, W], "counts": str}``; non-zero pixels are the object.

    Non-zero means any channel of the stored value (palette PNGs: the palette index), read without any
    conversion. The PNG must be exactly W×H (checked from its header before decoding), carry no EXIF
    rotation, and be a PNG (a lossy JPEG mask would add artefacts to the object). MaskError otherwise.
    """
    from PIL import Image

    h, w = _check_size(height, width)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise MaskError(f"{name}: mask file is {im.format or 'not an image'}, not PNG")
            if im.size != (w, h):
                raise MaskError(
                    f"{name}: mask PNG is {im.size[0]}x{im.size[1]}, image is {w}x{h} (WxH); "
                    "a mask must have its image's size"
                )
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            if orientation not in (None, 1):
                raise MaskError(
                    f"{name}: mask PNG has EXIF orientation {orientation}; save it without rotation"
                )
            arr = np.asarray(im)
    except MaskError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise MaskError(f"{name}: mask PNG does not decode ({type(exc).__name__}: {exc})") from None
    fg = arr != 0 if arr.ndim == 2 else np.any(arr != 0, axis=2)
    rle = mask_utils.encode(np.asfortranarray(fg.astype(np.uint8)))
    return _as_output(rle, h, w)


def rle_bbox_xyxy(rle: dict) -> list[float]:
    """Tight box of a compressed RLE's foreground, XYXY continuous pixels (``[0, 0, 0, 0]`` when empty)."""
    counts = rle["counts"]
    x, y, bw, bh = (
        float(v)
        for v in mask_utils.toBbox(
            {"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
        )
    )
    return [x, y, x + bw, y + bh]


def bbox_xywh_to_xyxy(bbox: Sequence[Any]) -> list[float]:
    """COCO ``[x, y, w, h]`` (pixels) -> ``[x1, y1, x2, y2]``; MaskError unless 4 finite numbers, w, h >= 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise MaskError(f"bbox must be [x, y, width, height]; got {bbox!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox):
        raise MaskError(f"bbox must hold numbers; got {bbox!r}")
    x, y, bw, bh = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw < 0 or bh < 0:
        raise MaskError(f"invalid bbox {[x, y, bw, bh]} (XYWH: finite, width and height >= 0)")
    return [x, y, x + bw, y + bh]
