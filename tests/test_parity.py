"""FP32 runtime vs eager PyTorch, token for token, on real photos and generated images."""

import numpy as np
import pytest

from runtime.preprocess import load_pixels


def runtime_tokens(captioner, paths, num_beams=1):
    pixels = np.stack([load_pixels(p, captioner.manifest.preprocess) for p in paths])
    return captioner.generate(pixels, captioner.generation_config(num_beams=num_beams))


@pytest.mark.parametrize("num_beams", [1, 4])
def test_runtime_equals_eager_pytorch(captioner, reference, image_paths, num_beams):
    cfg = captioner.generation_config(num_beams=num_beams)
    for path in image_paths:
        want = reference.generate([path], cfg)[0]
        got = runtime_tokens(captioner, [path], num_beams)[0]
        assert got == want, f"{path.name}: {captioner.decode(got)!r} != {reference.decode(want)!r}"
        assert want, f"{path.name}: empty caption"


def test_teacher_forced_logits_match(captioner, photo_paths):
    from benchmarks.parity import run

    result = run(captioner.manifest.root, None, [str(p) for p in photo_paths.values()])
    assert result["exact_caption_match"] == 1.0
    assert result["teacher_forced_top1"] == 1.0
    assert result["max_abs_logit_diff"] < 1e-3 and result["max_rel_logit_diff"] < 1e-5


@pytest.mark.parametrize("num_beams", [1, 4])
def test_kv_cache_equals_recomputing_the_prefix(captioner, image_paths, num_beams):
    pixels = np.stack([load_pixels(p, captioner.manifest.preprocess) for p in image_paths])
    cfg = captioner.generation_config(num_beams=num_beams)
    assert captioner.generate(pixels, cfg) == captioner.generate(pixels, cfg, cache=False)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batch_equals_one_by_one(captioner, image_paths, num_beams):
    batched = runtime_tokens(captioner, image_paths, num_beams)
    single = [runtime_tokens(captioner, [p], num_beams)[0] for p in image_paths]
    assert batched == single
    assert len({len(t) for t in single}) > 1, "captions of different lengths exercise ragged finishing"


def test_default_model_says_true_things(captioner, photo_paths):
    cat = captioner.caption(photo_paths["chelsea"]).text
    coffee = captioner.caption(photo_paths["coffee"]).text
    assert "cat" in cat.split(), cat
    assert {"espresso", "coffee", "cup"} & set(coffee.replace(",", " ").split()), coffee
    rocket = captioner.caption(photo_paths["rocket"]).text
    assert "missile" in rocket or "projectile" in rocket or "space shuttle" in rocket, rocket


def test_beams_and_max_tokens_reach_the_search(captioner, reference, photo_paths, monkeypatch):
    """`num_beams` and `max_new_tokens` arrive in the search as asked (this confident model's beams
    pick its greedy words, so the tokens alone could not tell), and the tokens are the eager
    reference's at that setting."""
    import runtime.graphs
    import runtime.search

    searched = []
    generate = runtime.search.generate

    def spy(step, state, prompt, eos, cfg):
        searched.append((cfg.num_beams, cfg.max_new_tokens))
        return generate(step, state, prompt, eos, cfg)

    monkeypatch.setattr(runtime.graphs, "generate", spy)
    for beams in (1, 4):
        c = captioner.caption(photo_paths["chelsea"], max_new_tokens=3, num_beams=beams)
        assert c.tokens == reference.generate([photo_paths["chelsea"]], captioner.generation_config(3, beams))[0]
        assert 1 <= len(c.tokens) <= 3
    assert searched == [(1, 3), (4, 3)]


def test_rates_come_with_what_their_image_count_can_tell():
    from benchmarks.parity import wilson

    assert wilson(12, 12) == [0.7575, 1.0]  # 12 of 12 only says >= 76%
    assert wilson(195, 200) == [0.9428, 0.9893]
    assert wilson(0, 5) == [0.0, 0.4345]
