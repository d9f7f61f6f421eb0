"""The report scripts run and say what they claim (numbers themselves are not asserted:
speed belongs in benchmarks, and this machine is noisy)."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


def test_latency_quick_reports_both_variants(tmp_path):
    out = tmp_path / "latency.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--quick", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    (scenario, results), = report["results"].items()
    assert "batch 1, greedy" in scenario and set(results) == {"eager PyTorch", "runtime FP32", "runtime INT8"}
    process = report["meta"]["process"]  # memory, not speed: the lean process holds no torch
    assert 0 < process["runtime_peak_rss_mib"] < process["eager_peak_rss_mib"]
    assert process["runtime_cold_start_s"] > 0 and process["eager_cold_start_s"] > 0
    assert report["meta"]["bandwidth_gb_s"] > 0
    for r in results.values():
        assert r["same_tokens_as_first"] == 1.0  # the engines agree on what they timed
        assert r["vision_ms"]["median"] > 0 and r["first_token_ms"]["median"] > 0
        # marked inside each answer: its first step, and its first token to its last, within its time
        assert 0 < r["first_step_ms"]["median"] < r["caption_ms"]["median"]
        assert 0 < r["decode_ms_per_token"]["median"] < r["caption_ms"]["median"]
        assert 0 < r["floor_ms"] < r["ms_per_token"]["median"] < r["caption_ms"]["median"]
        assert r["caption_ms"]["median"] <= r["caption_ms"]["p90"]


def test_the_floor_counts_the_weights_a_step_reads(tmp_path):
    """An embedding table only gathered from gives a step one row per token, not its whole; a head
    tied to the table (a Transpose of it) reads it whole."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    from benchmarks.latency import decoder_weight_bytes

    table, head = np.ones((100, 8), np.float32), np.ones((8, 60), np.float32)
    untied = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "head"], ["logits"])]
    tied = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("Transpose", ["table"], ["t"]),
            helper.make_node("MatMul", ["x", "t"], ["logits"])]
    for name, nodes, inits, read in (("untied", untied, {"table": table, "head": head}, head.nbytes),
                                     ("tied", tied, {"table": table}, table.nbytes)):
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, n) for n, w in inits.items()])
        (tmp_path / name).mkdir()
        save(helper.make_model(graph), str(tmp_path / name / "decoder.onnx"))
        (tmp_path / name / "manifest.json").write_text(json.dumps({"graphs": {"decoder": {"file": "decoder.onnx"}}}))
        assert decoder_weight_bytes(tmp_path / name) == read, name


def test_parity_cli_json_interface(photo_paths):
    r = subprocess.run([sys.executable, "-m", "benchmarks.parity", "--model", "runtime/models/default",
                        str(photo_paths["chelsea"]), str(photo_paths["coffee"]), "--beams", "4", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"images", "exact_caption_match", "teacher_forced_top1", "max_abs_logit_diff"} <= set(result)
    assert result["images"] == 2 and result["exact_caption_match"] == 1.0 and result["mismatches"] == []


def test_soak_records_rss_at_each_checkpoint(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--images", "60", "--every", "20", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [s["images"] for s in result["samples"]] == [20, 40, 60]
    assert result["failed_as_expected"] == 1  # image 49 is truncated on purpose
    assert all(s["rss_mib"] > 0 for s in result["samples"])


def test_step_profile_splits_the_bundled_steps_by_op_type(tmp_path):
    """Every decode step of the answer is profiled (the prefill is not), and the int8 package's
    weights are read by MatMulNBits where FP32's are read by MatMul or Gemm."""
    from benchmarks.step_profile import main
    from runtime.engine import BUNDLED

    assert main([str(BUNDLED["fp32"]), str(BUNDLED["int8"]), "--tokens", "4", "--out", str(tmp_path)]) == 0
    fp32, int8 = json.loads(next(tmp_path.glob("step-profile-*.json")).read_text())["packages"]
    assert fp32["steps"] == int8["steps"] == 3 * 3 and fp32["prompt_tokens"] == 1  # 3 rounds of 3 steps
    assert "MatMulNBits" in int8["ops_ms"] and "MatMulNBits" not in fp32["ops_ms"]
    assert 0 < fp32["weights_ms"] <= fp32["nodes_ms"] and "unprofiled_step_ms" in int8
    assert next(tmp_path.glob("step-profile-*.md")).read_text().startswith("# Decoder step profile")


def test_gguf_peer_prepares_a_copy_the_converter_reads(hf_model, tmp_path):
    """What llama.cpp's converter needs of a folder transformers 5 wrote, on a copy; other families refused."""
    from benchmarks.gguf_peer import prepared

    src, _ = hf_model("smolvlm")
    before = (src / "config.json").read_text()
    hf, pre = prepared(src, tmp_path)
    config, tokenizer = (json.loads((hf / name).read_text()) for name in ("config.json", "tokenizer_config.json"))
    assert pre == "smollm" and config["text_config"]["architectures"] == ["VLlama3ForCausalLM"]
    assert "<image>" in tokenizer["additional_special_tokens"] and "extra_special_tokens" not in tokenizer
    assert (src / "config.json").read_text() == before
    with pytest.raises(SystemExit, match="converts smolvlm folders"):
        prepared(hf_model("git")[0], tmp_path)


def test_the_caption_table_has_a_judgement_for_every_caption_the_bundled_packages_give():
    """benchmarks.captions' table is the README's measure of the bundled model: a caption that
    nobody judged (the model or the photos changed) would show as '?'. Re-judge by looking."""
    from benchmarks.captions import INT8, JUDGED, photos
    from runtime import DEFAULT_MODEL, Captioner

    judged = json.loads(JUDGED.read_text())
    images = photos()
    assert all(p.exists() for p in images) and {p.name for p in images} <= set(judged)
    for package in (DEFAULT_MODEL, INT8):
        captions = Captioner(package, provider="cpu", threads=2).caption([str(p) for p in images])
        unjudged = [(p.name, c.text) for p, c in zip(images, captions) if c.text not in judged[p.name]["verdicts"]]
        assert not unjudged, f"{package.name}: {unjudged}"


def qres(tree: list, files: dict[int, tuple[bytes, bool]], names: list[str]) -> bytes:
    """A Qt resource file (format version 1): tree rows (name index, is_dir, count, first child),
    file contents by row (bytes, zlib-compressed), names by index."""
    import struct
    import zlib

    name_blob, name_at = b"", []
    for n in names:
        name_at.append(len(name_blob))
        name_blob += struct.pack(">HI", len(n), 0) + n.encode("utf-16-be")
    data_blob, rows = b"", b""
    for row, (name, is_dir, count, first) in enumerate(tree):
        if is_dir:
            rows += struct.pack(">IHII", name_at[name], 2, count, first)
            continue
        content, packed = files[row]
        stored = struct.pack(">I", len(content)) + zlib.compress(content) if packed else content
        rows += struct.pack(">IHHHI", name_at[name], int(packed), 0, 0, len(data_blob))
        data_blob += struct.pack(">I", len(stored)) + stored
    tree_at = 20
    return (b"qres" + struct.pack(">IIII", 1, tree_at, tree_at + len(rows), tree_at + len(rows) + len(data_blob))
            + rows + data_blob + name_blob)


def test_gcompris_reads_qt_resources_and_knows_the_table_s_photos():
    from benchmarks.gcompris import in_table, rcc_files

    # root -> [dir "a" -> [x.webp], y.jpg (zlib)]
    blob = qres([(0, True, 2, 1), (1, True, 1, 3), (2, False, 0, 0), (3, False, 0, 0)],
                {2: (b"jpeg bytes", True), 3: (b"webp bytes", False)}, ["", "a", "y.jpg", "x.webp"])
    assert sorted(rcc_files(blob)) == [("a/x.webp", b"webp bytes"), ("y.jpg", b"jpeg bytes")]
    with pytest.raises(ValueError, match="not a Qt resource"):
        list(rcc_files(b"PK\x03\x04"))
    assert ("categorization.rcc: gcompris/src/activities/categorization/resource/images/tools/wrench.webp"
            in in_table())
