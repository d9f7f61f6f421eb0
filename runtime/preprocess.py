"""Image loading and preprocessing with Pillow + numpy.

Decoding is a trust boundary: only an explicit list of formats is opened, the pixel
count is checked from the header before any pixel is decoded, and anything a decoder
raises becomes one `ImageError` line naming the file. Resize, crop and normalisation
are bit-identical to the export side's torchvision reference."""

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
# The allowed decoders, registered now rather than lazily at the first open: a process
# that later drops privileges or is sandboxed must still be able to decode.
from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, PpmImagePlugin  # noqa: F401
from PIL import TiffImagePlugin, WebPImagePlugin  # noqa: F401

from .manifest import FixedSize, Grid, Pixels, Tiles

# Pillow opens only these; anything else (PDF, SVG, EPS, FITS...) is refused up front.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
DEFAULT_MAX_PIXELS = 40_000_000  # any camera photo; a decompression bomb is refused unread
MAX_ASPECT = 50  # beyond this the shorter side resized to 256 makes a huge, meaningless strip
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "lanczos": Image.Resampling.LANCZOS}
MAX_TILED_SIDE = 4096  # SmolVLM's processor caps the resized image at 4k
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(Exception):
    """An input that is not a usable image; the message is one line naming the cause."""


def decode(source: Path | io.BytesIO, max_pixels: int, name: str | None = None) -> Image.Image:
    """A file, or encoded bytes in memory (`name` says what the messages call them)."""
    name = name or str(source)
    try:
        image = Image.open(source, formats=ALLOWED_FORMATS)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory with no images") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: declares more pixels than the limit of {max_pixels}") from None
    except Exception as e:  # Pillow's "cannot identify image file" and friends
        if "cannot identify" in str(e):
            raise ImageError(f"{name}: not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
        raise ImageError(f"{name}: cannot open image: {type(e).__name__}: {e}") from None
    check_size(image, max_pixels, name)
    try:
        image.load()  # the first frame of an animation
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, zlib.error, ...
        raise ImageError(f"{name}: cannot decode image: {type(e).__name__}: {e}".replace("\n", " ")) from None
    return image


def check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    w, h = image.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels}")
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{name}: {w}x{h} has an aspect ratio beyond {MAX_ASPECT}:1")


def upright(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, encoded bytes (an uploaded file), PIL image or HxW[x3|x4] uint8 array -> upright
    PIL image in its own mode (16-bit grayscale scaled to 8 bits), after every check of the
    decoding policy."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)):
            raise ImageError(f"array of dtype {source.dtype} and shape {source.shape}: expected uint8 HxW, HxWx3 or HxWx4")
        image = Image.fromarray(source)
        check_size(image, max_pixels, "array")
    elif isinstance(source, Image.Image):
        image = source
        check_size(image, max_pixels, "image")
    elif isinstance(source, bytes):
        image = decode(io.BytesIO(source), max_pixels, "image")
    else:
        image = decode(Path(source), max_pixels)
    try:
        if image.mode in SIXTEEN_BIT:  # 16-bit grayscale: keep the top 8 bits (convert() would clip)
            image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
        return ImageOps.exif_transpose(image)
    except Exception as e:
        raise ImageError(f"cannot orient image: {type(e).__name__}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white, as transformers' `convert_to_rgb` does
    and as a viewer shows it (`convert("RGB")` alone drops alpha: icons end up on black)."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot convert image to RGB: {type(e).__name__}: {e}") from None


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, encoded bytes, PIL image or HxW[x3|x4] uint8 array -> upright RGB PIL image."""
    return to_rgb(upright(source, max_pixels))


def resized_size(width: int, height: int, resize: int | list[int]) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resize): an int sets the shorter side
    (the longer one truncated, as transformers' shortest_edge does too), [h, w] is exact."""
    if isinstance(resize, list):
        return resize[1], resize[0]
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_offset(size: int, crop: int, rule: str) -> int:
    return (size - crop) // 2 if rule == "floor" else int(round((size - crop) / 2.0))


def normalized(image: Image.Image, spec: Pixels) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W): rescaled, minus the mean, over the std."""
    x = np.asarray(image, dtype=np.float32) / np.float32(round(1 / spec.rescale))
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_pixels(image: Image.Image, spec: FixedSize) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) as the manifest's `preprocess` says (a fixed size)."""
    size = resized_size(*image.size, spec.resize)
    image = image.resize(size, RESAMPLE[spec.resample])
    if spec.crop:
        crop_h, crop_w = spec.crop
        top, left = crop_offset(size[1], crop_h, spec.crop_offset), crop_offset(size[0], crop_w, spec.crop_offset)
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return normalized(image, spec)


def longest_edge_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """SmolVLM's first resize: the longest edge to `longest` (up or down), the other by the aspect
    ratio, truncated then made even, and the whole capped at MAX_TILED_SIDE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    if width >= height and width > MAX_TILED_SIDE:
        width, height = MAX_TILED_SIDE, int(MAX_TILED_SIDE / aspect)
    elif height > width and height > MAX_TILED_SIDE:
        height, width = MAX_TILED_SIDE, int(MAX_TILED_SIDE * aspect)
    return max(width, 1), max(height, 1)


def tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """Both sides up to multiples of the tile, the longer one first, as resize_for_vision_encoder."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def to_tiles(image: Image.Image, spec: Tiles) -> tuple[np.ndarray, int, int]:
    """RGB PIL image -> (tiles (n, 3, tile, tile) float32, rows, cols) as SmolVLM's image processor
    (PIL backend) makes them: the longest edge resized, then (splitting) both sides to multiples
    of the tile, cut into rows x cols tiles in reading order plus the whole image resized to one
    tile last; an image no larger than one tile is that tile alone (0 x 0)."""
    resample, tile = RESAMPLE[spec.resample], spec.tile
    image = image.resize(longest_edge_size(*image.size, spec.longest_edge), resample)
    if not spec.split:
        return normalized(image.resize((tile, tile), resample), spec)[None], 0, 0
    image = image.resize(tile_multiple_size(*image.size, tile), resample)
    width, height = image.size
    if width <= tile and height <= tile:
        return normalized(image, spec)[None], 0, 0
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    crops = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return np.stack([normalized(t, spec) for t in (*crops, image.resize((tile, tile), resample))]), rows, cols


def smart_size(width: int, height: int, spec: Grid) -> tuple[int, int]:
    """(width, height) by Qwen2-VL's smart_resize: both sides multiples of `factor`, as near the
    image's as can be, the area between min_pixels and max_pixels."""
    factor, low, high = spec.factor, spec.min_pixels, spec.max_pixels
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return w, h


def to_grid(image: Image.Image, spec: Grid) -> tuple[np.ndarray, int, int]:
    """RGB PIL image -> (pixels (3, H, W) float32, rows, cols) as Qwen2-VL's image processor (PIL
    backend) makes them before cutting patches: smart_resize, then normalized; the image gives
    rows x cols features (H and W over `factor`)."""
    width, height = smart_size(*image.size, spec)
    pixels = normalized(image.resize((width, height), RESAMPLE[spec.resample]), spec)
    return pixels, height // spec.factor, width // spec.factor


def load_pixels(source, spec: FixedSize, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return to_pixels(open_image(source, max_pixels), spec)
