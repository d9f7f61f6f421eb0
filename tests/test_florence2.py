"""Florence-2 (transformers' native Florence2ForConditionalGeneration), exact against
transformers: the task prompt encoded with the image in the vision graph, BART's decoder step,
generation as the checkpoints ship it (beam 3, no 3-gram repeated, </s> then a forced <s>, </s>
forced at the length limit). Tiny random-weight folders built offline (export.hf_random), two
DaViT configs whose window attention spans several windows (2x2 windows over 24x24 to 3x3
feature maps, 3x3 windows that need padding), every task of the processor, real photos, greedy
and beam 3, batch 1 and 3 (cache and no cache, two tasks, and the quantized packages: test_matrix).

The random weights write words and <loc_N> tokens that vary by image and task, but never stop
before the length limit: every caption ends with the forced </s>."""

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, caption_without_torch, hf_pair
from runtime import Captioner, PackageError
from runtime.preprocess import load_pixels

CONFIGS = ["florence2-w2", "florence2-w3"]  # conftest.TEST_MODELS: windows 2 and 3
BOX = "<loc_100><loc_200><loc_300><loc_400>"
TEXTS = {"<CAPTION_TO_PHRASE_GROUNDING>": "a cat on a sofa", "<REFERRING_EXPRESSION_SEGMENTATION>": "the cat",
         "<REGION_TO_SEGMENTATION>": BOX, "<OPEN_VOCABULARY_DETECTION>": "cat", "<REGION_TO_CATEGORY>": BOX,
         "<REGION_TO_DESCRIPTION>": BOX, "<REGION_TO_OCR>": BOX}


@pytest.fixture(scope="module")
def florence(hf_model):
    return {name: hf_model(name) for name in CONFIGS}


def pair(florence, name):
    return hf_pair(*florence[name])


def run(captioner, paths, cfg, task):
    pixels = np.stack([load_pixels(p, captioner.manifest.preprocess) for p in paths])
    return captioner.generate(pixels, cfg, task=task, text=TEXTS.get(task))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_every_task_equals_transformers_generate(florence, photo_paths, name, num_beams):
    captioner, ref = pair(florence, name)
    paths, outputs = list(photo_paths.values()), {}
    assert set(captioner.manifest.prompting.tasks["prompts"]) == {*TEXTS, "<OCR>", "<OCR_WITH_REGION>", "<CAPTION>",
                                                        "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>",
                                                        "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>"}
    for task in captioner.manifest.prompting.tasks["prompts"]:
        cfg = captioner.generation_config(num_beams=num_beams, max_new_tokens=12, task=task, text=TEXTS.get(task))
        single = [run(captioner, [p], cfg, task)[0] for p in paths[:3]]
        assert single == [ref.generate([p], cfg, task=task, text=TEXTS.get(task))[0] for p in paths[:3]], task
        assert run(captioner, paths[3:], cfg, task) == ref.generate(paths[3:], cfg, task=task, text=TEXTS.get(task)), task
        outputs[task] = single
    # A meaningful subject: outputs differ by image and by task, and hold both words and boxes.
    assert all(len({tuple(t) for t in single}) == 3 for single in outputs.values())
    assert len({tuple(map(tuple, single)) for single in outputs.values()}) == len(outputs)
    loc = captioner.tokenizer.token_to_id("<loc_0>")
    flat = [t for single in outputs.values() for tokens in single for t in tokens]
    assert any(t >= loc for t in flat) and any(3 < t < loc for t in flat)


def test_generation_follows_the_checkpoint(florence):
    captioner = Captioner(florence["florence2-w2"][1], provider="cpu")
    cfg = captioner.defaults
    assert (cfg.num_beams, cfg.no_repeat_ngram_size, cfg.forced_bos_token_id, cfg.forced_eos_token_id) == (3, 3, 0, 2)
    assert captioner.manifest.prompting.prefix == [2]


@pytest.mark.parametrize("precision, error", [("int8", 0.15), ("fp16", 0.01)])
def test_reduced_precision_keeps_the_memory_near_fp32(florence, quantized, photo_paths, precision, error):
    """int8 (the decoder's MatMuls as MatMulNBits, the vision graph's computing in per-token int8)
    and fp16, calibrated with the default task's prompt (conftest.QUANTIZE): the memory stays near
    FP32's relative to its magnitude (random weights leave no caption margin to compare tokens by;
    cache = no cache and batch = one by one are test_matrix's). Measured: int8 8.8% here (8 to 32
    values per dot product, weights scaled up), 2.8% at Florence-2-base's size; a wrong scale would
    be ~100%."""
    captioner = Captioner(quantized("florence2-w3", precision), provider="cpu")
    fp32 = Captioner(florence["florence2-w3"][1], provider="cpu")
    if precision == "int8":
        assert captioner.manifest.data["source"]["quantization"]["vision"]["int8_compute_matmuls"] > 20
    path = photo_paths["chelsea"]
    for got, want in zip(captioner.encode(path), fp32.encode(path)):
        assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < error


def test_cli_runs_tasks_without_torch(florence, photo_paths):
    """--task and --text through the lean runtime: JSON lines name the task, and the caption is the
    text transformers' processor parses (<loc_N> tokens kept)."""
    captioner, ref = pair(florence, "florence2-w2")
    path, task = photo_paths["chelsea"], "<CAPTION_TO_PHRASE_GROUNDING>"
    r = caption_without_torch("--model", florence["florence2-w2"][1], path, "--task", task, "--text", TEXTS[task],
                              "--json", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    cfg = captioner.generation_config(max_new_tokens=12, task=task, text=TEXTS[task])
    want = ref.generate([path], cfg, task=task, text=TEXTS[task])[0]
    assert record["task"] == task and record["tokens"] == want
    assert record["caption"] == ref.tokenizer.decode(want[1:], skip_special_tokens=False) and "<loc_" in record["caption"]
    from PIL import Image
    from transformers import Florence2Processor

    processor = Florence2Processor.from_pretrained(florence["florence2-w2"][0])
    full = processor.batch_decode([[2, *want, 2]], skip_special_tokens=False)[0]
    assert record["result"] == processor.post_process_generation(full, task=task, image_size=Image.open(path).size)[task]


@pytest.mark.parametrize("args, message", [
    (["--task", "<XX>"], "error: unknown task '<XX>'; this model does <OCR>, <OCR_WITH_REGION>, <CAPTION>, "),
    (["--task", "<CAPTION_TO_PHRASE_GROUNDING>"], "error: <CAPTION_TO_PHRASE_GROUNDING> needs a text (--text)"),
    (["--task", "<OD>", "--text", "a cat"], "error: <OD> takes no text"),
    (["--question", "what is this?"], "error: this model takes a task (--task), not a question"),
    (["--task", "<OPEN_VOCABULARY_DETECTION>", "--text", "cat " * 200], "error: the prompt is 416 tokens; this model reads 1 to 118"),
])
def test_tasks_that_cannot_be_run_are_refused(florence, photo_paths, args, message):
    r = caption_without_torch("--model", florence["florence2-w2"][1], photo_paths["chelsea"], *args)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith(message), r.stderr


@pytest.mark.parametrize("args, asked", [
    ([], {"task": "<CAPTION>"}),
    (["--task", "<CAPTION_TO_PHRASE_GROUNDING>", "--text", "a cat"], {"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a cat"}),
])
def test_parity_report_asks_both_sides_the_same_task(florence, photo_paths, capsys, args, asked):
    """benchmarks.parity with --task/--text: the runtime's prompt from the manifest, the
    reference's from Florence2Processor, tokens and teacher-forced logits equal; the report keeps
    its keys and says what was asked (the default task when none is given)."""
    from benchmarks.parity import main

    src, pkg = florence["florence2-w2"]
    images = [str(p) for p in photo_paths.values()][:2]
    assert main(["--model", str(pkg), "--reference", str(src), *images, "--max-tokens", "12", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result.get(k) for k in ("question", "task", "text") if k in result} == asked
    assert result["exact_caption_match"] == result["teacher_forced_top1"] == result["cache_agreement"] == 1.0
    assert result["max_rel_logit_diff"] < 1e-5 and result["mismatches"] == []


def test_parity_refuses_what_the_package_cannot_be_asked(florence, photo_paths, capsys):
    from benchmarks.parity import main

    assert main(["--model", str(florence["florence2-w2"][1]), str(photo_paths["chelsea"]), "--task", "<OD>",
                 "--text", "a cat"]) == 2
    assert capsys.readouterr().err == "error: <OD> takes no text\n"


def test_a_task_on_a_model_without_tasks_is_refused(photo_paths):
    r = caption_without_torch(photo_paths["chelsea"], "--task", "<OD>")
    assert r.returncode == 2 and r.stderr.strip() == "error: this model takes no task or text"


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "export", "hf", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_a_remote_code_checkpoint_is_refused_without_running_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2",
        "auto_map": {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}}))
    r = export_cli(tmp_path, "--out", tmp_path / "pkg")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line, = r.stderr.strip().splitlines()
    assert "a remote-code Florence-2 checkpoint (auto_map in config.json), whose code is never run here" in line
    assert not (tmp_path / "pkg").exists()


def test_a_folder_without_its_processor_config_is_refused(florence, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in florence["florence2-w2"][0].iterdir():
        if f.name != "processor_config.json":
            (src / f.name).write_bytes(f.read_bytes())
    r = export_cli(src, "--out", tmp_path / "pkg")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {src}: no usable Florence-2 processor (")
    assert not (tmp_path / "pkg").exists()



def test_a_task_whose_answers_this_runtime_cannot_parse_is_refused_when_opened(florence, tmp_path):
    """Parse kinds are the contract (runtime.answers.PARSERS), checked before any graph opens."""
    import shutil

    from runtime.manifest import MANIFEST

    pkg = shutil.copytree(florence["florence2-w2"][1], tmp_path / "pkg")
    data = json.loads((pkg / MANIFEST).read_text())
    data["prompting"]["tasks"]["prompts"]["<OD>"]["parse"] = "keypoints"
    (pkg / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(PackageError, match=r"cannot parse answers of kind keypoints \(it knows pure_text, "):
        Captioner(pkg)

LOC = "".join(f"<loc_{i}>" for i in (12, 40, 650, 998))
CRAFTED = [  # answers of every shape the processor parses, on top of what the random weights write
    f"</s><s>a cat{LOC}a dog<loc_0><loc_1><loc_999><loc_998><loc_500><loc_500><loc_501><loc_777></s>",
    f"<s>{LOC}<loc_3><loc_4><loc_5><loc_6></s>",
    "</s><s>HELLO<loc_1><loc_2><loc_300><loc_2><loc_300><loc_90><loc_1><loc_90>WORLD 42<loc_500><loc_500><loc_600>"
    "<loc_500><loc_600><loc_520><loc_500><loc_520></s>",
    "<s>a cat<poly><loc_10><loc_20><loc_30><loc_40><loc_50><sep><loc_60><loc_70><loc_80><loc_90></poly>"
    "<poly><loc_1><loc_2><loc_3><loc_4></poly>the sofa<loc_5><loc_6><loc_7><loc_8><loc_9><loc_10></s>",
    "</s><s>  a photo of a café  </s><pad>",
]


@pytest.mark.parametrize("size", [(640, 480), (333, 517)])
def test_results_equal_the_processors_post_processing(florence, photo_paths, size):
    """runtime.answers.parse (numpy and re, no torch) against Florence2Processor.post_process_generation,
    for every task, on what the model writes and on crafted answers of every shape; odd image sizes
    put coordinates on float32 rounding edges."""
    from transformers import Florence2Processor

    from runtime.answers import parse

    captioner, _ = pair(florence, "florence2-w2")
    processor = Florence2Processor.from_pretrained(florence["florence2-w2"][0])
    tasks = captioner.manifest.prompting.tasks
    for task in tasks["prompts"]:
        written = [c.text for c in captioner.caption(list(photo_paths.values())[:2], max_new_tokens=12, task=task,
                                                     text=TEXTS.get(task))]
        for text in [*written, *CRAFTED]:
            assert parse(text, task, size, tasks) == processor.post_process_generation(text, task=task, image_size=size)[task]


def test_captions_carry_the_parsed_result_in_pixels_of_the_original_image(florence, photo_paths):
    from transformers import Florence2Processor
    from PIL import Image

    captioner, ref = pair(florence, "florence2-w2")
    processor = Florence2Processor.from_pretrained(florence["florence2-w2"][0])
    path = photo_paths["motorcycle"]
    c = captioner.caption(path, task="<OD>", max_new_tokens=12)
    full = processor.batch_decode([[2, *c.tokens, 2]], skip_special_tokens=False)[0]
    assert c.result == processor.post_process_generation(full, task="<OD>", image_size=Image.open(path).size)["<OD>"]
    assert set(c.result) == {"bboxes", "labels"}


def test_draw_outlines_each_instance_and_the_cli_writes_the_drawings(florence, photo_paths, tmp_path):
    from PIL import Image

    from runtime.answers import COLORS, draw, parse
    from runtime.preprocess import open_image

    tasks = Captioner(florence["florence2-w2"][1], provider="cpu").manifest.prompting.tasks
    image = open_image(photo_paths["chelsea"])
    result = parse(CRAFTED[0], "<OD>", image.size, tasks)
    drawn = draw(image, result)
    (x0, y0, _, y1), color = result["bboxes"][2], Image.new("RGB", (1, 1), COLORS[2]).getpixel((0, 0))
    assert drawn.size == image.size and drawn.getpixel((x0, (y0 + y1) // 2)) == color  # the third box's left edge
    assert np.array_equal(np.asarray(draw(image, "a text answer")), np.asarray(image))
    r = caption_without_torch("--model", florence["florence2-w2"][1], photo_paths["chelsea"], photo_paths["coffee"],
                              "--task", "<OD>", "--draw", tmp_path / "drawn")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["chelsea.png", "coffee.png"]
    assert Image.open(tmp_path / "drawn" / "coffee.png").size == open_image(photo_paths["coffee"]).size
    r = caption_without_torch(photo_paths["chelsea"], "--draw", tmp_path / "other")
    assert r.returncode == 2 and r.stderr.strip() == "error: --draw draws the boxes and polygons of a task; " \
                                                     "this model has no tasks"
