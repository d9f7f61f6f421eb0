"""Shared fixtures: the bundled default package, the eager reference, every Hugging Face test model
(built offline with random weights and exported once per session, when a test first asks), their
quantized packages, real photos (scikit-image's bundled data) and generated images, written to disk
like user files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import generated, photos, same_size_photos, saved, transparent
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
def chat_photo_paths(tmp_path_factory) -> list[Path]:
    """Photos whose grids and tilings differ: square, 4:3, 2:1, 1:3 (rows outnumber columns, which
    M-RoPE's text positions after the image depend on) and one below Qwen2-VL's minimum size."""
    pictures = photos()
    arrays = [pictures["astronaut"], pictures["chelsea"],
              np.asarray(Image.fromarray(pictures["rocket"]).resize((400, 200))),
              np.asarray(Image.fromarray(pictures["coffee"]).resize((120, 360))),
              np.asarray(Image.fromarray(pictures["motorcycle"]).resize((30, 20)))]
    return saved(tmp_path_factory.mktemp("chat-photos"), {str(i): a for i, a in enumerate(arrays)})


@pytest.fixture(scope="session")
def same_size_paths(tmp_path_factory) -> list[Path]:
    return same_size_photos(tmp_path_factory.mktemp("same-size"))


@pytest.fixture(scope="session")
def captioner() -> Captioner:
    return Captioner(DEFAULT_MODEL, provider="cpu")


@pytest.fixture(scope="session")
def reference(captioner):
    from export import DEFAULT_CHECKPOINT
    from export.reference import Reference, checkpoint_for

    return Reference(checkpoint_for(captioner.manifest, DEFAULT_CHECKPOINT.parent), captioner.manifest)


# Every Hugging Face test model: name -> (its family's module under export/hf, whose build_<module> makes
# it, the builder's settings[, export rtol]). Seeds
# whose random weights answer differently by image and by question (the family tests check); "-real":
# a trained checkpoint's magnitudes (export.hf_random: logits ~100, residual dimensions at +-400).
TEST_MODELS = {
    "vit-gpt2": ("vision_encoder_decoder", {"encoder": "vit", "decoder": "gpt2"}),
    "deit-bert": ("vision_encoder_decoder", {"encoder": "deit", "decoder": "bert"}),
    "swin-gpt2": ("vision_encoder_decoder", {"encoder": "swin", "decoder": "gpt2", "seed": 1}),
    "vit-gpt2-real": ("vision_encoder_decoder", {"encoder": "vit", "decoder": "gpt2", "seed": 4, "realistic": True}),
    "blip": ("blip", {}),
    "blip-real": ("blip", {"seed": 3, "realistic": True}),
    "git": ("git", {"seed": 4}),
    "git-vqa": ("git", {"seed": 1}),
    "blip-vqa": ("blip", {"vqa": True}),
    "blip-vqa-real": ("blip", {"vqa": True, "realistic": True}),
    "florence2-w2": ("florence2", {"window": 2}),
    "florence2-w3": ("florence2", {"window": 3}),
    "smolvlm": ("smolvlm", {}),
    "smolvlm-real": ("smolvlm", {"seed": 1, "realistic": True}),
    "fastvlm": ("fastvlm", {}),
    "qwen2_5_vl": ("qwen2_5_vl", {}),
    # logits in the thousands: judged at rtol 1e-3, as the README tells users of such checkpoints
    "qwen2_5_vl-real": ("qwen2_5_vl", {"seed": 1, "realistic": True}, 1e-3),
}
# How a test model is quantized where its tests need more than quantize_package's defaults.
QUANTIZE = {("florence2-w3", "int8"): {"calibration": 8, "vision_compute": "int8"},
            ("florence2-w3", "fp16"): {"calibration": 8}}


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """name -> (Hugging Face folder, package) of a TEST_MODELS entry, made on first use."""
    root, made = tmp_path_factory.mktemp("hf-models"), {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            from importlib import import_module

            from export.check import Tolerance
            from export.hf import export_hf

            family, settings, *rtol = TEST_MODELS[name]
            getattr(import_module(f"export.hf.{family}"), f"build_{family}")(root / name, **settings)
            export_hf(root / name, root / f"{name}.pkg", tol=Tolerance(rtol=rtol[0]) if rtol else Tolerance())
            made[name] = (root / name, root / f"{name}.pkg")
        return made[name]

    return get


@pytest.fixture(scope="session")
def quantized(hf_model, tmp_path_factory):
    """(name, precision) -> the TEST_MODELS package quantized (export.quantize), made on first use."""
    root, made = tmp_path_factory.mktemp("quantized"), {}

    def get(name: str, precision: str) -> Path:
        if (name, precision) not in made:
            from export.quantize import quantize_package

            out = root / f"{name}-{precision}"
            quantize_package(hf_model(name)[1], precision, out, **QUANTIZE.get((name, precision), {}))
            made[name, precision] = out
        return made[name, precision]

    return get
