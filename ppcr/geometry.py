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

import io

import numpy as np
import torch
from PIL import Image, ImageOps
from segment_anything.utils.transforms import ResizeLongestSide

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

# Decompression-bomb guard: RefCOCO images are ≤ 640 px; 64 MP is far beyond any real input.
MAX_PIXELS = 64_000_000


# Modes with no faithful 8-bit RGB reading: PIL's convert("RGB") clips 32-bit float to black.
UNSUPPORTED_MODES = {"F": "32-bit float"}


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (or it is empty / too large / of an unsupported mode)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header announces more pixels than allowed (checked before any pixel is decoded)."""


def decode_image(
    data: bytes,
    name: str = "image",
    max_pixels: int | None = None,
    expected_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Encoded bytes -> H×W×3 uint8 RGB (EXIF orientation applied; gray/RGBA/CMYK/16-bit converted).

    max_pixels: refuse images whose header announces more pixels (default `MAX_PIXELS`), before
    decoding them, so a small compressed file cannot expand into gigabytes (a decompression bomb).
    expected_hw: the (height, width) its record (a shard row) states; ValueError if it decodes otherwise.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty image bytes")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > limit:
                raise ImageTooLargeError(f"{name}: {im.width}x{im.height} exceeds {limit} pixels")
            if im.mode in UNSUPPORTED_MODES:
                raise ImageDecodeError(
                    f"{name}: unsupported image mode {im.mode!r} ({UNSUPPORTED_MODES[im.mode]}); "
                    "send 8- or 16-bit RGB, RGBA, grayscale, palette or CMYK"
                )
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0))).astype(np.uint8))
            rgb = np.asarray(im.convert("RGB"))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard, above 2 × Image.MAX_IMAGE_PIXELS
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ImageDecodeError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(f"{name}: zero-size image")
    if expected_hw is not None and rgb.shape[:2] != tuple(expected_hw):
        raise ValueError(f"{name} decodes to {rgb.shape[:2]}, shard says {tuple(expected_hw)}")
    return np.ascontiguousarray(rgb)


def as_rgb_array(image: np.ndarray | Image.Image | bytes, name: str = "image") -> np.ndarray:
    """Accept bytes, a PIL image or an H×W×3 uint8 array; return H×W×3 uint8."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected an H×W×3 uint8 array; got shape {arr.shape} dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: zero-size image")
    return arr


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
