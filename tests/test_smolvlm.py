"""SmolVLM, an LLM-based vision-language model (a SigLIP encoder over tiles of the photo, a Llama
language model with the tiles' features in its prompt): tiny random-weight folders built offline
with the real processor, chat template and special tokens (export.hf.smolvlm.build_smolvlm), one
also at a trained checkpoint's scale. Tokens equal transformers' generate in test_matrix (greedy
and beam 3, questions, batch, cache); here its tiles and prompts, its logits at scale, the CLI,
refusals and streaming."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import caption_without_torch, hf_pair, photos, transparent
from runtime import Captioner
from runtime.preprocess import open_image, to_tiles

QUESTIONS = [None, "What is in the image?", "How many animals are there?"]  # None: the package's default


@pytest.fixture(scope="module")
def smolvlm(hf_model):
    return {"tiny": hf_model("smolvlm"), "tiny-real": hf_model("smolvlm-real")}


@pytest.fixture(scope="module")
def images(chat_photo_paths) -> list:
    """Square (4x4 tiles), 4:3 (3x4), 2:1 (2x4), 1:3 and one smaller than a tile."""
    return chat_photo_paths


def test_tiles_and_prompt_ids_equal_the_processors(smolvlm, images):
    """Pixels bit for bit (PIL backend: LANCZOS resizes, tiles in reading order, the whole image last),
    and the prompt ids of the chat template with each tile's placeholders."""
    from export.hf.smolvlm import FAMILY

    src, pkg = smolvlm["tiny"]
    captioner = Captioner(pkg, provider="cpu")
    grids = []
    for path in [*images, *(Image.fromarray(a) for a in photos().values()), *transparent().values()]:
        image = open_image(path)
        tiles, rows, cols = to_tiles(image, captioner.manifest.preprocess)
        ref = FAMILY.reference_inputs(src, [image], "What is in the image?")
        assert np.array_equal(tiles, ref.pixel_values[0].numpy())
        assert captioner.prompting.chat("What is in the image?", [(rows, cols)]).tolist() == ref.input_ids[0].tolist()
        grids.append((rows, cols))
    assert {(4, 4), (3, 4), (2, 4)} <= set(grids)


def test_the_tokenizer_writes_a_paragraph_break_as_one_token_as_smollm2s_does(smolvlm):
    """The processor writes "\n\n" before the global image; SmolLM2's tokenizer has it as one token,
    and llama.cpp's SmolVLM support looks that token up (benchmarks.gguf_peer's peer run)."""
    captioner = Captioner(smolvlm["tiny"][1], provider="cpu")
    paragraph = captioner.tokenizer.encode("\n\n", add_special_tokens=False).ids
    assert len(paragraph) == 1 and paragraph[0] in captioner.prompting.chat(None, [(2, 2)]).tolist()


def test_the_realistic_model_is_exact_and_its_logits_agree_relative_to_their_scale(smolvlm, images):
    from export.hf.smolvlm import FAMILY
    import torch

    src, pkg = smolvlm["tiny-real"]
    captioner, ref = hf_pair(src, pkg)
    cfg = captioner.generation_config()
    tokens = [c.tokens for c in captioner.caption(images)]
    assert tokens == [ref.generate([p], cfg)[0] for p in images]
    image = open_image(images[1])
    inputs = FAMILY.reference_inputs(src, [image], captioner.manifest.prompting.chat["question"])
    ids = np.concatenate([inputs.input_ids[0].numpy(), tokens[1]])[None]
    with torch.inference_mode():
        want = ref.model(input_ids=torch.from_numpy(ids), pixel_values=inputs.pixel_values).logits.numpy()[0]
    tiles, rows, cols = to_tiles(image, captioner.manifest.preprocess)
    from runtime.search import prefix_logits

    features = captioner.graphs.encode(tiles)[0][0]
    state = captioner.graphs.start(([features.reshape(1, -1, features.shape[-1])],), ids.shape[1])
    got = prefix_logits(captioner.graphs.step, state, ids)[0]
    scale = float(np.abs(want).max())
    assert scale > 20  # logits in the tens, as a trained model's
    assert np.abs(got - want).max() < 1e-4 * scale


def test_the_cli_answers_without_torch(smolvlm, images):
    """--question, --beams and --max-tokens reach the search: beam 3 answers here differ from greedy ones."""
    _, pkg = smolvlm["tiny"]
    images = images[:3]  # three tilings
    r = caption_without_torch("--model", pkg, *images, "--question", "What is in the image?", "--json", "--beams", "3",
                              "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["question"] for line in lines] == ["What is in the image?"] * 3
    captioner = Captioner(pkg, provider="cpu")
    asked = {"question": "What is in the image?", "max_new_tokens": 6}
    assert [line["tokens"] for line in lines] == [c.tokens for c in captioner.caption(images, num_beams=3, **asked)]
    assert [line["tokens"] for line in lines] != [c.tokens for c in captioner.caption(images, **asked)]
    assert all(len(line["tokens"]) <= 6 for line in lines) and lines[0]["answer"] == captioner.decode(lines[0]["tokens"])


def test_refusals_are_one_line_and_lose_no_other_image(smolvlm, images, tmp_path):
    _, pkg = smolvlm["tiny"]
    for args, message in ((["--task", "<OD>"], "takes a question (--question), not a task"),
                          (["--question", " "], "the question is empty"),
                          (["--question", "why " * 600], "-token prompt even for an untiled image")):
        r = caption_without_torch("--model", pkg, images[0], *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    # Enough new tokens that the 4x4-tile photo's prompt no longer fits; the others are answered.
    captioner = Captioner(pkg, provider="cpu")
    fits_3x4 = captioner.manifest.max_positions - len(captioner.prompting.chat(None, [(3, 4)])) + 1
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    results = captioner.caption([*images[:3], broken], max_new_tokens=fits_3x4)
    assert "4x4 grid makes a" in results[0].error and "beyond the model's" in results[0].error
    assert results[1].error is None and results[2].error is None and "not an image" in results[3].error


def test_heads_narrower_than_16_values_are_refused_at_export():
    """GroupQueryAttention rotates q and k itself only in heads a multiple of 16 values wide (every
    released checkpoint's are 64 or 128): the export says so, not ONNX Runtime at the first answer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.check import ExportError
    from export.hf.llm import CausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50))
    with pytest.raises(ExportError, match=r"^heads of 8 values: .* a multiple of 16$"):
        CausalLM(lm.model, lm.lm_head)


def test_streamed_pieces_join_into_the_answer(smolvlm, images):
    """The Python iterator and `--stream`: pieces as the tokens come, joined the same text."""
    _, pkg = smolvlm["tiny"]
    captioner = Captioner(pkg, provider="cpu")
    for path in images:
        for question in QUESTIONS[:2]:
            pieces = list(captioner.stream(path, question=question))
            assert "".join(pieces) == captioner.caption(path, question=question).text and all(pieces)
    assert max(len(list(captioner.stream(p))) for p in images) > 2  # it does come in pieces
    r = caption_without_torch("--model", pkg, images[0], images[1], "--stream")
    assert r.returncode == 0, r.stderr
    # split on newlines only: a random model writes form feeds, which splitlines() also breaks on
    assert r.stdout.split("\n") == [*(f"{p}: {c.text}" for p, c in zip(images[:2], captioner.caption(images[:2]))), ""]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_packages_quantize_the_language_models_weights(quantized, precision):
    """4- and 8-bit language-model weights (MatMulNBits; the output head 8-bit in both, as llama.cpp's
    q4_0 keeps its output at 6 bits; the embedding table GatherBlockQuantized at the package's bits,
    read in place: no DequantizeLinear left to run each step); attention over the cache stays FP32,
    one GroupQueryAttention node per layer. That these packages keep cache = no cache and
    batched = one by one is test_matrix's; how close the answers stay to FP32 is measured on the
    held-out photos in benchmarks.weight_only (README)."""
    import onnx

    from export.quantize import output_head

    graph = onnx.load(str(quantized("smolvlm-real", precision) / "decoder.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops and "MatMul" not in ops
    assert "GatherBlockQuantized" in ops and "DequantizeLinear" not in ops
    head = output_head(graph)
    bits = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop(head.name) == 8 and set(bits.values()) == {int(precision[3:])}


def test_distill_teaches_a_random_model_the_teachers_answers(tmp_path, photo_paths):
    """export.distill: a random-weight SmolVLM (transformers' own init, flat logits) trained on the
    bundled captioner's answers about two photos picks the teacher's next token almost everywhere on
    them, where before it picked almost nowhere; the folder it writes still exports."""
    from transformers import AutoProcessor

    from export.distill import DistillConfig, answer_end, distill, teacher_answers, teacher_forced_top1
    from export.hf import export_hf, load_model
    from export.hf.smolvlm import FAMILY, build_smolvlm

    folder = build_smolvlm(tmp_path / "smolvlm", conditioned=False)
    photos = [photo_paths["chelsea"], photo_paths["coffee"]]
    examples = teacher_answers([Image.open(p).convert("RGB") for p in photos], FAMILY.DEFAULT_QUESTION)
    assert [a for _, q, a in examples if q == FAMILY.DEFAULT_QUESTION] == [
        "A photo of an egyptian cat.", "A photo of espresso, a kind of drink."]
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "right"
    _, model = load_model(folder)
    assert answer_end(processor, model) == "<end_of_utterance>"
    before = teacher_forced_top1(model, processor, examples)
    summary = distill(folder, photos, DistillConfig(steps=150, crops=0, lr=3e-3, batch_size=6))
    assert before < 0.2 and summary["teacher_forced_top1"] > 0.9, (before, summary)
    export_hf(folder, tmp_path / "pkg")
    assert Captioner(tmp_path / "pkg", provider="cpu").caption(str(photos[0]), max_new_tokens=4).text
