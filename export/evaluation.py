"""The seeded image sets the export side measures packages on, written to disk like user files:
- the fidelity set (seed 0) and the calibration set int8 quantization tunes on (seed 1): crops of
  scikit-image's bundled photos plus generated images;
- the held-out set: real photos from other sources (export/heldout/, Debian wallpaper packages,
  see SOURCES.md there) that no quantization step reads, whole and in seeded crops. The two
  sets share no source photo by construction."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

# What a chat package is asked about each held-out photo besides its family's default question (the
# weight-only gate, benchmarks.weight_only), and what export.distill teaches a trained test model to answer.
QUESTIONS = ("How many objects are in this image?", "What colours do you see?")


def evaluation_images(n: int, folder: Path, seed: int = 0) -> list[str]:
    """The fidelity set: 3/4 random crops (with flips) of scikit-image's photos, 1/4
    generated images (noise, gradients). Nothing here was seen in training, which used
    no images at all."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), *data.stereo_motorcycle()[:2],
              data.hubble_deep_field(), data.immunohistochemistry(), data.retina(), data.camera(), data.coins(),
              data.horse(), data.moon(), data.page(), data.text(), data.brick(), data.grass(), data.gravel(), data.cell()]
    photos = [Image.fromarray(p if p.dtype == np.uint8 else (p * 255).astype(np.uint8)).convert("RGB") for p in photos]
    rng, paths = np.random.default_rng(seed), []
    for i in range(n):
        if i % 4 == 3:
            h, w = rng.integers(64, 400, 2)
            image = Image.fromarray(np.cumsum(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), axis=i % 2).astype(np.uint8))
        else:
            image = random_crop(photos[rng.integers(len(photos))], rng)
        paths.append(str(folder / f"eval{i:04d}.png"))
        image.save(paths[-1])
    return paths


def random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """40% to 100% of each side, anywhere in the image, mirrored half the time."""
    w, h = image.size
    s = rng.uniform(0.4, 1.0)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


HELDOUT = Path(__file__).parent / "heldout"


def heldout_photos() -> list[Path]:
    return sorted(HELDOUT.glob("*.jpg"))


def heldout_record(crops: int = 3) -> dict:
    """What the manifest says of the held-out set: enough to tell it apart from any other."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in heldout_photos())).hexdigest()
    return {"source": "export/heldout (Debian wallpaper photos)", "photos": len(heldout_photos()),
            "inputs": len(heldout_photos()) * (1 + crops), "sha256": digest}


def heldout_images(folder: Path, crops: int = 3, seed: int = 0) -> list[str]:
    """The held-out set: every held-out photo whole, then `crops` seeded crops of it (PNG, so
    that no second JPEG pass alters them)."""
    rng, paths = np.random.default_rng(seed), []
    for photo in heldout_photos():
        image = Image.open(photo).convert("RGB")
        for i, variant in enumerate([image] + [random_crop(image, rng) for _ in range(crops)]):
            paths.append(str(folder / f"{photo.stem}-{i}.png"))
            variant.save(paths[-1])
    return paths
