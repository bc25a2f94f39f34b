"""Overlay drawing for qualitative results: mask tint, predicted / ground-truth boxes, expression banner.

Coordinates are those of the input image: masks are HxW, boxes pixel XYXY in continuous coordinates
(``[0, 0, 10, 10]`` covers pixels 0..9). The text banner is added *above* the image, so it never hides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .geometry import pil_to_rgb
from .metrics import check_box_xyxy

MASK_COLOR = (255, 40, 40)  # red tint for the predicted mask
# Each object of a several-object answer: the Okabe-Ito palette (safe for colour-blind readers), in
# the web page's order (ppcr/web/page.js PALETTE), so an overlay and the page colour objects alike.
INSTANCE_COLORS = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (0, 0, 0),
)
MASK_ALPHA = 0.5
PRED_BOX_COLOR = (255, 215, 0)  # gold, solid
GT_BOX_COLOR = (0, 230, 64)  # green, dashed and thinner
GT_BOX_UNDER = (20, 20, 20)  # the dark stroke under it
BANNER_BG = (20, 20, 20)
BANNER_FG = (255, 255, 255)
_PAD = 4


def _to_rgb_array(image: Any) -> np.ndarray:
    """HxWx3 uint8 copy of a PIL image (any mode, as the model sees it: geometry.pil_to_rgb) or a
    HxW / HxWx3 / HxWx4 uint8 array."""
    if isinstance(image, Image.Image):
        return pil_to_rgb(image).copy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 (or HxW / HxWx4), got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3]).copy()


def _tint(arr: np.ndarray, mask: Any, color: tuple[int, int, int], name: str) -> None:
    """Tint ``arr`` (HxWx3 uint8, in place) where the HxW ``mask`` is set, and outline it."""
    m = np.asarray(mask)
    if m.shape != arr.shape[:2]:
        raise ValueError(f"{name} shape {m.shape} does not match image shape {arr.shape[:2]}")
    m = m if m.dtype == np.bool_ else m != 0
    tint = np.asarray(color, dtype=np.float32)
    arr[m] = ((1 - MASK_ALPHA) * arr[m].astype(np.float32) + MASK_ALPHA * tint).round().astype(np.uint8)
    # Outline = mask pixels with a 4-neighbour outside the mask; makes thin/low-contrast masks readable.
    p = np.pad(m, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    arr[m & ~interior] = color


def _box_pixels(box: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int] | None:
    """Continuous XYXY -> inclusive pixel rectangle clipped to the image (None if fully outside)."""
    x1, y1, x2, y2 = box
    if x1 >= w or y1 >= h or x2 < 0 or y2 < 0:
        return None
    # Pixel i spans [i, i+1): the last covered pixel is ceil(x2) - 1.
    px1, py1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    px2, py2 = min(w - 1, int(np.ceil(x2)) - 1), min(h - 1, int(np.ceil(y2)) - 1)
    return px1, py1, max(px2, px1), max(py2, py1)  # zero-area boxes still show as a dot / line


def _dashed_rect(draw: ImageDraw.ImageDraw, rect: tuple[int, int, int, int], color, width: int) -> None:
    x1, y1, x2, y2 = rect
    dash, gap = 6, 4
    for (ax, ay), (bx, by) in (
        ((x1, y1), (x2, y1)),
        ((x2, y1), (x2, y2)),
        ((x2, y2), (x1, y2)),
        ((x1, y2), (x1, y1)),
    ):
        length = max(abs(bx - ax), abs(by - ay))
        if length == 0:
            draw.point((ax, ay), fill=color)
            continue
        for s in range(0, length + 1, dash + gap):
            e = min(s + dash, length)
            draw.line(
                [
                    (ax + (bx - ax) * s / length, ay + (by - ay) * s / length),
                    (ax + (bx - ax) * e / length, ay + (by - ay) * e / length),
                ],
                fill=color,
                width=width,
            )


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return float(font.getlength(text)) if hasattr(font, "getlength") else float(font.getbbox(text)[2])


def _wrap(text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line are split by characters."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            cand = f"{line} {word}" if line else word
            if _text_width(font, cand) <= max_width:
                line = cand
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # hard-break an over-long word
                if line and _text_width(font, line + ch) > max_width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def draw_overlay(
    image: Image.Image | np.ndarray,
    mask: np.ndarray | None = None,
    box: Sequence[float] | None = None,
    expression: str = "",
    gt_box: Sequence[float] | None = None,
    score: float | None = None,
    instance_boxes: Sequence[Sequence[float]] = (),
    no_target: bool = False,
    instance_masks: Sequence[np.ndarray] = (),
) -> Image.Image:
    """Draw a prediction on ``image`` and return a new RGB image of the same width.

    ``image``: PIL image or HxWx3 uint8 array. ``mask``: HxW bool (or 0/1) at the image size, tinted
    red semi-transparently with an outline. ``box`` / ``gt_box``: pixel XYXY (continuous), drawn solid
    gold / dashed-thinner green. A several-object answer: ``instance_masks`` (HxW each) are tinted
    one colour each (``INSTANCE_COLORS``, in order) instead of ``mask``'s red, and ``instance_boxes``
    (pixel XYXY each, as many as masks when both are given) are drawn thinner in the same colours
    inside ``box`` (their enclosing box). ``expression`` and ``score`` go on a banner added above the
    image (height grows); ``no_target`` (an answer without any object) adds "no match" to it.

    Raises ValueError for a mask of another shape than the image, a box that is not XYXY with x1 <= x2
    and y1 <= y2, or as many instance masks as boxes not matching.
    """
    arr = _to_rgb_array(image)
    h, w = arr.shape[:2]
    if instance_masks and instance_boxes and len(instance_masks) != len(instance_boxes):
        raise ValueError(
            f"instance_masks has {len(instance_masks)} masks but instance_boxes {len(instance_boxes)} boxes"
        )

    if instance_masks:
        for i, m in enumerate(instance_masks):
            _tint(arr, m, INSTANCE_COLORS[i % len(INSTANCE_COLORS)], f"instance_masks[{i}]")
    elif mask is not None:
        _tint(arr, mask, MASK_COLOR, "mask")

    canvas = Image.fromarray(arr)
    draw = ImageDraw.Draw(canvas)
    thick = max(2, round(min(w, h) / 150))
    if gt_box is not None:
        rect = _box_pixels(check_box_xyxy(gt_box, "gt_box"), w, h)
        if rect is not None:
            # A dark stroke under the green dashes keeps them visible on green objects.
            _dashed_rect(draw, rect, GT_BOX_UNDER, max(1, thick // 2) + 2)
            _dashed_rect(draw, rect, GT_BOX_COLOR, max(1, thick // 2))
    if box is not None:
        rect = _box_pixels(check_box_xyxy(box, "box"), w, h)
        if rect is not None:
            draw.rectangle(rect, outline=PRED_BOX_COLOR, width=thick)
    for i, b in enumerate(instance_boxes):
        rect = _box_pixels(check_box_xyxy(b, f"instance_boxes[{i}]"), w, h)
        if rect is not None:
            color = INSTANCE_COLORS[i % len(INSTANCE_COLORS)]
            draw.rectangle(rect, outline=color, width=max(1, thick // 2))

    text = expression.strip()
    if no_target:
        text = f"{text}  (no match)" if text else "no match"
    if score is not None:
        text = f"{text}  (score {score:.3f})" if text else f"score {score:.3f}"
    if not text:
        return canvas

    font = _font()
    lines = _wrap(text, font, max(1, w - 2 * _PAD))
    asc_desc = font.getbbox("Ag")
    line_h = int(asc_desc[3] - min(0, asc_desc[1])) + 2
    banner_h = len(lines) * line_h + 2 * _PAD
    out = Image.new("RGB", (w, h + banner_h), BANNER_BG)
    bd = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        bd.text((_PAD, _PAD + i * line_h), line, fill=BANNER_FG, font=font)
    out.paste(canvas, (0, banner_h))
    return out


def save_overlay(path: str | Path, **kwargs: Any) -> Path:
    """:func:`draw_overlay` (same keyword arguments) and save to ``path`` (parent dirs created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(**kwargs).save(p)
    return p
