"""Greedy and beam search on a toy decoder whose logits depend on the whole prefix,
checked against exhaustive search and against their own batched/unbatched runs."""

import itertools

import numpy as np
import pytest

from runtime.search import (GenerationConfig, beam_search, cached, empty_cache, generate, greedy, initial_state,
                            log_softmax, prefix_logits, sample_next_token, sampling_scores, uncached)

VOCAB, EOS, BOS = 4, 0, 3


def toy_graph_step(seed: int):
    """A GraphStep whose next-token logits are a fixed random function of (image, prefix).
    It needs the full prefix, so it runs under `uncached` (the cache is never read)."""
    table = np.random.default_rng(seed).normal(scale=2.0, size=(4096, VOCAB)).astype(np.float32)

    def step(input_ids, position_ids, cache, memory, logit_index):
        image = memory[0][0][:, 0, 0, 0].astype(np.int64)
        rows = [[hash((int(i), *map(int, ids[: p + 1]))) % len(table) for p in picked]
                for i, ids, picked in zip(image, input_ids, logit_index)]
        return table[np.array(rows)]

    return step


def toy_state(images, slots=16):
    cross = np.asarray(images, np.float32).reshape(-1, 1, 1, 1)
    return initial_state(empty_cache(1, len(images), 1, slots, 1), ([cross], [cross]))


def toy_logprobs(step, image, prefix):
    ids = np.array([[BOS, *prefix]], dtype=np.int64)
    return log_softmax(prefix_logits(step, toy_state([image]), ids)[0, -1])


def exhaustive_best(step, image, max_new, length_penalty):
    """Every sequence that ends at EOS within `max_new` tokens (EOS counted) or runs to the
    limit without it, scored like beam search."""
    words = range(1, VOCAB)
    finished = [[*seq, EOS] for n in range(max_new) for seq in itertools.product(words, repeat=n)]
    at_limit = [list(seq) for seq in itertools.product(words, repeat=max_new)]
    best = (-np.inf, None)
    for s in finished + at_limit:
        total = sum(toy_logprobs(step, image, s[:i])[s[i]] for i in range(len(s)))
        tokens = s[:-1] if s[-1] == EOS else s
        best = max(best, (total / len(s) ** length_penalty, tokens), key=lambda b: b[0])
    return best[1]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_search_is_exhaustive(length_penalty):
    step = toy_graph_step(1)
    for image in range(6):
        # 3 non-EOS tokens, 3 steps: 36 beams never prune anything.
        cfg = GenerationConfig(max_new_tokens=3, num_beams=36, length_penalty=length_penalty)
        got = beam_search(uncached(step), toy_state([image]), np.array([[BOS]]), EOS, cfg)[0]
        assert got == exhaustive_best(step, image, 3, length_penalty)


def test_greedy_takes_the_argmax_path_and_stops_at_eos():
    step = toy_graph_step(2)
    for image in range(8):
        got = greedy(uncached(step), toy_state([image]), np.array([[BOS]]), EOS, GenerationConfig(6))[0]
        prefix = []
        while len(prefix) < 6:
            nxt = int(toy_logprobs(step, image, prefix).argmax())
            if nxt == EOS:
                break
            prefix.append(nxt)
        assert got == prefix


@pytest.mark.parametrize("beams", [1, 2, 4])
def test_batched_search_equals_one_image_at_a_time(beams):
    """Ragged finishing: images end at different steps, rows of finished ones idle."""
    step, images = uncached(toy_graph_step(3)), list(range(7))
    prompt = np.full((len(images), 1), BOS)

    def search(state, p):
        return generate(step, state, p, EOS, GenerationConfig(max_new_tokens=8, num_beams=beams))

    batched = search(toy_state(images), prompt)
    single = [search(toy_state([i]), prompt[:1])[0] for i in images]
    assert batched == single
    assert len({len(t) for t in single}) > 1, "the toy should finish at different lengths"


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.5, 20, 0.8),
                                                       (2.0, 1, 0.5), (1.0, 0, 1e-6)])
def test_sampling_filters_equal_transformers_warpers(temperature, top_k, top_p):
    """Temperature, top-k and top-p as transformers' generate applies them, in its order."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = np.random.default_rng(0).normal(scale=6.0, size=(5, 1000)).astype(np.float32)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    want = warpers(None, torch.from_numpy(logits)).numpy()
    got = sampling_scores(logits, GenerationConfig(8, temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    assert np.isfinite(got).sum(-1).min() >= 1  # the most likely token is always kept


def test_samples_follow_the_filtered_distribution():
    """10,000 draws from five tokens: each token's frequency within 4.5 binomial standard errors of
    its probability; top_k 3 never draws the other two."""
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0]], dtype=np.float32)
    for cfg in (GenerationConfig(8, temperature=1.0), GenerationConfig(8, temperature=0.5, top_k=3)):
        rng = [np.random.default_rng(7)]
        draws = np.array([sample_next_token(logits, cfg, rng)[0] for _ in range(10_000)])
        probs = np.exp(log_softmax(sampling_scores(logits, cfg).astype(np.float64)))[0]
        freq = np.bincount(draws, minlength=5) / len(draws)
        assert np.all(np.abs(freq - probs) <= 4.5 * np.sqrt(probs * (1 - probs) / len(draws)) + 1e-12), (freq, probs)


def test_sampling_is_seeded_per_row_and_temperature_zero_is_greedy():
    step, images = uncached(toy_graph_step(4)), list(range(6))
    prompt = np.full((len(images), 1), BOS)

    def sample(state, p, **kw):
        return generate(step, state, p, EOS, GenerationConfig(max_new_tokens=8, **kw))

    hot = {"temperature": 3.0, "seed": 11}
    batched = sample(toy_state(images), prompt, **hot)
    assert batched == sample(toy_state(images), prompt, **hot)  # the same seed, the same tokens
    assert batched == [sample(toy_state([i]), prompt[:1], **hot)[0] for i in images]  # whatever the batch
    others = [sample(toy_state(images), prompt, temperature=3.0, seed=s) for s in range(12, 16)]
    assert any(o != batched for o in others), "other seeds should draw other tokens"
    greedy_tokens = sample(toy_state(images), prompt)
    assert sample(toy_state(images), prompt, temperature=0.0, seed=3) == greedy_tokens
    assert sample(toy_state(images), prompt, temperature=1.0, top_k=1, seed=3) == greedy_tokens
    with pytest.raises(ValueError, match="one beam"):
        GenerationConfig(8, num_beams=2, temperature=1.0)
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(ValueError, match="temperature must be"):
            GenerationConfig(8, **bad)


def test_cached_and_uncached_feed_the_graph_differently():
    """`cached` feeds one new token after the cached ones, at the next position, asking for the
    last position's logits; `uncached` the whole prefix over the cache rewound, from position 0.
    Either way the cache keeps its buffers and capacity."""
    seen = []

    def spy(input_ids, position_ids, cache, memory, logit_index):
        seen.append((input_ids.shape[1], position_ids[0].tolist(), int(cache.lengths[0]), cache.capacity,
                     logit_index[0].tolist()))
        return np.tile(np.float32([0, 1, 0, 0]), (len(input_ids), logit_index.shape[1], 1))

    state = toy_state([0], slots=3)
    greedy(cached(spy), state, np.array([[BOS]]), EOS, GenerationConfig(3))
    assert seen == [(1, [0], 0, 3, [0]), (1, [1], 1, 3, [0]), (1, [2], 2, 3, [0])]
    seen.clear()
    greedy(uncached(spy), state, np.array([[BOS]]), EOS, GenerationConfig(3))
    assert seen == [(1, [0], 0, 3, [0]), (2, [0, 1], 0, 3, [0, 1]), (3, [0, 1, 2], 0, 3, [0, 1, 2])]


def test_a_cache_is_reordered_in_place_copying_only_rows_that_change_parent():
    cache = empty_cache(2, 4, 1, 6, 2).advanced(3)
    for buffer in (*cache.keys, *cache.values):
        buffer[...] = np.arange(4)[:, None, None, None] + 10 * np.arange(6)[None, None, :, None]
    before = [b.copy() for b in cache.keys]
    reordered = cache.reorder(np.array([0, 0, 3, 3]))  # beams 1 and 2 continue beams 0 and 3
    assert all(a is b for a, b in zip(reordered.keys, cache.keys))  # the same buffers, bound to the graph
    for buffer, old in zip(reordered.keys, before):
        assert buffer[:, 0, :3, 0].tolist() == [[0, 10, 20], [0, 10, 20], [3, 13, 23], [3, 13, 23]]
        assert (buffer[:, :, 3:] == old[:, :, 3:]).all()  # slots not yet written are not copied
    assert reordered.lengths.tolist() == [3] * 4
    prefix = empty_cache(1, 2, 1, 4, 1, prefix=([np.ones((2, 1, 3, 1))], [np.ones((2, 1, 3, 1))]))
    assert prefix.lengths.tolist() == [3, 3] and prefix.capacity == 7
    assert prefix.advanced(2).rewound().lengths.tolist() == [3, 3]  # the prefix stays
