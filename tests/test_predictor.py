"""The inference API: shapes, frames, image de-duplication and clear errors on bad input."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ppcr.config import InputError
from ppcr.geometry import ImageDecodeError, ImageShapeError
from ppcr.predictor import Segmenter


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        return Segmenter.from_preset("tiny")


def _image(h=150, w=220, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def test_segment_shapes_and_frames(seg):
    img = _image()
    mask, box, score, instances = seg.segment(img, "the red circle")
    assert mask.shape == (150, 220) and mask.dtype == bool
    assert box.shape == (4,)
    assert 0 <= box[0] <= box[2] <= 220 and 0 <= box[1] <= box[3] <= 150
    assert isinstance(score, float)
    # The single-target model answers one instance: the union fields are that instance's, unchanged.
    (one,) = instances
    assert one.mask is mask and one.box is box and one.score == score


def test_accepts_encoded_bytes_and_pil(seg):
    img = _image()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    a = seg.segment(img, "the square")
    b = seg.segment(buf.getvalue(), "the square")
    c = seg.segment(Image.fromarray(img), "the square")
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)
    np.testing.assert_allclose(a.box, b.box, atol=1e-4)


def test_batch_equals_single_and_dedups_images(seg):
    img1, img2 = _image(seed=1), _image(120, 90, seed=2)
    exprs = ["the red circle", "the blue square", "the small triangle"]
    batch = seg.segment_batch([img1, img1, img2], exprs)
    singles = [seg.segment(i, e) for i, e in zip([img1, img1, img2], exprs)]
    for b, s in zip(batch, singles):
        assert np.array_equal(b.mask, s.mask)
        np.testing.assert_allclose(b.box, s.box, atol=1e-4)
        assert abs(b.score - s.score) < 1e-4


def test_set_image_then_predict_matches_segment(seg):
    img = _image(seed=3)
    seg.set_image(img)
    many = seg.predict(["the red circle", "the big square"])
    one = seg.segment(img, "the big square")
    assert np.array_equal(many[1].mask, one.mask)
    np.testing.assert_allclose(many[1].box, one.box, atol=1e-4)


@pytest.mark.parametrize(
    "image, expression, error, match",
    [
        (b"", "the circle", ImageDecodeError, "empty"),
        (b"not an image at all", "the circle", ImageDecodeError, "cannot decode"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "the circle", ValueError, "H×W×3 or H×W×4 image array"),
        (np.zeros((10, 10, 3), dtype=np.float32), "the circle", ValueError, "unsupported image array dtype"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "the circle", ValueError, "10x0 has a side under 1 pixel"),
        (np.zeros((1, 512, 3), dtype=np.uint8), "the circle", ImageShapeError, "512x1 has an aspect ratio"),
        (np.zeros((10, 10, 3), dtype=np.uint8), "   ", ValueError, "expression is empty"),
        (np.zeros((10, 10, 3), dtype=np.uint8), "the [SEG] thing", ValueError, "reserved token"),
    ],
)
def test_bad_inputs_raise_clear_errors(seg, image, expression, error, match):
    with pytest.raises(error, match=match):
        seg.segment(image, expression)


TEXT_KINDS = [
    ("the cup \udc00", "lone surrogate U+DC00"),  # not encodable: the tokenizer raised TypeError before
    ("the\x00cup", "control character U+0000"),
    ("the cup </s> on the left", "'</s>', a control token"),  # became an EOS id in the user's turn
    ("a " * 1525, "context holds 512"),  # 3,050 characters: a mask came back, silently, before
]


@pytest.mark.parametrize("text,match", TEXT_KINDS, ids=["surrogate", "control", "eos", "over-context"])
def test_bad_texts_are_refused_before_any_model_work(seg, monkeypatch, text, match):
    img = _image(seed=4)
    seg.set_image(img)

    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran on a bad text")

    monkeypatch.setattr(seg.model, "forward", no_model_work)
    monkeypatch.setattr(seg.model, "reason", no_model_work)
    with pytest.raises(InputError, match=re.escape(match)):
        seg.segment(img, text)
    with pytest.raises(InputError, match=rf"expression 1: .*{re.escape(match)}"):
        seg.segment_batch([img, img], ["the red circle", text])
    with pytest.raises(InputError, match=re.escape(match)):
        seg.predict(["the red circle", text])


def test_predict_without_image_is_an_error():
    with pytest.warns(UserWarning):
        fresh = Segmenter.from_preset("tiny")
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict("the circle")


def test_mismatched_batch_lengths(seg):
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        seg.segment_batch([_image(), _image()], ["x"])


def test_a_16bit_image_gives_the_same_mask_whichever_way_it_arrives(seg, tmp_path):
    # Before: bytes were scaled to 0..255, a PIL image clipped to 255 everywhere (IoU 0 between the two).
    cam = skimage.data.camera()[::4, ::4]  # 128 x 128, a real photograph
    cam16 = cam.astype(np.uint16) * 257
    path = tmp_path / "camera16.png"
    Image.fromarray(cam16).save(path)
    eight_bit = seg.segment(np.repeat(cam[..., None], 3, axis=2), "the man")
    with Image.open(path) as im:
        assert im.mode == "I;16"
        ways = {"bytes": path.read_bytes(), "PIL": im, "path": path, "URI": path.as_uri(), "array": cam16}
        results = {way: seg.segment(image, "the man") for way, image in ways.items()}
    assert eight_bit.mask.any() and not eight_bit.mask.all()  # a mask that can differ
    for way, r in results.items():
        assert np.array_equal(r.mask, eight_bit.mask), way
        np.testing.assert_allclose(r.box, eight_bit.box, atol=1e-4, err_msg=way)


def test_a_thin_strip_is_refused_up_front_with_one_message(seg, tmp_path):
    # Before: "height and width must be > 0" from inside SAM's resize.
    strip = np.full((1, 512, 3), 128, np.uint8)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    messages = set()
    for image in (strip, Image.fromarray(strip), path.read_bytes(), path):
        with pytest.raises(ImageShapeError) as info:
            seg.segment(image, "the line")
        messages.add(str(info.value).split(": ", 1)[1])  # the name differs: "image 0" or the path
    with pytest.raises(ImageShapeError) as info:
        seg.set_image(strip)
    messages.add(str(info.value).split(": ", 1)[1])
    assert messages == {
        "512x1 has an aspect ratio of 512, over 20 (sizes are width x height; images must have sides of "
        "at least 1 pixel(s), a long side at most 20 times the short side and at most 64000000 pixels)"
    }
