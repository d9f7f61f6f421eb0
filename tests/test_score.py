"""Scoring texts against an image (`Captioner.score`): the log-likelihood the eager model gives
each text, all texts of an image in one batched pass; and zero-shot recognition over it
(`python -m runtime.classify`). The Hugging Face families are checked in test_hf.py."""

import json

import numpy as np
import pytest

from helpers import TEXTS, reference_scores, without_torch
from runtime import Captioner, ImageError


def test_scores_equal_the_eager_models_log_likelihood(captioner, reference, photo_paths):
    for image in (photo_paths["chelsea"], photo_paths["coffee"]):
        texts = [*TEXTS, captioner.caption(image).text]
        got, want = np.array(captioner.score(image, texts)), np.array(reference_scores(reference, image, captioner, texts))
        np.testing.assert_allclose(got, want, rtol=1e-4)
        assert got.argmax() == len(texts) - 1  # the model's own caption is the likeliest text


def test_batching_and_padding_change_no_score(photo_paths):
    """Texts scored max_batch at a time, padded to the longest of their pass, or each alone: the same."""
    image, texts = photo_paths["astronaut"], TEXTS * 3
    alone = [Captioner(provider="cpu", precision="fp32").score(image, [t])[0] for t in texts]
    np.testing.assert_allclose(Captioner(provider="cpu", precision="fp32", max_batch=5).score(image, texts), alone,
                               rtol=1e-6)


def test_mean_is_per_scored_token(captioner, photo_paths):
    total, mean = captioner.score(photo_paths["chelsea"], ["espresso"]), captioner.score(photo_paths["chelsea"],
                                                                                       ["espresso"], mean=True)
    tokens = len(captioner.tokenizer.encode("espresso", add_special_tokens=False).ids) + 1  # and the end
    assert mean[0] == pytest.approx(total[0] / tokens)


def test_bad_score_requests(captioner, photo_paths):
    with pytest.raises(ValueError, match="no texts to score"):
        captioner.score(photo_paths["chelsea"], [])
    with pytest.raises(ValueError, match=r"is 0 tokens; this model scores 1 to 39"):
        captioner.score(photo_paths["chelsea"], [""])
    with pytest.raises(ValueError, match=r"tokens; this model scores 1 to 39"):
        captioner.score(photo_paths["chelsea"], ["a cat " * 30])
    with pytest.raises(ImageError, match="no such file"):
        captioner.score("missing.jpg", ["a cat"])


def test_classify_ranks_labels_by_likelihood(photo_paths, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\nespresso\nrocket\ncat\n")  # blank lines and repeats are dropped
    r = without_torch("runtime.classify", photo_paths["chelsea"], photo_paths["coffee"],
                                          tmp_path / "missing.jpg", "--labels-file", labels,
                                          "--template", "a photo of {}", "--json", "--top", "2")
    assert r.returncode == 1, r.stderr
    chelsea, coffee, missing = map(json.loads, r.stdout.splitlines())
    assert chelsea["labels"][0]["label"] == "cat"
    assert coffee["labels"][0]["label"] == "espresso" and len(coffee["labels"]) == 2
    assert chelsea["labels"][0]["probability"] > 0.5 > chelsea["labels"][1]["probability"]
    captioner = Captioner(provider="cpu")
    want = captioner.score(photo_paths["coffee"], ["a photo of cat", "a photo of espresso", "a photo of rocket"])
    assert coffee["labels"][0]["logprob"] == pytest.approx(want[1], abs=1e-4)
    assert missing == {"image": str(tmp_path / "missing.jpg"), "error": f"{tmp_path / 'missing.jpg'}: no such file"}


@pytest.mark.parametrize("args, message", [
    (["--labels", " , "], "no labels given"),
    (["--labels", "cat " * 50], "is 50 tokens; this model scores 1 to 39"),
    (["--labels", "cat", "--template", "a photo"], "--template must contain {} where the label goes"),
])
def test_classify_usage_errors(photo_paths, args, message):
    r = without_torch("runtime.classify", photo_paths["chelsea"], *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.splitlines()) == 1
