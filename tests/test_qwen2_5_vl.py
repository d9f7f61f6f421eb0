"""Qwen2.5-VL, a third LLM-based family: a ViT over the photo at its own aspect ratio (smart_resize,
windowed attention, a 2x2 merger) and a Qwen2 language model with 3-D rotary positions (M-RoPE),
which the exports of peers get wrong (the issue's alibaba/MNN#3345, wangzhaode/llm-export#79).
Tiny random-weight folders built offline with the real processor and chat template
(export.hf.qwen2_5_vl.build_qwen2_5_vl), one also at a trained checkpoint's scale; exact against
transformers' generate on photos of several sizes (grids), greedy and beam 3, three questions (test_matrix)."""

import numpy as np
import pytest
from PIL import Image

from helpers import caption_without_torch, hf_pair, photos, transparent
from runtime import Captioner
from runtime.preprocess import open_image, to_grid



@pytest.fixture(scope="module")
def qwen(hf_model):
    return {"tiny": hf_model("qwen2_5_vl"), "tiny-real": hf_model("qwen2_5_vl-real")}


@pytest.fixture(scope="module")
def images(chat_photo_paths) -> list:
    """Photos whose grids differ: square, 4:3, 2:1, 1:3 and a tiny one scaled up to min_pixels."""
    return chat_photo_paths


def test_pixels_and_prompt_ids_equal_the_processors(qwen, images):
    """smart_resize and normalization bit for bit (PIL backend, BICUBIC), cut into the processor's
    patches (merge-block order, two frames each); the grid; the prompt ids with one <|image_pad|>
    per merged patch."""
    import torch

    from export.hf.qwen2_5_vl import FAMILY, patches

    src, pkg = qwen["tiny"]
    captioner = Captioner(pkg, provider="cpu")
    grids = set()
    for path in [*images, *(Image.fromarray(a) for a in photos().values()), *transparent().values()]:
        image = open_image(path)
        pixels, rows, cols = to_grid(image, captioner.manifest.preprocess)
        ref = FAMILY.reference_inputs(src, [image], "What is in the image?")
        flat, grid = patches(torch.from_numpy(pixels[None]))
        assert np.array_equal(flat.numpy(), ref.pixel_values.numpy())
        assert grid.tolist() == ref.image_grid_thw.tolist() == [[1, 2 * rows, 2 * cols]]
        assert captioner.prompting.chat("What is in the image?", [(rows, cols)]).tolist() == ref.input_ids[0].tolist()
        grids.add((rows, cols))
    assert len(grids) >= 5 and any(r > c for r, c in grids) and any(c > r for r, c in grids)


def test_a_realistic_scale_model_answers_exactly(qwen, images):
    """Logits in the tens to hundreds and two residual dimensions at +-400, as trained checkpoints have."""
    captioner, ref = hf_pair(*qwen["tiny-real"])
    cfg = captioner.generation_config()
    assert [c.tokens for c in captioner.caption(images)] == [ref.generate([p], cfg)[0] for p in images]


def test_m_rope_positions_are_what_transformers_assigns(qwen, images):
    """The step's 3-D positions (export.hf.llm.mrope_positions from the runtime's image grid) equal
    transformers' get_rope_index for the prompt and the tokens after it."""
    import torch

    from export.hf.llm import mrope_positions
    from export.hf.qwen2_5_vl import FAMILY
    from runtime.search import image_grid

    src, pkg = qwen["tiny"]
    captioner, ref = hf_pair(src, pkg)
    for path in images:
        _, (rows, cols) = captioner.chat_tiles(path)
        prompt = captioner.prompting.chat(None, [(rows, cols)])
        inputs = FAMILY.reference_inputs(src, [open_image(path)], captioner.manifest.prompting.chat["question"])
        want, delta = ref.model.model.get_rope_index(inputs.input_ids, inputs.mm_token_type_ids, inputs.image_grid_thw)
        grid = torch.from_numpy(image_grid(prompt[None], captioner.manifest.decoder.image_token, (rows, cols)))
        positions = torch.arange(len(prompt) + 5)[None]
        got = mrope_positions(positions, grid)
        assert torch.equal(got[:, :, : len(prompt)], want)
        assert torch.equal(got[:, 0, len(prompt):], (positions[0, len(prompt):] + delta[0]).expand(3, -1))


def test_the_cli_answers_without_torch(qwen, images):
    _, pkg = qwen["tiny"]
    r = caption_without_torch("--model", pkg, images[1], images[3], "--question", "What is in the image?")
    assert r.returncode == 0, r.stderr
    answers = Captioner(pkg, provider="cpu").caption(images[1:4:2], question="What is in the image?")
    assert r.stdout.split("\n") == [*(f"{p}: {c.text}" for p, c in zip(images[1:4:2], answers)), ""]
