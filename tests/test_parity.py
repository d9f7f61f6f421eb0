"""The bundled FP32 package vs eager PyTorch beyond tokens (those are test_matrix's): the parity
report's logits, the sample captions' truth, the search settings as asked."""


def test_teacher_forced_logits_match(captioner, photo_paths):
    from benchmarks.parity import run

    result = run(captioner.manifest.root, None, [str(p) for p in photo_paths.values()])
    assert result["exact_caption_match"] == 1.0
    assert result["teacher_forced_top1"] == 1.0
    assert result["max_abs_logit_diff"] < 1e-3 and result["max_rel_logit_diff"] < 1e-5


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
