"""Tests for ppcr.visualize: canvas size, mask tint, untouched background, shape checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ppcr.visualize import draw_overlay, save_overlay


def _image(h: int = 60, w: int = 80) -> np.ndarray:
    return np.full((h, w, 3), 128, dtype=np.uint8)


def test_size_without_and_with_banner() -> None:
    img = _image()
    plain = draw_overlay(img)
    assert plain.mode == "RGB" and plain.size == (80, 60)
    out = draw_overlay(Image.fromarray(img), expression="the man on the left " * 10, score=0.87)
    assert out.width == 80 and out.height > 60
    # Long text wraps into several lines: the banner is taller than one line of the default font.
    one_line = draw_overlay(img, expression="man")
    assert out.height > one_line.height > 60


def test_mask_tinted_and_far_pixels_unchanged() -> None:
    img = _image()
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:30, 10:30] = True
    out = draw_overlay(img, mask=mask, box=[8, 8, 32, 32], gt_box=[5, 5, 35, 35], expression="a red square")
    arr = np.asarray(out)
    banner = arr.shape[0] - 60
    assert banner > 0
    body = arr[banner:]
    assert body.shape == img.shape
    assert not np.array_equal(body[20, 20], img[20, 20])  # inside mask: tinted
    assert np.array_equal(body[50, 70], img[50, 70])  # far from mask and boxes: untouched
    assert np.array_equal(body[45:, 45:], img[45:, 45:])
    # The predicted box outline is drawn on its border.
    assert not np.array_equal(body[8, 20], img[8, 20])


def test_uint8_mask_and_box_only() -> None:
    img = _image()
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[0:5, 0:5] = 1
    arr = np.asarray(draw_overlay(img, mask=mask))
    assert not np.array_equal(arr[2, 2], img[2, 2])
    arr = np.asarray(draw_overlay(img, box=[40, 20, 60, 40]))
    assert not np.array_equal(arr[20, 50], img[20, 50])  # top edge of the box
    assert np.array_equal(arr[30, 50], img[30, 50])  # box interior is not filled


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"\(60, 81\).*\(60, 80\)"):
        draw_overlay(_image(), mask=np.zeros((60, 81), dtype=bool))
    with pytest.raises(ValueError):
        draw_overlay(_image(), box=[10, 10, 5, 5])
    with pytest.raises(ValueError):
        draw_overlay(np.zeros((4, 4, 2), dtype=np.uint8))


def test_save_overlay(tmp_path) -> None:
    p = save_overlay(tmp_path / "sub" / "o.png", image=_image(), expression="x", score=0.5)
    with Image.open(p) as im:
        assert im.width == 80 and im.height > 60


def test_no_match_and_several_instances() -> None:
    img = _image()
    # No target: the banner says so (it is not the same banner as the expression's alone).
    plain, none = (
        draw_overlay(img, expression="the cat"),
        draw_overlay(img, expression="the cat", no_target=True),
    )
    assert none.size[0] == plain.size[0] and not np.array_equal(np.asarray(none), np.asarray(plain))
    assert np.array_equal(np.asarray(draw_overlay(img, no_target=True))[-60:], img)  # only a banner
    # Several: each instance's box is drawn inside the enclosing one.
    enclosing = draw_overlay(img, box=[5, 5, 75, 55])
    both = np.asarray(
        draw_overlay(img, box=[5, 5, 75, 55], instance_boxes=[[10, 10, 30, 30], [40, 20, 70, 50]])
    )
    assert not np.array_equal(both[10, 10:30], img[10, 10:30])  # the first instance's top edge
    assert not np.array_equal(both, np.asarray(enclosing))
    with pytest.raises(ValueError, match=r"instance_boxes\[1\]"):
        draw_overlay(img, instance_boxes=[[1, 1, 5, 5], [5, 5, 1, 1]])


def test_several_instances_get_one_colour_each() -> None:
    from ppcr.visualize import INSTANCE_COLORS, MASK_COLOR

    img = _image()
    a, b = np.zeros((60, 80), dtype=bool), np.zeros((60, 80), dtype=bool)
    a[10:30, 10:30], b[20:50, 40:70] = True, True
    out = np.asarray(draw_overlay(img, mask=a | b, instance_masks=[a, b]))
    # Outlines take each instance's colour (not the single-answer red), in the web page's order.
    assert tuple(out[10, 15]) == INSTANCE_COLORS[0] and tuple(out[20, 55]) == INSTANCE_COLORS[1]
    assert not (out == np.asarray(MASK_COLOR, dtype=np.uint8)).all(axis=-1).any()
    assert tuple(out[55, 5]) == (128, 128, 128)  # background untouched
    boxes = np.asarray(draw_overlay(img, instance_boxes=[[10, 10, 30, 30], [40, 20, 70, 50]]))
    assert tuple(boxes[10, 20]) == INSTANCE_COLORS[0] and tuple(boxes[20, 55]) == INSTANCE_COLORS[1]
    with pytest.raises(ValueError, match="instance_masks has 2 masks but instance_boxes 1 boxes"):
        draw_overlay(img, instance_masks=[a, b], instance_boxes=[[1, 1, 5, 5]])
    with pytest.raises(ValueError, match=r"instance_masks\[1\] shape"):
        draw_overlay(img, instance_masks=[a, np.zeros((5, 5), dtype=bool)])


def test_instance_colours_are_the_web_pages() -> None:
    """An overlay and the page colour the objects of one answer alike."""
    import re
    from pathlib import Path

    import ppcr
    from ppcr.visualize import INSTANCE_COLORS

    js = (Path(ppcr.__file__).parent / "web" / "page.js").read_text()
    palette = re.search(r"const PALETTE = \[([^\]]*)\]", js).group(1)
    page = [
        tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in re.findall(r"#([0-9A-Fa-f]{6})", palette)
    ]
    assert page == list(INSTANCE_COLORS)
