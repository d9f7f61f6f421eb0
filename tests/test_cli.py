"""`python -m runtime.caption` as a user runs it: outputs, exit codes, one-line errors."""

import json
import shutil
import subprocess
import sys

import onnxruntime as ort
import pytest

from helpers import ROOT, caption_without_torch, without_torch


def caption(*args):
    return subprocess.run([sys.executable, "-m", "runtime.caption", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_one_photo(photo_paths):
    r = caption(photo_paths["chelsea"])
    assert r.returncode == 0, r.stderr
    path, text = r.stdout.strip().split(": ", 1)
    assert path == str(photo_paths["chelsea"]) and "cat" in text.split()
    assert r.stderr == ""  # a CPU-only onnxruntime on a machine without a GPU is not news


def test_verbose_says_which_providers_the_build_lacks(photo_paths):
    r = caption(photo_paths["chelsea"], "--verbose")
    assert r.returncode == 0 and r.stderr == "provider: CPU (TensorRT and CUDA not available)\n"


def test_json_batch_with_bad_files_keeps_the_good_ones(photo_paths, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(photo_paths["coffee"], folder / "b.jpg")
    shutil.copy(photo_paths["chelsea"], folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    fake = tmp_path / "fake.jpg"
    fake.write_text("plain text")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = caption(photo_paths["rocket"], tmp_path / "missing.jpg", fake, folder, empty, "--json", "--batch-size", "2")
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["image"] for rec in records] == [str(photo_paths["rocket"]), str(tmp_path / "missing.jpg"), str(fake),
                                                 str(folder / "a.jpg"), str(folder / "b.jpg"), str(empty)]
    good = [rec for rec in records if "caption" in rec]
    assert len(good) == 3 and all(set(rec) == {"image", "caption", "tokens", "ms"} for rec in good)
    assert "no such file" in records[1]["error"] and "not an image" in records[2]["error"]
    assert "is a directory with no images" in records[5]["error"]
    assert "Traceback" not in r.stderr


def test_errors_in_text_mode_are_one_line_on_stderr(photo_paths, tmp_path):
    r = caption(photo_paths["coffee"], tmp_path / "missing.jpg")
    assert r.returncode == 1
    assert r.stdout.count("\n") == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'missing.jpg'}: no such file"]


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "max tokens must be between 1 and"),
    (["--beams", "0"], "beams must be between 1 and the max batch (8)"),
    (["--beams", "9"], "beams must be between 1 and the max batch (8)"),  # TensorRT's profile could not hold them
    (["--model", "/nonexistent/pkg"], "no manifest.json"),
])
def test_usage_errors_exit_2(photo_paths, args, message):
    r = caption(photo_paths["chelsea"], *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif("TensorrtExecutionProvider" in ort.get_available_providers(), reason="TensorRT present")
def test_unavailable_explicit_provider_exits_2(photo_paths):
    r = caption(photo_paths["chelsea"], "--provider", "tensorrt")
    assert r.returncode == 2 and "provider tensorrt is not available" in r.stderr


def test_runs_without_torch_or_transformers(photo_paths):
    r = caption_without_torch(photo_paths["chelsea"], "--json")
    assert r.returncode == 0, r.stderr
    assert "cat" in json.loads(r.stdout)["caption"]


def test_precision_picks_a_bundled_variant(photo_paths):
    r = caption(photo_paths["chelsea"], "--precision", "fp32", "--json")
    assert r.returncode == 0 and "cat" in json.loads(r.stdout)["caption"]
    r = caption(photo_paths["chelsea"], "--precision", "int8", "--model", "runtime/models/default")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: precision picks a variant of the bundled model; a model package has its own"


@pytest.mark.parametrize("module, args, extra", [
    ("export", ["hf", "some-folder", "--out", "pkg"], "export"),
    ("export", ["package", "--out", "pkg"], "export"),
    ("benchmarks.parity", ["--model", "runtime/models/default", "runtime/samples/chelsea.jpg"], "dev"),
    ("benchmarks.latency", ["--quick"], "dev"),
])
def test_heavy_commands_on_a_runtime_only_install_say_what_to_install(module, args, extra):
    r = without_torch(module, *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line == f"error: python -m {module} needs torch, which this install leaves out: pip install '.[{extra}]'"


@pytest.mark.parametrize("module", ["export", "benchmarks.parity"])
def test_help_does_not_import_torch(module):
    r = without_torch(module, "--help")
    assert r.returncode == 0 and "usage: python -m " + module in r.stdout, r.stderr


def test_batches_over_the_max_batch_are_split_and_said_so(photo_paths):
    paths = [photo_paths["chelsea"], photo_paths["coffee"]]
    r = caption(*paths, "--batch-size", "2", "--beams", "5", "--json")
    assert r.returncode == 0
    assert r.stderr == "batch size 2 x 5 beams is over --max-batch 8: 1 image(s) per forward pass\n"
    single = [json.loads(caption(p, "--beams", "5", "--json").stdout)["tokens"] for p in paths]
    assert [json.loads(line)["tokens"] for line in r.stdout.splitlines()] == single
