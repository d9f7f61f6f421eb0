"""The export side: the encoder definition, deterministic training, and a full export
of the committed checkpoint that reproduces the committed package."""

import numpy as np
import torch

from export.encoder import load_pretrained, pretrained_weights_path
from export import DEFAULT_CHECKPOINT
from export.train import TrainConfig, train
from runtime import DEFAULT_MODEL, Captioner
from runtime.manifest import load_manifest
from runtime.preprocess import load_pixels


def test_encoder_equals_upstream_efficientnet_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    upstream = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pretrained_weights_path()).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(load_pretrained()(x), upstream(x), atol=1e-5)


def test_training_is_deterministic(tmp_path):
    cfg = TrainConfig(steps=4, examples=600, heldout=8, vocab_size=700, batch_size=32)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    train(cfg, a)
    train(cfg, b)
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["tokenizer"] == cb["tokenizer"] and ca["train"] == cb["train"]
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])


def test_export_reproduces_the_committed_package(tmp_path, photo_paths):
    from export.bundled import export_package

    out = tmp_path / "pkg"
    export_package(DEFAULT_CHECKPOINT, out)
    fresh, committed = load_manifest(out).data, load_manifest(DEFAULT_MODEL).data
    for key in ("graphs", "decoder", "preprocess", "tokenizer", "generation", "prompting"):
        assert fresh[key] == committed[key], key
    assert fresh["files"]["tokenizer.json"] == committed["files"]["tokenizer.json"]
    a, b = Captioner(out), Captioner(DEFAULT_MODEL)
    pixels = np.stack([load_pixels(p, a.manifest.preprocess) for p in photo_paths.values()])
    assert np.abs(np.stack(a.graphs.encode(pixels)[0]) - np.stack(b.graphs.encode(pixels)[0])).max() < 1e-5
    cfg = a.generation_config()
    assert a.generate(pixels, cfg) == b.generate(pixels, cfg)
