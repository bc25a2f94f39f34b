"""Every image-frame and box-frame conversion in ppcr, used by train, eval, serve and batch alike.

Frames:
- *original*: pixel coordinates of the input image, H×W; boxes XYXY continuous (no +1).
- *normalized*: box / (W, H, W, H), in [0, 1] — what the box head predicts (paper Eq. 4–5).
- *SAM frame*: the image resized so its long side is `sam_size` (ResizeLongestSide), then padded
  right/bottom to a `sam_size` square. Boxes given to SAM's prompt encoder are in this frame.
- *CLIP frame*: the image padded to a square with the CLIP mean colour, then resized to
  `clip_size` (LLaVA-1.5's "pad" aspect mode: nothing is cropped away, so every object stays visible).
  `model.clip_preprocess: crop` instead resizes the short side to `clip_size` and keeps the centre
  square (CLIP's own preprocessing, which GLaMM trained with): the margins of a long image are lost.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from segment_anything.utils.transforms import ResizeLongestSide

from .storage import read_bytes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

# Limits on an input image's shape (`ImageLimits`), checked from its header before any pixel is decoded.
# Decompression-bomb guard: RefCOCO images are ≤ 640 px; 64 MP is far beyond any real input.
MAX_PIXELS = 64_000_000
# Long side / short side. SAM's ResizeLongestSide leaves a 0-pixel side beyond 2 × sam_size (256 at the
# tiny preset's 128); 20 keeps ≥ 51 px of the short side at SAM's 1024 and ≥ 6 px at 128.
MAX_ASPECT_RATIO = 20.0
MIN_SIDE = 1

# Pillow modes read faithfully as 8-bit RGB by `convert("RGB")` (alpha dropped, palette expanded, CMYK
# inverted naively as Pillow does). 16-bit modes are read by `_high_byte`; every other mode is refused.
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED = "send 8- or 16-bit grayscale, RGB or RGBA, palette or CMYK"
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (or it is empty / too large / of an unsupported mode)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header announces more pixels than allowed (checked before any pixel is decoded)."""


class ImageShapeError(ImageDecodeError):
    """The image has a side under `ImageLimits.min_side` or an aspect ratio over `max_aspect_ratio`."""


@dataclass(frozen=True)
class ImageLimits:
    """What image shapes every entry point takes (Segmenter, prepare, evaluate, batch, the server).

    max_pixels: width × height; max_aspect_ratio: long side / short side; min_side: pixels.
    The server sets max_pixels and max_aspect_ratio from its settings; everything else uses the defaults.
    """

    max_pixels: int = MAX_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    min_side: int = MIN_SIDE

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1; got {self.min_side}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1; got {self.max_pixels}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1; got {self.max_aspect_ratio}")


def check_image_shape(
    height: int, width: int, name: str = "image", limits: ImageLimits | None = None
) -> None:
    """Refuse an image shape outside `limits` (default `ImageLimits()`), with one message everywhere.

    Raises ImageTooLargeError (over max_pixels) or ImageShapeError (a side under min_side, aspect ratio
    over max_aspect_ratio); both name the image, its width x height and the limits.
    """
    lim = limits or ImageLimits()
    if min(height, width) < lim.min_side:
        problem, error = f"has a side under {lim.min_side} pixel(s)", ImageShapeError
    elif height * width > lim.max_pixels:
        problem, error = f"exceeds {lim.max_pixels} pixels", ImageTooLargeError
    elif max(height, width) > lim.max_aspect_ratio * min(height, width):
        ratio = max(height, width) / min(height, width)
        problem, error = f"has an aspect ratio of {ratio:.4g}, over {lim.max_aspect_ratio:g}", ImageShapeError
    else:
        return
    raise error(
        f"{name}: {width}x{height} {problem} (sizes are width x height; images must have sides of at "
        f"least {lim.min_side} pixel(s), a long side at most {lim.max_aspect_ratio:g} times the short "
        f"side and at most {lim.max_pixels} pixels)"
    )


def _high_byte(arr: np.ndarray) -> np.ndarray:
    """16-bit samples -> 8-bit: the high byte, as Pillow reads 16-bit colour PNGs (65535 -> 255)."""
    return (arr.astype(np.uint16, copy=False) >> 8).astype(np.uint8)


def pil_to_rgb(im: Image.Image, name: str = "image") -> np.ndarray:
    """A PIL image of any mode -> H×W×3 uint8 RGB of the *displayed* image; the one conversion every
    input kind (path, URI, bytes, PIL image, array) goes through.

    The EXIF Orientation tag is applied (`ImageOps.exif_transpose`: the image as viewers and annotation
    tools show it). 16-bit grayscale (I;16*) and 32-bit integer (I) pixels in 0..65535 keep their high
    byte, as Pillow itself reads 16-bit colour PNGs (I is how Pillow opens 16-bit PGM, and opened 16-bit
    PNG before it had I;16). Modes without a faithful 8-bit reading (32-bit float, I outside 0..65535,
    LAB, ...) raise ImageDecodeError naming the image and the mode.
    """
    mode = im.mode
    if mode not in _CONVERTIBLE_MODES | _SIXTEEN_BIT_MODES | {"I"}:
        kind = {"F": " (32-bit float)", "I;16S": " (signed 16-bit)"}.get(mode, "")
        raise ImageDecodeError(f"{name}: unsupported image mode {mode!r}{kind}; {_SUPPORTED}")
    if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if mode in _CONVERTIBLE_MODES:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    arr = np.asarray(im)
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ImageDecodeError(
            f"{name}: unsupported image mode 'I' with pixels in {arr.min()}..{arr.max()}: 32-bit "
            f"integers are read as 16-bit, 0..65535; {_SUPPORTED}"
        )
    return np.repeat(_high_byte(arr)[..., None], 3, axis=2)


@contextlib.contextmanager
def _decode_errors(name: str):
    """PIL's zoo of exception types for corrupt or hostile files -> ImageDecodeError naming the image."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard, above 2 × Image.MAX_IMAGE_PIXELS
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:  # its text is the repr of our in-memory file: not for a user
        raise ImageDecodeError(
            f"{name}: cannot decode image (not a format Pillow reads: PNG, JPEG, GIF, WebP, TIFF, BMP, ...)"
        ) from exc
    except Exception as exc:
        raise ImageDecodeError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def decode_image(
    data: bytes,
    name: str = "image",
    limits: ImageLimits | None = None,
    expected_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Encoded bytes -> H×W×3 uint8 RGB of the displayed image (`pil_to_rgb`: EXIF orientation applied,
    gray/RGBA/palette/CMYK/16-bit converted, other modes refused).

    limits: `check_image_shape` on the size the header announces, before decoding, so a small compressed
    file cannot expand into gigabytes (a decompression bomb) and a 1×512 strip is refused by name.
    expected_hw: the (height, width) its record (a shard row) states; ValueError if it decodes otherwise.
    Raises ImageDecodeError (ImageTooLargeError, ImageShapeError) naming `name`.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty image bytes")
    with _decode_errors(name), Image.open(io.BytesIO(data)) as im:
        check_image_shape(im.height, im.width, name, limits)
        rgb = pil_to_rgb(im, name)
    if expected_hw is not None and rgb.shape[:2] != tuple(expected_hw):
        raise ValueError(f"{name} decodes to {rgb.shape[:2]}, shard says {tuple(expected_hw)}")
    return rgb


ImageInput = np.ndarray | Image.Image | bytes | str | os.PathLike


def as_rgb_array(image: ImageInput, name: str = "image", limits: ImageLimits | None = None) -> np.ndarray:
    """Any image input -> H×W×3 uint8 RGB, the same pixels whichever way the image arrives.

    - a path or URI (str / os.PathLike; s3://, gs://, file://...): its bytes, as below (name = the path);
    - encoded bytes: `decode_image`;
    - a PIL image of any mode: `pil_to_rgb` (EXIF orientation applied, as for its file's bytes);
    - an array, taken as displayed pixels: uint8 H×W (gray), H×W×1, H×W×2 (gray + alpha), H×W×3 (returned
      as is), H×W×4 (RGBA; alpha dropped); uint16 of those shapes (the high byte, as for a 16-bit PNG);
      bool H×W (0 / 255); int32 H×W (mode I). Other dtypes (float, ...) raise ImageDecodeError.
    Every kind is checked against `limits` (`check_image_shape`) before it is converted.
    """
    if isinstance(image, (str, os.PathLike)):
        location = os.fspath(image)
        return decode_image(read_bytes(location), location, limits)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name, limits)
    if isinstance(image, Image.Image):
        check_image_shape(image.height, image.width, name, limits)
        with _decode_errors(name):  # a lazily opened file decodes here
            return pil_to_rgb(image, name)
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
        raise ImageDecodeError(
            f"{name}: expected an H×W, H×W×3 or H×W×4 image array; got shape {arr.shape} dtype {arr.dtype}"
        )
    check_image_shape(arr.shape[0], arr.shape[1], name, limits)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint16 and arr.ndim == 3:
        arr = _high_byte(arr)  # Pillow has no 16-bit colour mode: its PNG reader keeps the high byte too
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    try:  # uint8 -> L / LA / RGBA, uint16 -> I;16, bool -> 1, int32 -> I, float32 -> F (refused)
        im = Image.fromarray(arr)
    except TypeError:
        raise ImageDecodeError(
            f"{name}: unsupported image array dtype {arr.dtype} with shape {arr.shape}; send uint8 or "
            "uint16 pixels (H×W, H×W×3 or H×W×4), a PIL image, encoded bytes or a path"
        ) from None
    return pil_to_rgb(im, name)


def sam_input_size(original_hw: tuple[int, int], sam_size: int) -> tuple[int, int]:
    """(h, w) of the image inside the SAM frame before padding."""
    return ResizeLongestSide.get_preprocess_shape(original_hw[0], original_hw[1], sam_size)


def sam_preprocess(image: np.ndarray, sam_size: int) -> torch.Tensor:
    """H×W×3 uint8 -> (3, sam_size, sam_size) float, resized-longest-side, normalised, zero-padded."""
    resized = ResizeLongestSide(sam_size).apply_image(image)
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
    x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    h, w = x.shape[1:]
    return torch.nn.functional.pad(x, (0, sam_size - w, 0, sam_size - h))


CLIP_MODES = ("pad", "crop")


def clip_preprocess(image: np.ndarray, clip_size: int, mode: str = "pad") -> torch.Tensor:
    """H×W×3 uint8 -> (3, clip_size, clip_size) float, CLIP-normalised. mode "pad": pad to square with
    the mean colour, then resize (LLaVA-1.5); "crop": resize the short side to clip_size, centre-crop
    (CLIP's CLIPImageProcessor, GLaMM)."""
    if mode == "crop":
        h, w = image.shape[:2]
        scale = clip_size / min(h, w)
        size = (max(clip_size, round(w * scale)), max(clip_size, round(h * scale)))
        img = Image.fromarray(image).resize(size, Image.BICUBIC)
        left, top = (size[0] - clip_size) // 2, (size[1] - clip_size) // 2
        img = img.crop((left, top, left + clip_size, top + clip_size))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
        return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    if mode != "pad":
        raise ValueError(f"clip mode must be one of {CLIP_MODES}; got {mode!r}")
    h, w = image.shape[:2]
    side = max(h, w)
    fill = tuple(int(round(m * 255)) for m in CLIP_MEAN)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(Image.fromarray(image), ((side - w) // 2, (side - h) // 2))
    canvas = canvas.resize((clip_size, clip_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def preprocess_image(image: np.ndarray, clip_size: int, sam_size: int, clip_mode: str = "pad"):
    """One decoded image -> (CLIP pixels (3, C, C), SAM pixels (3, S, S), (h, w) inside the SAM frame).
    clip_mode: "pad" | "crop" (model.clip_preprocess; see clip_preprocess)."""
    h, w = image.shape[:2]
    return (
        clip_preprocess(image, clip_size, clip_mode),
        sam_preprocess(image, sam_size),
        sam_input_size((h, w), sam_size),
    )


def normalize_box(box_xyxy: np.ndarray | torch.Tensor, hw: tuple[int, int]):
    """Pixel XYXY in the original frame -> normalized XYXY in [0, 1]."""
    h, w = hw
    scale = [w, h, w, h]
    if isinstance(box_xyxy, torch.Tensor):
        return box_xyxy / torch.tensor(scale, dtype=box_xyxy.dtype, device=box_xyxy.device)
    return np.asarray(box_xyxy, dtype=np.float64) / np.asarray(scale, dtype=np.float64)


def denormalize_box(box01: np.ndarray | torch.Tensor, hw: tuple[int, int]):
    """Normalized XYXY -> pixel XYXY in the original frame (paper Eq. 5)."""
    h, w = hw
    scale = [w, h, w, h]
    if isinstance(box01, torch.Tensor):
        return box01 * torch.tensor(scale, dtype=box01.dtype, device=box01.device)
    return np.asarray(box01, dtype=np.float64) * np.asarray(scale, dtype=np.float64)


def order_box(box: torch.Tensor) -> torch.Tensor:
    """(..., 4) XYXY with corners possibly swapped -> proper (min, min, max, max) XYXY."""
    x1, y1, x2, y2 = box.unbind(-1)
    return torch.stack(
        [torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)], -1
    )


def normalized_to_sam_frame(box01: torch.Tensor, original_hw: tuple[int, int], sam_size: int) -> torch.Tensor:
    """(..., 4) normalized XYXY -> XYXY in the SAM frame (normalized × resized (w, h); padding is right/bottom)."""
    h, w = sam_input_size(original_hw, sam_size)
    return box01 * torch.tensor([w, h, w, h], dtype=box01.dtype, device=box01.device)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """bool H×W -> tight pixel XYXY (continuous: the box covers whole pixels); zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def output_box(box01: torch.Tensor | None, mask: np.ndarray) -> np.ndarray:
    """Pixel XYXY of one prediction in its mask's (original) frame: the box stage's normalized box, or,
    without a spatial stage (spatial_prompt: none), the extent of the mask."""
    if box01 is None:
        return mask_to_box(mask)
    return denormalize_box(box01.float().cpu().numpy(), mask.shape[:2])


def _square_offsets(hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hw: (B, 2) original (h, w) -> (side, pad_x, pad_y) of the CLIP pad-to-square frame, each (B,)."""
    h, w = hw[:, 0].float(), hw[:, 1].float()
    side = torch.maximum(h, w)
    return side, (side - w) / 2, (side - h) / 2


def clip_square_to_normalized(box_sq: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """(B, 4) XYXY in [0,1] of the CLIP square frame -> normalized XYXY of the original image."""
    side, px, py = _square_offsets(hw)
    h, w = hw[:, 0].float(), hw[:, 1].float()
    x1, y1, x2, y2 = box_sq.unbind(-1)
    return torch.stack(
        [(x1 * side - px) / w, (y1 * side - py) / h, (x2 * side - px) / w, (y2 * side - py) / h], -1
    )


def normalized_to_clip_square(box01: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Inverse of `clip_square_to_normalized`."""
    side, px, py = _square_offsets(hw)
    h, w = hw[:, 0].float(), hw[:, 1].float()
    x1, y1, x2, y2 = box01.unbind(-1)
    return torch.stack(
        [(x1 * w + px) / side, (y1 * h + py) / side, (x2 * w + px) / side, (y2 * h + py) / side], -1
    )


def grid_centers(grid: int) -> torch.Tensor:
    """(grid*grid, 2) (x, y) centres of a raster-ordered patch grid, in [0, 1] of the square frame."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)
