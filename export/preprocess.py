"""Reference preprocessing with torchvision, built from the manifest's `preprocess`
record: what the runtime's Pillow + numpy pipeline must reproduce exactly."""

from torchvision import transforms as T

from runtime.manifest import FixedSize
from runtime.preprocess import open_image

# EfficientNet-Lite0's own normalisation, (x - 127) / 128 on 0..255 pixels, over the whole photo resized to
# 224 x 224 (not its shorter side to 256 and a centre crop): the face detector must see the people at a
# landscape photo's sides and the heads above a portrait's centre, which the crop cut off (the two players
# in basketball1.jpg). The classifier was trained with aspect ratios jittered from 3/4 to 4/3; its top class
# moves on 41% of 58 photos. What it cost and bought in captions: README, "What the bundled model says".
EFFICIENTNET_LITE0 = FixedSize(resample="bilinear", rescale=1 / 255, mean=[127 / 255] * 3, std=[128 / 255] * 3,
                               resize=[224, 224], crop=None, crop_offset="round")
RESAMPLE = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def reference_transform(spec: FixedSize):
    assert abs(spec.rescale - 1 / 255) < 1e-12, "ToTensor rescales by 1/255"
    assert spec.crop_offset == "round", "CenterCrop rounds the offsets"
    return T.Compose([
        T.Resize(spec.resize, interpolation=RESAMPLE[spec.resample]),
        *([T.CenterCrop(spec.crop)] if spec.crop else []),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def reference_pixels(source, spec: FixedSize):
    """Decoding policy (formats, limits, EXIF, modes) is the runtime's own; what is
    reimplemented independently here is the numeric pipeline."""
    return reference_transform(spec)(open_image(source))
