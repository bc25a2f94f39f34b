"""Frame conversions (original / normalized / SAM / CLIP square), preprocessing and image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from ppcr import geometry
from ppcr.geometry import (
    CLIP_MEAN,
    CLIP_STD,
    SAM_MEAN,
    SAM_STD,
    ImageDecodeError,
    as_rgb_array,
    clip_preprocess,
    clip_square_to_normalized,
    decode_image,
    denormalize_box,
    grid_centers,
    mask_to_box,
    normalize_box,
    normalized_to_clip_square,
    normalized_to_sam_frame,
    order_box,
    sam_input_size,
    sam_preprocess,
)


def _rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- SAM frame -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(100, 200), (200, 100), (427, 640), (640, 427), (37, 301), (128, 128)])
@pytest.mark.parametrize("sam_size", [128, 1024])
def test_normalized_to_sam_frame_matches_segment_anything(hw, sam_size):
    h, w = hw
    gen = torch.Generator().manual_seed(h * 7 + w)
    box01 = order_box(torch.rand(5, 4, generator=gen, dtype=torch.float64))
    pixel = denormalize_box(box01, hw)
    expected = ResizeLongestSide(sam_size).apply_boxes_torch(pixel, (h, w))
    got = normalized_to_sam_frame(box01, hw, sam_size)
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=1e-4)


def test_sam_input_size_long_side():
    assert sam_input_size((100, 200), 128) == (64, 128)
    assert sam_input_size((200, 100), 128) == (128, 64)
    assert sam_input_size((640, 427), 1024) == ResizeLongestSide.get_preprocess_shape(640, 427, 1024)


def test_full_box_fills_resized_region_in_sam_frame():
    got = normalized_to_sam_frame(torch.tensor([0.0, 0.0, 1.0, 1.0]), (100, 200), 128)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 128.0, 64.0]))


# --- normalized <-> pixel ----------------------------------------------------------------------------


def test_normalize_denormalize_round_trip_numpy_and_torch():
    hw = (123, 457)
    box = np.array([10.5, 3.0, 400.25, 120.0])
    n = normalize_box(box, hw)
    np.testing.assert_allclose(n, [10.5 / 457, 3.0 / 123, 400.25 / 457, 120.0 / 123])
    np.testing.assert_allclose(denormalize_box(n, hw), box)
    t = torch.tensor(box, dtype=torch.float64)
    torch.testing.assert_close(denormalize_box(normalize_box(t, hw), hw), t)
    assert isinstance(normalize_box(t, hw), torch.Tensor)


# --- CLIP square frame -------------------------------------------------------------------------------


def test_clip_square_round_trip():
    gen = torch.Generator().manual_seed(0)
    box = order_box(torch.rand(6, 4, generator=gen, dtype=torch.float64)).float()
    hw = torch.tensor([[100, 200], [200, 100], [50, 50], [480, 640], [640, 480], [37, 301]])
    sq = normalized_to_clip_square(box, hw)
    torch.testing.assert_close(clip_square_to_normalized(sq, hw), box, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalized_to_clip_square(clip_square_to_normalized(sq, hw), hw), sq)


def test_full_image_box_in_clip_square_is_centred_padded_region():
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    # 100 high x 200 wide: square side 200, 50 px of padding above and below.
    # 200 high x 100 wide: 50 px of padding left and right.
    hw = torch.tensor([[100, 200], [200, 100]])
    sq = normalized_to_clip_square(full, hw)
    torch.testing.assert_close(sq, torch.tensor([[0.0, 0.25, 1.0, 0.75], [0.25, 0.0, 0.75, 1.0]]))
    # A square image has no padding.
    torch.testing.assert_close(
        normalized_to_clip_square(full[:1], torch.tensor([[64, 64]])), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    )


def test_clip_square_point_inside_image():
    # The centre of the left half of a 100x200 image: pixel (50, 50) -> square (50, 100)/200.
    box = torch.tensor([[0.25, 0.5, 0.25, 0.5]])
    sq = normalized_to_clip_square(box, torch.tensor([[100, 200]]))
    torch.testing.assert_close(sq, torch.tensor([[0.25, 0.5, 0.25, 0.5]]))
    box = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    sq = normalized_to_clip_square(box, torch.tensor([[100, 200]]))
    torch.testing.assert_close(sq, torch.tensor([[0.25, 0.375, 0.25, 0.375]]))


def test_grid_centers():
    c = grid_centers(2)
    torch.testing.assert_close(c, torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    assert grid_centers(8).shape == (64, 2)


# --- preprocessing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(60, 90), (90, 60)])
def test_sam_preprocess_shape_and_zero_padding(hw):
    s = 128
    img = _rand_image(*hw)
    x = sam_preprocess(img, s)
    assert x.shape == (3, s, s) and x.dtype == torch.float32
    h, w = sam_input_size(hw, s)
    assert max(h, w) == s
    # Padding (right/bottom) is zeros after normalisation, as SAM's own preprocess pads.
    assert torch.count_nonzero(x[:, h:, :]) == 0
    assert torch.count_nonzero(x[:, :, w:]) == 0
    # The image region is the resized image normalised with SAM's mean/std.
    resized = torch.from_numpy(ResizeLongestSide(s).apply_image(img)).permute(2, 0, 1).float()
    expected = (resized - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    torch.testing.assert_close(x[:, :h, :w], expected)


def test_clip_preprocess_shape_and_mean_padding():
    img = np.full((100, 200, 3), 255, dtype=np.uint8)
    x = clip_preprocess(img, 112)
    assert x.shape == (3, 112, 112)
    # Rows well inside the top padding band (rows 0..27 of 112) are the CLIP mean -> ~0 after normalising.
    assert x[:, :20].abs().max() < 0.02
    assert x[:, -20:].abs().max() < 0.02
    # The image rows are white.
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 56, 56], white, atol=1e-3, rtol=0)


# --- decoding ----------------------------------------------------------------------------------------


def test_decode_rgb_png_exact():
    img = _rand_image(30, 40)
    out = decode_image(_encode(Image.fromarray(img), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, img)


def test_decode_empty_bytes():
    with pytest.raises(ImageDecodeError, match="photo_7.jpg"):
        decode_image(b"", name="photo_7.jpg")


def test_decode_garbage_bytes():
    with pytest.raises(ImageDecodeError, match="garbage.png"):
        decode_image(b"this is definitely not an image" * 10, name="garbage.png")


def test_decode_truncated_jpeg():
    data = _encode(Image.fromarray(_rand_image(64, 64)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(data[: len(data) // 2], name="cut.jpg")


def test_image_decode_error_is_value_error():
    assert issubclass(ImageDecodeError, ValueError)


def test_decode_too_many_pixels(monkeypatch):
    monkeypatch.setattr(geometry, "MAX_PIXELS", 100)
    data = _encode(Image.fromarray(_rand_image(20, 20)), "PNG")
    with pytest.raises(ImageDecodeError, match="big.png.*exceeds"):
        decode_image(data, name="big.png")


def test_decode_pixel_limit_argument_checks_header_before_decoding():
    data = _encode(Image.fromarray(_rand_image(20, 20)), "PNG")
    with pytest.raises(geometry.ImageTooLargeError, match="20x20 exceeds 399 pixels"):
        decode_image(data, max_pixels=399)
    assert decode_image(data, max_pixels=400).shape == (20, 20, 3)
    # A decompression bomb: a 15000x15000 PNG of zeros is ~200 kB; refused from its header (PIL's own
    # guard fires first at this size, and reads the same to the caller).
    bomb = _encode(Image.new("1", (15000, 15000)), "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(geometry.ImageTooLargeError, match="bomb.png.*225000000 pixels"):
        decode_image(bomb, name="bomb.png")


def test_decode_refuses_float_mode_instead_of_clipping_to_black():
    arr = np.random.default_rng(3).random((10, 12)).astype(np.float32)
    with pytest.raises(ImageDecodeError, match="f.tif.*unsupported image mode 'F'"):
        decode_image(_encode(Image.fromarray(arr), "TIFF"), name="f.tif")


@pytest.mark.parametrize("mode", ["CMYK", "1", "P", "LA", "I"])
def test_decode_converts_other_modes_to_rgb(mode):
    img = Image.fromarray(_rand_image(14, 18))
    src = img.convert("L").convert("I") if mode == "I" else img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I" else "PNG"
    out = decode_image(_encode(src, fmt))
    assert out.shape == (14, 18, 3) and out.dtype == np.uint8


def test_decode_grayscale():
    gray = np.random.default_rng(1).integers(0, 256, size=(25, 35), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert out.shape == (25, 35, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_decode_rgba():
    rgba = np.random.default_rng(2).integers(0, 256, size=(25, 35, 4), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out.shape == (25, 35, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_decode_16bit_png():
    arr = np.zeros((10, 12), dtype=np.uint16)
    arr[0, 0] = 65535
    arr[1, 1] = 32768
    data = _encode(Image.fromarray(arr), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")  # really a 16-bit PNG
    out = decode_image(data)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[2, 2].tolist() == [0, 0, 0]
    assert 120 <= int(out[1, 1, 0]) <= 135


def test_decode_applies_exif_orientation():
    img = _rand_image(20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(Image.fromarray(img), "JPEG", exif=exif)
    out = decode_image(data)
    assert out.shape == (50, 20, 3)


def test_as_rgb_array_validates():
    img = _rand_image(5, 6)
    assert as_rgb_array(img) is img
    np.testing.assert_array_equal(as_rgb_array(Image.fromarray(img)), img)
    np.testing.assert_array_equal(as_rgb_array(_encode(Image.fromarray(img), "PNG")), img)
    with pytest.raises(ValueError, match="arr"):
        as_rgb_array(img.astype(np.float32), name="arr")
    with pytest.raises(ValueError, match="H×W×3"):
        as_rgb_array(img[..., 0])
    with pytest.raises(ValueError, match="zero-size"):
        as_rgb_array(np.zeros((0, 4, 3), np.uint8))


# --- boxes -------------------------------------------------------------------------------------------


def test_mask_to_box():
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:30, 20:50] = True
    np.testing.assert_array_equal(mask_to_box(mask), [20, 10, 50, 30])
    single = np.zeros((5, 5), dtype=bool)
    single[2, 3] = True
    np.testing.assert_array_equal(mask_to_box(single), [3, 2, 4, 3])
    np.testing.assert_array_equal(mask_to_box(np.zeros((5, 5), dtype=bool)), [0, 0, 0, 0])
    full = np.ones((7, 9), dtype=bool)
    np.testing.assert_array_equal(normalize_box(mask_to_box(full), (7, 9)), [0, 0, 1, 1])


def test_order_box():
    box = torch.tensor([[0.8, 0.1, 0.2, 0.9], [0.1, 0.7, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(
        order_box(box), torch.tensor([[0.2, 0.1, 0.8, 0.9], [0.1, 0.2, 0.3, 0.7], [0.1, 0.2, 0.3, 0.4]])
    )
    # Works on any leading shape and is differentiable.
    b = torch.rand(2, 3, 4, requires_grad=True)
    out = order_box(b)
    assert out.shape == (2, 3, 4)
    assert bool((out[..., 0] <= out[..., 2]).all() and (out[..., 1] <= out[..., 3]).all())
    out.sum().backward()
    torch.testing.assert_close(b.grad, torch.ones_like(b))


def test_decode_image_checks_the_size_its_record_states():
    data = _encode(Image.fromarray(_rand_image(20, 30)), "PNG")
    assert geometry.decode_image(data, "x.png", expected_hw=(20, 30)).shape == (20, 30, 3)
    with pytest.raises(ValueError, match=r"x.png decodes to \(20, 30\), shard says \(30, 20\)"):
        geometry.decode_image(data, "x.png", expected_hw=(30, 20))


def test_output_box_is_the_predicted_box_or_else_the_mask_extent():
    mask = np.zeros((20, 40), dtype=bool)
    mask[5:10, 8:16] = True
    np.testing.assert_allclose(
        geometry.output_box(torch.tensor([0.25, 0.5, 0.5, 1.0]), mask), [10, 10, 20, 20]
    )
    np.testing.assert_allclose(geometry.output_box(None, mask), geometry.mask_to_box(mask))


def test_preprocess_image_matches_the_single_steps():
    img = _rand_image(30, 50)
    clip, sam, in_hw = geometry.preprocess_image(img, 32, 64)
    assert torch.equal(clip, geometry.clip_preprocess(img, 32)) and torch.equal(
        sam, geometry.sam_preprocess(img, 64)
    )
    assert in_hw == geometry.sam_input_size((30, 50), 64)
