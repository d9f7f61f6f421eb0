"""Image loading and preprocessing with Pillow + numpy, bit-identical to the export
side's torchvision reference (resize shorter side, centre crop, rescale, normalise)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow opens only these; anything else (PDF, SVG, EPS, FITS...) is refused up front.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageError(Exception):
    """An input that is not a usable image; the message is one line naming the cause."""


def open_image(source) -> Image.Image:
    """A path, PIL image or HxW[x3] uint8 array -> upright RGB PIL image."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)):
            raise ImageError(f"array of dtype {source.dtype} and shape {source.shape}: expected uint8 HxW, HxWx3 or HxWx4")
        image = Image.fromarray(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        try:
            image = Image.open(path, formats=ALLOWED_FORMATS)
            image.load()
        except FileNotFoundError:
            raise ImageError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{path}: is a directory with no images") from None
        except PermissionError:
            raise ImageError(f"{path}: permission denied") from None
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{path}: cannot decode image: {e}") from None
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot convert image to RGB: {e}") from None


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): shorter side to `shorter`, longer side truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def to_pixels(image: Image.Image, spec: dict) -> np.ndarray:
    """RGB PIL image -> float32 (3, H, W) as the manifest's `preprocess` says."""
    size = resized_size(*image.size, spec["resize_shorter"])
    image = image.resize(size, RESAMPLE[spec["resample"]])
    crop_h, crop_w = spec["crop"]
    top, left = int(round((size[1] - crop_h) / 2.0)), int(round((size[0] - crop_w) / 2.0))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(image, dtype=np.float32) / np.float32(round(1 / spec["rescale"]))
    x = (x - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_pixels(source, spec: dict) -> np.ndarray:
    return to_pixels(open_image(source), spec)
