"""Frame conversions (original / normalized / SAM / CLIP square), preprocessing and image decoding."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps
from segment_anything.utils.transforms import ResizeLongestSide

from ppcr import geometry
from ppcr.geometry import (
    CLIP_MEAN,
    CLIP_STD,
    SAM_MEAN,
    SAM_STD,
    ImageDecodeError,
    ImageLimits,
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


def test_decode_too_many_pixels():
    data = _encode(Image.fromarray(_rand_image(20, 20)), "PNG")
    with pytest.raises(ImageDecodeError, match="big.png.*exceeds"):
        decode_image(data, name="big.png", limits=ImageLimits(max_pixels=100))


def test_decode_pixel_limit_argument_checks_header_before_decoding(monkeypatch):
    data = _encode(Image.fromarray(_rand_image(20, 20)), "PNG")

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels decoded before the limit was checked")

    with monkeypatch.context() as m:
        m.setattr(geometry, "pil_to_rgb", no_decoding)
        with pytest.raises(geometry.ImageTooLargeError, match="20x20 exceeds 399 pixels"):
            decode_image(data, limits=ImageLimits(max_pixels=399))
    assert decode_image(data, limits=ImageLimits(max_pixels=400)).shape == (20, 20, 3)
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
    with pytest.raises(ImageDecodeError, match="arr: unsupported image array dtype float64"):
        as_rgb_array(img.astype(np.float64), name="arr")
    with pytest.raises(ImageDecodeError, match=r"H×W×3 or H×W×4 image array; got shape \(5, 6, 5\)"):
        as_rgb_array(np.zeros((5, 6, 5), np.uint8))
    with pytest.raises(ImageDecodeError, match="0x4 has a side under 1 pixel"):
        as_rgb_array(np.zeros((4, 0, 3), np.uint8))


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 H×W, H×W×3 or H×W×4 array, written by hand (Pillow cannot write 16-bit
    colour PNGs); PNG spec: IHDR bit depth 16, colour type 0 / 2 / 6, big-endian samples."""
    h, w = arr.shape[:2]
    colour_type = {1: 0, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_a_16bit_image_has_the_same_pixels_whichever_way_it_arrives(tmp_path):
    # Before: bytes were scaled, a PIL image was clipped by convert("RGB") (every pixel 255).
    cam = skimage.data.camera()
    cam16 = cam.astype(np.uint16) * 257
    data = _encode(Image.fromarray(cam16), "PNG")
    path = tmp_path / "camera16.png"
    path.write_bytes(data)
    expected = np.repeat(cam[..., None], 3, axis=2)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        ways = {
            "bytes": as_rgb_array(data),
            "PIL": as_rgb_array(im),
            "path": as_rgb_array(path),
            "str path": as_rgb_array(str(path)),
            "URI": as_rgb_array(path.as_uri()),
            "array": as_rgb_array(cam16),
            "decode_image": decode_image(data),
        }
    for way, out in ways.items():
        assert out.shape == (512, 512, 3) and out.dtype == np.uint8, way
        np.testing.assert_array_equal(out, expected, err_msg=way)


def test_16bit_colour_arrays_read_as_pillow_reads_16bit_colour_pngs():
    rgb16 = skimage.data.astronaut().astype(np.uint16) * 257 + 100  # low bytes differ from the high ones
    rgba16 = np.concatenate([rgb16, np.full((*rgb16.shape[:2], 1), 65535, np.uint16)], axis=2)
    for arr in (rgb16, rgba16):
        from_png = decode_image(_png16(arr))
        np.testing.assert_array_equal(from_png, (arr[..., :3] >> 8).astype(np.uint8))
        np.testing.assert_array_equal(as_rgb_array(arr), from_png)
    gray16 = skimage.data.camera().astype(np.uint16) * 250 + 37
    np.testing.assert_array_equal(as_rgb_array(gray16), decode_image(_png16(gray16)))
    np.testing.assert_array_equal(as_rgb_array(gray16[..., None]), decode_image(_png16(gray16)))


@pytest.mark.parametrize(
    "array,mode",
    [
        (skimage.data.camera(), "L"),
        (skimage.data.camera()[..., None], "L"),
        (np.dstack([skimage.data.astronaut(), skimage.data.camera()]), "RGBA"),
        (np.dstack([skimage.data.camera(), skimage.data.camera()[::-1]]), "LA"),
        (skimage.data.camera() > 100, "1"),
        (skimage.data.camera().astype(np.int32) * 200, "I"),
    ],
    ids=["gray", "gray-1-channel", "rgba", "gray-alpha", "bool", "int32"],
)
def test_an_array_has_the_pixels_of_the_same_image_as_a_file(array, mode):
    im = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    assert im.mode == mode
    fmt = "TIFF" if mode == "I" else "PNG"
    np.testing.assert_array_equal(as_rgb_array(array), decode_image(_encode(im, fmt)))
    np.testing.assert_array_equal(as_rgb_array(im), decode_image(_encode(im, fmt)))


def test_modes_without_a_faithful_reading_are_refused_the_same_way_everywhere():
    f32 = np.random.default_rng(3).random((10, 12)).astype(np.float32)
    message = "unsupported image mode 'F' (32-bit float)"
    for image in (f32, Image.fromarray(f32), _encode(Image.fromarray(f32), "TIFF")):
        with pytest.raises(ImageDecodeError, match=re.escape(f"x: {message}")):
            as_rgb_array(image, name="x")
    big = np.full((10, 12), 70000, np.int32)
    for image in (big, Image.fromarray(big), _encode(Image.fromarray(big), "TIFF")):
        with pytest.raises(
            ImageDecodeError, match=r"x: unsupported image mode 'I' with pixels in 70000\.\.70000"
        ):
            as_rgb_array(image, name="x")
    with pytest.raises(ImageDecodeError, match="unsupported image mode 'LAB'"):
        as_rgb_array(Image.new("LAB", (8, 8), (50, 0, 0)))  # convert("RGB") would show L=50 gray as blue


def test_a_pil_image_is_read_as_displayed_like_its_bytes():
    img = _rand_image(20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(Image.fromarray(img), "JPEG", exif=exif)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (50, 20)
        np.testing.assert_array_equal(as_rgb_array(im), decode_image(data))
        # exif_transpose removes the tag: applying the convention again changes nothing.
        np.testing.assert_array_equal(as_rgb_array(ImageOps.exif_transpose(im)), decode_image(data))
    assert decode_image(data).shape == (50, 20, 3)


def test_image_shape_limits_are_one_check_with_one_message():
    strip = np.zeros((1, 512, 3), np.uint8)
    message = (
        "strip: 512x1 has an aspect ratio of 512, over 20 (sizes are width x height; images must have sides "
        "of at least 1 pixel(s), a long side at most 20 times the short side and at most 64000000 pixels)"
    )
    for image in (strip, Image.fromarray(strip), _encode(Image.fromarray(strip), "PNG"), strip[..., 0]):
        with pytest.raises(geometry.ImageShapeError) as info:
            as_rgb_array(image, name="strip")
        assert str(info.value) == message
    # Within the limits: 20:1 passes; the limits are settings.
    assert as_rgb_array(np.zeros((2, 40, 3), np.uint8)).shape == (2, 40, 3)
    with pytest.raises(geometry.ImageShapeError, match="over 10"):
        as_rgb_array(np.zeros((2, 40, 3), np.uint8), limits=ImageLimits(max_aspect_ratio=10))
    with pytest.raises(geometry.ImageShapeError, match="40x2 has a side under 4 pixel"):
        as_rgb_array(np.zeros((2, 40, 3), np.uint8), limits=ImageLimits(min_side=4))
    with pytest.raises(geometry.ImageTooLargeError, match="40x2 exceeds 79 pixels"):
        geometry.check_image_shape(2, 40, limits=ImageLimits(max_pixels=79))
    for bad in ({"max_aspect_ratio": 0.5}, {"min_side": 0}, {"max_pixels": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ImageLimits(**bad)


def test_every_allowed_shape_survives_sam_and_clip_preprocessing():
    # The limit is what keeps SAM's resize from a 0-pixel side: at the tiny preset's 128 px a 20:1 image
    # keeps 6 px, while 512:1 (the strip above) rounds to 0 inside ResizeLongestSide.
    for h, w in [(1, 20), (20, 1), (1, 1), (3, 60)]:
        clip, sam, (sh, sw) = geometry.preprocess_image(np.zeros((h, w, 3), np.uint8), 32, 128, "crop")
        assert min(sh, sw) >= 1 and clip.shape == (3, 32, 32) and sam.shape == (3, 128, 128)
    with pytest.raises(ValueError, match="height and width must be > 0"):
        geometry.sam_preprocess(np.zeros((1, 512, 3), np.uint8), 128)


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
