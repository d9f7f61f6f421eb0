"""Qwen2.5-VL, a third LLM-based family: a ViT over the photo at its own aspect ratio (smart_resize,
windowed attention, a 2x2 merger) and a Qwen2 language model with 3-D rotary positions (M-RoPE),
which the exports of peers get wrong (the issue's alibaba/MNN#3345, wangzhaode/llm-export#79).
Tiny random-weight folders built offline with the real processor and chat template
(export.hf_random.build_qwen2_5_vl), one also at a trained checkpoint's scale; exact against
transformers' generate on photos of several sizes (grids), greedy and beam 3, three questions."""

import numpy as np
import pytest
from PIL import Image

from helpers import caption_without_torch, hf_pair, photos, same_size_photos, saved, transparent
from runtime import Captioner
from runtime.preprocess import open_image, to_grid

QUESTIONS = [None, "What is in the image?", "How many animals are there?"]  # None: the package's default


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from export.check import Tolerance
    from export.hf import export_hf
    from export.hf_random import build_qwen2_5_vl

    root, out = tmp_path_factory.mktemp("qwen2_5_vl"), {}
    for name, settings in {"tiny": {}, "tiny-real": {"seed": 1, "realistic": True}}.items():
        build_qwen2_5_vl(root / name, **settings)
        # at a trained checkpoint's scale, logits in the thousands: judged at rtol 1e-3, as the README
        # tells users of such checkpoints (the token checks below are exact either way)
        export_hf(root / name, root / f"{name}.pkg", tol=Tolerance(rtol=1e-3) if name == "tiny-real" else Tolerance())
        out[name] = (root / name, root / f"{name}.pkg")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    """Photos whose grids differ: square, 4:3, 2:1 and 1:3 (a grid whose rows outnumber its columns,
    which M-RoPE's text positions after the image depend on), and a tiny one scaled up to min_pixels."""
    pictures = photos()
    arrays = [pictures["astronaut"], pictures["chelsea"],
              np.asarray(Image.fromarray(pictures["rocket"]).resize((400, 200))),
              np.asarray(Image.fromarray(pictures["coffee"]).resize((120, 360))),
              np.asarray(Image.fromarray(pictures["motorcycle"]).resize((30, 20)))]
    return saved(tmp_path_factory.mktemp("qwen-images"), {str(i): a for i, a in enumerate(arrays)})


@pytest.fixture(scope="module")
def same_size(tmp_path_factory) -> list:
    return same_size_photos(tmp_path_factory.mktemp("qwen-same"))


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


@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_equal_transformers_generate(qwen, images, same_size, num_beams):
    """Token for token, every photo and question, one by one and batched (same-size photos share a
    grid and a prompt: one pass), cache = no cache."""
    captioner, ref = hf_pair(*qwen["tiny"])
    seen = []
    for question in QUESTIONS:
        cfg = captioner.generation_config(num_beams=num_beams, question=question)
        ours = [c.tokens for c in captioner.caption(images, num_beams=num_beams, question=question)]
        assert ours == [ref.generate([p], cfg, question=question)[0] for p in images]
        assert ours == [c.tokens for c in captioner.caption(images, num_beams=num_beams, question=question, cache=False)]
        batch = [c.tokens for c in captioner.caption(same_size, num_beams=num_beams, question=question)]
        assert batch == ref.generate(same_size, cfg, question=question)
        seen.append(ours)
    assert len({tuple(t) for t in seen[0]}) > 2 and seen[0] != seen[1]


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


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_packages_keep_cache_and_batch_exact(qwen, images, same_size, tmp_path, precision):
    """A vision graph at the photo's own size quantizes (its NaN/Inf check feeds a photo-sized input
    and the M-RoPE grid: before, it fed the graph's symbolic dims and failed), and the package keeps
    with cache = without, batched = one by one."""
    from export.quantize import quantize_package

    quantize_package(qwen["tiny"][1], precision, tmp_path / precision)
    captioner = Captioner(tmp_path / precision)
    one_by_one = [captioner.caption(p).tokens for p in images]
    assert [c.tokens for c in captioner.caption(images, cache=False)] == one_by_one
    assert [c.tokens for c in captioner.caption(same_size)] == [captioner.caption(p).tokens for p in same_size]
