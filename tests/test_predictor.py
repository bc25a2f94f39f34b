"""The inference API: shapes, frames, image de-duplication and clear errors on bad input."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ppcr.config import InputError
from ppcr.geometry import ImageDecodeError
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
    mask, box, score = seg.segment(img, "the red circle")
    assert mask.shape == (150, 220) and mask.dtype == bool
    assert box.shape == (4,)
    assert 0 <= box[0] <= box[2] <= 220 and 0 <= box[1] <= box[3] <= 150
    assert isinstance(score, float)


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
        (np.zeros((10, 10), dtype=np.uint8), "the circle", ValueError, "H×W×3 uint8"),
        (np.zeros((10, 10, 3), dtype=np.float32), "the circle", ValueError, "H×W×3 uint8"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "the circle", ValueError, "zero-size"),
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
