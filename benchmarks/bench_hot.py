"""pytest-benchmark suites for the hot functions (not part of the test run):

    python -m pytest benchmarks/bench_hot.py --benchmark-enable --benchmark-columns=median,iqr,rounds

Preprocessing, the vision graph, one decoder step with a half-full cache, and a whole
caption at batch 1, greedy, on the bundled model's FP32 and INT8 variants, CPU provider."""

import pytest

from runtime import DEFAULT_MODEL, Captioner
from runtime.preprocess import load_pixels
from runtime.search import cached, decode_one_token, prefill

SAMPLE = DEFAULT_MODEL.parent.parent / "samples" / "chelsea.jpg"


@pytest.fixture(scope="module", params=["fp32", "int8"])
def captioner(request):
    return Captioner(provider="cpu", precision=request.param)


@pytest.fixture(scope="module")
def pixels(captioner):
    return load_pixels(SAMPLE, captioner.manifest.preprocess)[None]


def test_preprocess(benchmark, captioner):
    out = benchmark(load_pixels, SAMPLE, captioner.manifest.preprocess)
    assert out.shape == (3, 224, 224)


def test_vision_graph(benchmark, captioner, pixels):
    keys, _ = benchmark(captioner.graphs.encode, pixels)
    assert keys[0].shape[0] == 1


def test_decode_one_token(benchmark, captioner, pixels):
    step = cached(captioner.graphs.step)
    slots = captioner.manifest.max_positions
    logits, state = prefill(step, captioner.graphs.start(captioner.graphs.encode(pixels), slots), captioner.prompting.prefix[None])
    for _ in range(captioner.manifest.max_positions // 2):  # a half-full cache, like mid-caption
        logits, state = decode_one_token(step, state, logits.argmax(-1))
    out, _ = benchmark(decode_one_token, step, state, logits.argmax(-1))
    assert out.shape == (1, captioner.tokenizer.get_vocab_size())


def test_caption(benchmark, captioner):
    assert "cat" in benchmark(captioner.caption, SAMPLE).text.split()
