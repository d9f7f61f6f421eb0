"""Reference preprocessing with torchvision, built from the manifest's `preprocess`
record: what the runtime's Pillow + numpy pipeline must reproduce exactly."""

from PIL import Image, ImageOps
from torchvision import transforms as T

# EfficientNet-Lite0's own training preprocessing: (x - 127) / 128 on 0..255 pixels.
EFFICIENTNET_LITE0 = {
    "resize_shorter": 256,
    "crop": [224, 224],
    "resample": "bilinear",
    "rescale": 1 / 255,
    "mean": [127 / 255] * 3,
    "std": [128 / 255] * 3,
    "layout": "NCHW",
}
RESAMPLE = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def reference_transform(spec: dict):
    assert abs(spec["rescale"] - 1 / 255) < 1e-12, "ToTensor rescales by 1/255"
    return T.Compose([
        T.Resize(spec["resize_shorter"], interpolation=RESAMPLE[spec["resample"]]),
        T.CenterCrop(spec["crop"]),
        T.ToTensor(),
        T.Normalize(spec["mean"], spec["std"]),
    ])


def reference_pixels(path_or_image, spec: dict):
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    image = ImageOps.exif_transpose(image).convert("RGB")
    return reference_transform(spec)(image)
