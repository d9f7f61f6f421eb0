"""What every package keeps, as one matrix: family x precision x cache x batch x search.

An FP32 package of every family writes its reference's tokens exactly (transformers' own `generate`
on the folder it was exported from; eager PyTorch for the bundled model), for every photo and
every request of its case, greedy and beam search, one image at a time, batched (several images
in one pass: fixed-size families take the whole set, chat families the photos that share a grid)
and without the KV cache (every step recomputes the whole prefix). A quantized package has no
token reference (random weights leave no margin for that) and keeps cache = no cache and batched
= one by one exactly. Family-specific behaviour (pixels, prompts, every Florence-2 task, M-RoPE,
refusals) is tested in each family's module over the same session-wide packages (conftest)."""

import pytest

from runtime import Captioner
from runtime.engine import BUNDLED

QUESTIONS = ["what is in the picture?", "how many dogs are there"]
TASKS = [{"task": "<OD>"}, {"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a cat on a sofa"}]
CHAT = [{}, {"question": "What is in the image?"}, {"question": "How many animals are there?"}]  # {}: the default
# Each family's case: the requests it is asked (max_new_tokens where a short answer shows enough).
CASES = {
    "bundled": [{}],
    **{name: [{}] for name in ("vit-gpt2", "deit-bert", "swin-gpt2", "blip", "vit-gpt2-real", "blip-real", "git")},
    **{name: [{"question": q, "max_new_tokens": 10} for q in QUESTIONS] for name in ("git-vqa", "blip-vqa", "blip-vqa-real")},
    **{name: [{**t, "max_new_tokens": 12} for t in TASKS] for name in ("florence2-w2", "florence2-w3")},
    "smolvlm": CHAT[:2], "fastvlm": CHAT[:2], "qwen2_5_vl": CHAT,
}
CHAT_FAMILIES = ("smolvlm", "fastvlm", "qwen2_5_vl")
RUN_TO_THE_LIMIT = ("florence2-w2", "florence2-w3", "git-vqa")  # random weights that never stop sooner (greedy)
QUANTIZED = [("bundled", "int8"), ("florence2-w3", "int8"), ("florence2-w3", "fp16"), ("smolvlm-real", "int8"),
             ("smolvlm-real", "int4"), ("qwen2_5_vl", "int8"), ("qwen2_5_vl", "int4")]


def tokens(results) -> list[list[int]]:
    return [r.tokens for r in results]


def photos_of(name: str, request) -> tuple[list, list]:
    """(photos, a batch of them): chat families get several grids and tilings (square, 4:3, 2:1, 1:3,
    one below the minimum size) and, to batch, three photos of one size; the bundled model also
    generated images; the others the photos, all of one size once preprocessed."""
    if name.removesuffix("-real") in CHAT_FAMILIES:
        return request.getfixturevalue("chat_photo_paths"), request.getfixturevalue("same_size_paths")
    photos = request.getfixturevalue("image_paths" if name == "bundled" else "photo_paths")
    photos = list(photos.values()) if isinstance(photos, dict) else photos
    return photos, photos


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_fp32_writes_the_references_tokens_cached_or_not_batched_or_not(name, num_beams, request):
    if name == "bundled":
        captioner, ref = request.getfixturevalue("captioner"), request.getfixturevalue("reference")
    else:
        from helpers import hf_pair

        captioner, ref = hf_pair(*request.getfixturevalue("hf_model")(name))
    photos, batch = photos_of(name, request)
    seen = []
    for asked in CASES[name]:
        asked = {**asked, "num_beams": num_beams}
        cfg = captioner.generation_config(**asked)
        given = {k: v for k, v in asked.items() if k in ("question", "task", "text")}
        want = [ref.generate([p], cfg, **given)[0] for p in photos]
        one_by_one = [captioner.caption(p, **asked).tokens for p in photos]
        assert one_by_one == want, asked
        assert tokens(captioner.caption(photos, cache=False, **asked)) == want, asked
        together = one_by_one if batch is photos else [captioner.caption(p, **asked).tokens for p in batch]
        assert tokens(captioner.caption(batch, **asked)) == together, asked
        seen.append(want)
    # A subject that can tell: answers differ by image and by request, and end at different lengths.
    assert all(len({tuple(t) for t in want}) > 1 for want in seen)
    assert len({tuple(map(tuple, want)) for want in seen}) == len(seen)
    if name not in RUN_TO_THE_LIMIT:
        assert len({len(t) for want in seen for t in want}) > 1


@pytest.mark.parametrize("name, precision", QUANTIZED)
def test_quantized_packages_keep_cache_and_batch_exact(name, precision, request):
    package = BUNDLED[precision] if name == "bundled" else request.getfixturevalue("quantized")(name, precision)
    captioner = Captioner(package, provider="cpu")
    assert captioner.manifest.data["precision"] == precision
    photos, batch = photos_of(name, request)
    for asked in CASES[name.removesuffix("-real")]:
        asked = {**asked, "num_beams": 1}
        one_by_one = [captioner.caption(p, **asked).tokens for p in photos]
        assert tokens(captioner.caption(photos, cache=False, **asked)) == one_by_one, asked
        together = one_by_one if batch is photos else [captioner.caption(p, **asked).tokens for p in batch]
        assert tokens(captioner.caption(batch, **asked)) == together, asked
