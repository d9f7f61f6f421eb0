"""Runtime preprocessing (Pillow + numpy) against the torchvision reference, bit for bit."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from export.preprocess import EFFICIENTNET_LITE0, reference_pixels
from runtime.preprocess import ImageError, load_pixels, open_image

SPEC = EFFICIENTNET_LITE0


def test_identical_to_torchvision_on_real_and_generated_images(image_paths):
    for path in image_paths:
        ours = load_pixels(path, SPEC)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
        assert np.array_equal(ours, reference_pixels(path, SPEC).numpy()), path.name


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
@pytest.mark.parametrize("size", [(224, 224), (640, 427), (257, 999), (31, 17)])
def test_any_mode_and_size(photo_paths, tmp_path, mode, size):
    image = Image.open(photo_paths["chelsea"]).resize(size).convert(mode)
    ours = load_pixels(image, SPEC)
    assert np.array_equal(ours, reference_pixels(image, SPEC).numpy())


def test_exif_orientation_is_applied(photo_paths, tmp_path):
    upright = Image.open(photo_paths["chelsea"])
    rotated_path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored pixels are rotated 90 CCW
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated_path, exif=exif, quality=95)
    assert open_image(rotated_path).size == upright.size
    diff = np.abs(load_pixels(rotated_path, SPEC) - load_pixels(photo_paths["chelsea"], SPEC))
    assert diff.mean() < 0.05  # same picture, up to JPEG re-encoding


def test_arrays_are_accepted(photo_paths):
    array = np.asarray(Image.open(photo_paths["chelsea"]))
    assert np.array_equal(load_pixels(array, SPEC), load_pixels(Image.fromarray(array), SPEC))
    with pytest.raises(ImageError, match="expected uint8"):
        load_pixels(array.astype(np.float32), SPEC)


@pytest.mark.parametrize("content, message", [
    (b"", "not an image"),
    (b"hello, I am text", "not an image"),
    (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "not an image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
])
def test_non_images_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as e:
        open_image(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_truncated_jpeg(photo_paths, tmp_path):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(photo_paths["chelsea"].read_bytes()[:2000])
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a directory with no images"):
        open_image(tmp_path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    """A shape on a fully transparent background reads exactly like the same shape on white
    (alpha 0 or 255 only, so no rounding is involved); convert("RGB") alone gave black."""
    on_white = Image.new("RGB", (200, 150), (255, 255, 255))
    ImageDraw.Draw(on_white).ellipse((30, 20, 170, 130), fill=(40, 40, 40))
    shape = np.asarray(on_white.convert("L")) < 128
    gray = np.where(shape, 40, 0).astype(np.uint8)
    alpha = np.where(shape, 255, 0).astype(np.uint8)
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([gray, gray, gray, alpha]), "RGBA")
    elif mode == "LA":
        image = Image.fromarray(np.dstack([gray, alpha]), "LA")
    else:
        image = Image.fromarray(np.where(shape, 1, 0).astype(np.uint8), "P")
        image.putpalette([0, 0, 0, 40, 40, 40] + [0] * 762)
        image.info["transparency"] = 0
    image.save(tmp_path / "icon.png")
    assert np.array_equal(load_pixels(tmp_path / "icon.png", SPEC), load_pixels(on_white, SPEC))
