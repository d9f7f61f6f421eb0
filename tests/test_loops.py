"""The bundled captioner never loops: on images that are no photos (diagrams, charts, icons, noise,
...; benchmarks/odd_images.py) every caption ends with EOS before the length limit and repeats no
token 3-gram, greedy and beam 4, FP32 and INT8. Before the decoder was retrained on such
classifier outputs, 6 of these captions ran to the limit ("a photo of an envelope or an an an ...")."""

import pytest

from benchmarks.loops import repeats_ngram
from benchmarks.odd_images import odd_images
from runtime import Captioner


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory):
    return [str(p) for p in odd_images(360, tmp_path_factory.mktemp("odd"))]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_captions_of_odd_images_end_and_do_not_repeat(odd_paths, precision, num_beams):
    cap = Captioner(precision=precision, provider="cpu")
    limit = cap.generation_config().max_new_tokens
    captions = [c for c in cap.caption(odd_paths, num_beams=num_beams) if c.error is None]
    assert len(captions) >= 355
    assert [c.text for c in captions if len(c.tokens) >= limit or repeats_ngram(c.tokens)] == []


def test_the_bundled_packages_guard_against_repeats():
    for precision in ("fp32", "int8"):
        assert Captioner(precision=precision, provider="cpu").defaults.no_repeat_ngram_size == 3
