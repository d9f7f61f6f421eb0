"""Hugging Face captioners exported from a local folder: token-for-token parity with
transformers' own `generate` (greedy and beam 4, batch 1 and 3), logits, the checkpoint's
generation settings as package defaults, and clear refusals.

The folders are built offline with random weights (export.hf_random), conditioned so
that captions vary by image and end at different lengths; the "-real" ones also carry a trained
checkpoint's magnitudes (logits ~100, residual dimensions at +-400), where FP32 differences
between two correct implementations are far above a fixed 1e-4."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import ROOT, caption_without_torch, hf_pair
from export.check import ExportError, Tolerance
from runtime import Captioner
from runtime.preprocess import load_pixels
from runtime.search import until_eos

FAMILIES = ["vit-gpt2", "deit-bert", "swin-gpt2", "blip", "vit-gpt2-real", "blip-real", "git"]  # conftest.TEST_MODELS


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def exported(hf_model):
    """name -> (HF folder, package)."""
    return {name: hf_model(name) for name in FAMILIES}


def pair(exported, name):
    return hf_pair(*exported[name])


def runtime_tokens(captioner, paths, cfg):
    return captioner.generate(np.stack([load_pixels(p, captioner.manifest.preprocess) for p in paths]), cfg)


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_forced_logits_agree_relative_to_their_scale(exported, photo_paths, name):
    from benchmarks.parity import run

    src, pkg = exported[name]
    result = run(pkg, src, [str(p) for p in photo_paths.values()])
    assert result["exact_caption_match"] == 1.0 and result["teacher_forced_top1"] == 1.0
    assert result["max_rel_logit_diff"] < 1e-5
    assert result["cache_agreement"] == 1.0
    if name.endswith("-real"):  # the scale at which the old absolute 1e-4 self-check refused correct exports
        assert result["max_abs_logit_diff"] > 1e-4
    else:
        assert result["max_abs_logit_diff"] < 1e-4


def test_realistic_models_have_a_trained_checkpoints_scale(exported):
    """Logits in the tens to hundreds and residual dimensions in the hundreds, as in trained checkpoints;
    the export records how far ONNX Runtime was from eager, beyond the old absolute 1e-4."""
    from export.hf import load_model

    for name in ("vit-gpt2-real", "blip-real"):
        src, pkg = exported[name]
        family, model = load_model(src)
        manifest = Captioner(pkg, provider="cpu").manifest
        encoder, lm = (model.vision_model, model.text_decoder) if family.MODEL_TYPE == "blip" else (model.encoder, model.decoder)
        pixels = torch.randn(2, 3, *manifest.graph("vision")["inputs"][0]["shape"][2:])
        ids = torch.tensor([[*manifest.prompting.prefix, 5, 6, 7]] * 2)
        with torch.inference_mode():
            out = lm(input_ids=ids, encoder_hidden_states=encoder(pixel_values=pixels)[0], output_hidden_states=True)
        assert 50 < float(out.logits.abs().max()) < 1000, name
        assert max(float(h.abs().max()) for h in out.hidden_states[:-1]) >= 300, name
        assert manifest.data["source"]["onnx_vs_eager"]["max_abs_diff"] > 1e-4, name
        assert manifest.data["source"]["onnx_vs_eager"]["rtol"] == Tolerance.rtol


@pytest.mark.parametrize("settings", [{"no_repeat_ngram_size": 2}, {"length_penalty": 0.0, "early_stopping": True},
                                      {"length_penalty": 2.0, "early_stopping": "never"},
                                      {"length_penalty": -1.0, "no_repeat_ngram_size": 3}])
def test_beam_settings_follow_transformers(exported, photo_paths, settings):
    captioner, ref = pair(exported, "vit-gpt2")
    cfg = replace(captioner.generation_config(num_beams=4), **settings)
    paths = list(photo_paths.values())
    assert runtime_tokens(captioner, paths, cfg) == ref.generate(paths, cfg)
    greedy = replace(cfg, num_beams=1)
    assert runtime_tokens(captioner, paths, greedy) == ref.generate(paths, greedy)


def test_caption_text_equals_transformers_decode(exported, photo_paths):
    for name in ("vit-gpt2", "deit-bert"):
        captioner, ref = pair(exported, name)
        for path in photo_paths.values():
            c = captioner.caption(path)
            assert c.text == ref.decode(c.tokens)


def test_checkpoint_generation_config_becomes_the_default(exported, photo_paths, tmp_path):
    """The folder's generation_config.json (beams, length, n-gram blocking) is what the
    runtime does by default, as `model.generate(pixel_values)` does with no arguments."""
    import torch

    from export.hf import HFReference, export_hf

    src = exported["vit-gpt2"][0]
    config = json.loads((src / "generation_config.json").read_text())
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in src.iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    config.update(num_beams=3, max_length=12, no_repeat_ngram_size=2, length_penalty=1.5, early_stopping=True)
    (custom / "generation_config.json").write_text(json.dumps(config))
    export_hf(custom, tmp_path / "pkg")
    captioner = Captioner(tmp_path / "pkg", provider="cpu")
    assert captioner.defaults == replace(captioner.defaults, max_new_tokens=11, num_beams=3, no_repeat_ngram_size=2,
                                         length_penalty=1.5, early_stopping=True)
    ref = HFReference(custom, captioner.manifest)
    paths = list(photo_paths.values())
    with torch.inference_mode():
        out = ref.model.generate(pixel_values=ref.pixels(paths))[:, 1:].tolist()
    want = [until_eos(row, ref.eos) for row in out]
    assert [c.tokens for c in captioner.caption(paths)] == want


def test_blip_prompt_is_handled_like_the_pipeline(exported, photo_paths, tmp_path):
    """A text prefix: [bos] + prompt tokens, no [SEP], and the caption starts with it."""
    from export.hf import HFReference, export_hf

    src = exported["blip"][0]
    export_hf(src, tmp_path / "pkg", prompt="a photo of")
    captioner = Captioner(tmp_path / "pkg", provider="cpu")
    ref = HFReference(src, captioner.manifest)
    prompt = ref.tokenizer("a photo of").input_ids
    assert captioner.manifest.prompting.prefix == [ref.model.config.text_config.bos_token_id, *prompt[1:-1]]
    paths = list(photo_paths.values())
    for num_beams in (1, 4):
        cfg = captioner.generation_config(num_beams=num_beams)
        assert runtime_tokens(captioner, paths, cfg) == ref.generate(paths, cfg)
    text = captioner.caption(paths[0]).text
    assert text.startswith("a photo of") and text == ref.decode(captioner.caption(paths[0]).tokens)


def test_preprocessing_equals_the_image_processor(exported, photo_paths, generated_paths, transparent_paths):
    """Resize + crop (floor offsets), bicubic with CLIP's mean/std, and transparency composited
    onto white by transformers' own convert_to_rgb (RGBA, LA, palette with a transparent index)."""
    for name in ("vit-gpt2", "deit-bert", "blip"):
        captioner, ref = pair(exported, name)
        paths = [*photo_paths.values(), *generated_paths.values(), *transparent_paths.values()]
        ours = np.stack([load_pixels(p, captioner.manifest.preprocess) for p in paths])
        assert np.abs(ours - ref.pixels(paths).numpy()).max() < 1e-5


def test_cli_captions_an_hf_package_without_torch(exported, photo_paths):
    r = caption_without_torch("--model", exported["blip"][1], photo_paths["chelsea"], "--json", "--beams", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["caption"]


@pytest.mark.parametrize("precision, min_top1", [("int8", 0.88), ("fp16", 0.97)])
def test_reduced_precision_hf_packages(exported, photo_paths, tmp_path, precision, min_top1):
    """`export hf --precision`: a complete package the runtime reads, whose greedy tokens are the
    same with and without the KV cache, and whose next-token choices along transformers' own
    captions agree with it (measured on these random weights, the worst case of near-ties:
    int8 91%, fp16 100%; trained weights have wide margins)."""
    from benchmarks.parity import run
    from export.hf import export_hf

    src = exported["vit-gpt2"][0]
    export_hf(src, tmp_path / "pkg", precision=precision)
    assert Captioner(tmp_path / "pkg", provider="cpu").manifest.data["precision"] == precision
    result = run(tmp_path / "pkg", src, [str(p) for p in photo_paths.values()])
    assert result["cache_agreement"] == 1.0 and not result["nan_or_inf"]
    assert result["teacher_forced_top1"] >= min_top1


@pytest.mark.parametrize("config, message", [
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "T5ForConditionalGeneration is not"),
    ({"model_type": "vision-encoder-decoder", "encoder": {"model_type": "beit"}, "decoder": {"model_type": "gpt2"}},
     "encoder 'beit'"),
    ({"model_type": "vision-encoder-decoder", "encoder": {"model_type": "vit"},
      "decoder": {"model_type": "gpt2", "add_cross_attention": False}}, "no cross-attention"),
    ({"model_type": "git", "architectures": ["GitForCausalLM"], "num_image_with_embedding": 6}, "a video GIT"),
])
def test_unsupported_models_get_one_line(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = export_cli("hf", tmp_path, "--out", tmp_path / "pkg")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line, = r.stderr.strip().splitlines()
    assert message in line and "supported: VisionEncoderDecoderModel" in line
    assert not (tmp_path / "pkg").exists()


def test_not_a_model_folder(tmp_path):
    r = export_cli("hf", tmp_path / "nowhere", "--out", tmp_path / "pkg")
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nowhere'}: not a folder " \
                                                     "(a local Hugging Face model folder is expected)"


def positions_ignoring_the_cache(patch):
    """The classic KV-cache export bug, in every decoder wrapper: cached steps restart positions
    at 0 (the cache itself is right)."""
    import export.hf as hf

    for wrapper in (hf.decoders.GPT2Decoder, hf.decoders.BertDecoder):
        def wrong(self, input_ids, position_ids, *rest, forward=wrapper.forward):
            return forward(self, input_ids, torch.arange(input_ids.shape[1]).expand_as(input_ids), *rest)

        patch.setattr(wrapper, "forward", wrong)


def test_a_wrapper_that_loses_the_cache_position_is_refused(exported, tmp_path, monkeypatch):
    import export.hf as hf

    positions_ignoring_the_cache(monkeypatch)
    with pytest.raises(ExportError) as refused:
        hf.export_hf(exported["vit-gpt2-real"][0], tmp_path / "pkg")
    message = str(refused.value)
    assert message.startswith("the decoder wrapper vs transformers' forward") and "logits differs by" in message
    assert "\n" not in message and "--rtol" in message
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("name", ["vit-gpt2-real", "blip-real"])
def test_a_graph_that_differs_from_eager_is_refused(exported, tmp_path, monkeypatch, name):
    """Right wrappers, wrong graph (traced with the position bug): at a realistic scale the
    relative check still refuses it, naming the graph, the shapes and the output."""
    import export.hf as hf
    import export.package as package

    trace_graph = package.export_graph

    def wrong_graph(*args):
        with monkeypatch.context() as patch:
            positions_ignoring_the_cache(patch)
            trace_graph(*args)

    monkeypatch.setattr(package, "export_graph", wrong_graph)
    with pytest.raises(ExportError, match=r"^decoder step graph at batch 1, past 5, length 1: logits differs by "
                                          r"\S+ \(relative \S+ of max \|value\| \S+\) at index") as refused:
        hf.export_hf(exported[name][0], tmp_path / "pkg")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "pkg").exists()


def test_tolerance_is_a_cli_option_recorded_in_the_manifest(exported, tmp_path):
    r = export_cli("hf", exported["blip-real"][0], "--out", tmp_path / "pkg", "--rtol", "2e-4", "--atol", "0")
    assert r.returncode == 0, r.stderr
    assert "ONNX Runtime vs eager max |diff|" in r.stdout and "(relative " in r.stdout
    record = json.loads((tmp_path / "pkg" / "manifest.json").read_text())["source"]["onnx_vs_eager"]
    assert (record["rtol"], record["atol"]) == (2e-4, 0.0)
    assert record["argmax_rows"] > 0 and record["greedy_tokens"] > 0


def test_parity_handles_captions_that_run_to_the_length_limit(exported, photo_paths):
    """prompt + max tokens is one more position than the decoder has: the last token of a caption
    that never ended was never fed back, and the teacher-forced pass must not feed it either."""
    from benchmarks.parity import run

    src, pkg = exported["vit-gpt2-real"]
    captioner = Captioner(pkg, provider="cpu")
    limit = captioner.manifest.max_positions - len(captioner.prompting.prefix) + 1
    paths = [str(p) for p in photo_paths.values()]
    result = run(pkg, src, paths, max_new_tokens=limit)
    assert result["exact_caption_match"] == 1.0 and result["teacher_forced_top1"] == 1.0
    assert any(len(c.tokens) == limit for c in captioner.caption(paths, max_new_tokens=limit))


@pytest.mark.parametrize("name", FAMILIES)
def test_scores_equal_transformers_teacher_forced_log_likelihood(exported, photo_paths, name):
    from helpers import TEXTS, reference_scores

    captioner, ref = pair(exported, name)
    for text in TEXTS:  # the same tokens as transformers' own tokenizer
        assert captioner.tokenizer.encode(text, add_special_tokens=False).ids == \
            ref.tokenizer(text, add_special_tokens=False).input_ids
    for image in (photo_paths["chelsea"], photo_paths["rocket"]):
        got, want = np.array(captioner.score(image, TEXTS)), np.array(reference_scores(ref, image, captioner, TEXTS))
        np.testing.assert_allclose(got, want, rtol=1e-4)
        assert len(set(np.round(got, 3))) == len(TEXTS)  # scores that tell the texts apart
