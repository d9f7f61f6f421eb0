"""FastVLM, a second LLM-based family over the same machinery: a convolutional vision tower (timm's
fastvit_mci3 through transformers' timm wrapper) over one fixed-size image, a Qwen2 language model
with grouped-query attention and q/k/v biases, the LLaVA prompt layout. Tiny random-weight folders
built offline (export.hf_random.build_fastvlm), exact against transformers' generate."""

import numpy as np
import pytest

from helpers import caption_without_torch, hf_pair
from runtime import Captioner
from runtime.preprocess import load_pixels, open_image

QUESTIONS = [None, "What is in the image?"]


@pytest.fixture(scope="module")
def fastvlm(tmp_path_factory):
    from export.hf import export_hf
    from export.hf_random import build_fastvlm

    root = tmp_path_factory.mktemp("fastvlm")
    build_fastvlm(root / "tiny")
    export_hf(root / "tiny", root / "tiny.pkg")
    return root / "tiny", root / "tiny.pkg"


def test_pixels_and_prompt_ids_equal_the_processors(fastvlm, photo_paths):
    from export.hf.fastvlm import FAMILY

    src, pkg = fastvlm
    captioner = Captioner(pkg, provider="cpu")
    for path in photo_paths.values():
        ref = FAMILY.reference_inputs(src, [open_image(path)], "What is in the image?")
        assert np.abs(load_pixels(path, captioner.manifest.preprocess) - ref.pixel_values[0].numpy()).max() < 1e-6
        assert captioner.prompting.chat("What is in the image?", [(0, 0)]).tolist() == ref.input_ids[0].tolist()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_equal_transformers_generate(fastvlm, photo_paths, num_beams):
    captioner, ref = hf_pair(*fastvlm)
    paths, seen = list(photo_paths.values()), []
    for question in QUESTIONS:
        cfg = captioner.generation_config(num_beams=num_beams, question=question)
        ours = [c.tokens for c in captioner.caption(paths, num_beams=num_beams, question=question)]
        assert ours == [ref.generate([p], cfg, question=question)[0] for p in paths]
        assert ours == [c.tokens for c in captioner.caption(paths, num_beams=num_beams, question=question, cache=False)]
        assert ours[:3] == ref.generate(paths[:3], cfg, question=question)  # one fixed size: one batch
        seen.append(ours)
    assert len({tuple(t) for t in seen[0]}) > 1 and seen[0] != seen[1]


def test_the_cli_answers_without_torch(fastvlm):
    _, pkg = fastvlm
    r = caption_without_torch("--model", pkg, "runtime/samples/chelsea.jpg", "--question", "What is in the image?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(": ", 1)[1].rstrip("\n") == Captioner(pkg, provider="cpu").caption(
        "runtime/samples/chelsea.jpg", question="What is in the image?").text
