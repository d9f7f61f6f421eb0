"""FastVLM, a second LLM-based family over the same machinery: a convolutional vision tower (timm's
fastvit_mci3 through transformers' timm wrapper) over one fixed-size image, a Qwen2 language model
with grouped-query attention and q/k/v biases, the LLaVA prompt layout. Tiny random-weight folders
built offline (export.hf.fastvlm.build_fastvlm), exact against transformers' generate (test_matrix)."""

import numpy as np
import pytest

from helpers import caption_without_torch
from runtime import Captioner
from runtime.preprocess import load_pixels, open_image



@pytest.fixture(scope="module")
def fastvlm(hf_model):
    return hf_model("fastvlm")


def test_pixels_and_prompt_ids_equal_the_processors(fastvlm, photo_paths):
    from export.hf.fastvlm import FAMILY

    src, pkg = fastvlm
    captioner = Captioner(pkg, provider="cpu")
    for path in photo_paths.values():
        ref = FAMILY.reference_inputs(src, [open_image(path)], "What is in the image?")
        assert np.abs(load_pixels(path, captioner.manifest.preprocess) - ref.pixel_values[0].numpy()).max() < 1e-6
        assert captioner.prompting.chat("What is in the image?", [(0, 0)]).tolist() == ref.input_ids[0].tolist()


def test_the_cli_answers_without_torch(fastvlm):
    _, pkg = fastvlm
    r = caption_without_torch("--model", pkg, "runtime/samples/chelsea.jpg", "--question", "What is in the image?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(": ", 1)[1].rstrip("\n") == Captioner(pkg, provider="cpu").caption(
        "runtime/samples/chelsea.jpg", question="What is in the image?").text
