"""Shared fixtures: the bundled default package, the eager reference, real photos
(scikit-image's bundled data) and generated images, written to disk like user files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import generated, photos, transparent
from runtime import DEFAULT_MODEL, Captioner


def written(tmp_path_factory, kind: str, images: dict, suffix: str, **save) -> dict[str, Path]:
    """Images (arrays or PIL) saved as user files, name -> path."""
    folder = tmp_path_factory.mktemp(kind)
    paths = {name: folder / f"{name}{suffix}" for name in images}
    for name, image in images.items():
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(paths[name], **save)
    return paths


@pytest.fixture(scope="session")
def photo_paths(tmp_path_factory) -> dict[str, Path]:
    return written(tmp_path_factory, "photos", photos(), ".jpg", quality=95)


@pytest.fixture(scope="session")
def generated_paths(tmp_path_factory) -> dict[str, Path]:
    return written(tmp_path_factory, "generated", generated(np.random.default_rng(0)), ".png")


@pytest.fixture(scope="session")
def transparent_paths(tmp_path_factory) -> dict[str, Path]:
    return written(tmp_path_factory, "transparent", transparent(), ".png")


@pytest.fixture(scope="session")
def image_paths(photo_paths, generated_paths) -> list[Path]:
    return list(photo_paths.values()) + list(generated_paths.values())


@pytest.fixture(scope="session")
def captioner() -> Captioner:
    return Captioner(DEFAULT_MODEL, provider="cpu")


@pytest.fixture(scope="session")
def reference(captioner):
    from export import DEFAULT_CHECKPOINT
    from export.reference import Reference, checkpoint_for

    return Reference(checkpoint_for(captioner.manifest, DEFAULT_CHECKPOINT.parent), captioner.manifest)
