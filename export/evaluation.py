"""The seeded image sets the export side measures packages on: the fidelity set the parity report
and the quantization gates use (seed 0) and the calibration set int8 quantization tunes on (seed 1).
Photo crops of scikit-image's bundled photos plus generated images, written to disk like user files."""

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


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
            image = photos[rng.integers(len(photos))]
            w, h = image.size
            s = rng.uniform(0.4, 1.0)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            image = image.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        paths.append(str(folder / f"eval{i:04d}.png"))
        image.save(paths[-1])
    return paths
