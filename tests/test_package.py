"""Model packages: the bundled one is complete and honest; broken ones are refused
with a one-line reason before ONNX Runtime reads any graph."""

import json
import shutil
from pathlib import Path

import pytest

from export import DEFAULT_CHECKPOINT
from runtime import DEFAULT_MODEL, Captioner, PackageError
from runtime.manifest import MANIFEST, load_manifest, sha256


def test_default_package_is_complete_and_small():
    m = load_manifest(DEFAULT_MODEL)
    files = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert files == set(m.data["files"]) | {MANIFEST}
    assert {"vision.onnx.data", "decoder.onnx.data", "tokenizer.json"} <= files
    assert sum((DEFAULT_MODEL / f).stat().st_size for f in files) < 40 * 2**20
    layers = range(m.decoder.layers)
    assert [i["name"] for i in m.graph("decoder")["inputs"]] == [
        "input_ids", "position_ids", "cache_lengths", "logit_index", *(f"past_key.{i}" for i in layers),
        *(f"past_value.{i}" for i in layers), *(f"cross_key.{i}" for i in layers), *(f"cross_value.{i}" for i in layers)]
    assert [o["name"] for o in m.graph("decoder")["outputs"]] == [
        "logits", *(f"present_key.{i}" for i in layers), *(f"present_value.{i}" for i in layers)]
    assert m.preprocess.resize == [224, 224] and m.preprocess.crop is None  # the whole photo (export.preprocess)
    for key in ("torch", "onnx", "onnxruntime"):
        assert key in m.data["source"]["versions"]


def test_default_package_was_exported_from_the_committed_checkpoint():
    recorded = load_manifest(DEFAULT_MODEL).data["source"]["decoder_checkpoint"]
    assert recorded["sha256"] == sha256(DEFAULT_CHECKPOINT)


@pytest.fixture
def package(tmp_path):
    """A private copy of the default package (copies: onnx rightly refuses hard-linked data)."""
    return Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "pkg"))


def rewrite_manifest(folder, change):
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(folder, match):
    with pytest.raises(PackageError, match=match) as e:
        Captioner(folder)
    assert "\n" not in str(e.value)


def test_swapped_external_data_is_refused(package):
    data = package / "decoder.onnx.data"
    content = bytearray(data.read_bytes())
    content[1000] ^= 0xFF
    data.write_bytes(bytes(content))
    refused(package, "decoder.onnx.data does not match its SHA-256")


def test_missing_graph_is_refused(package):
    (package / "vision.onnx").unlink()
    refused(package, "vision.onnx is missing")


def test_truncated_graph_is_refused(package):
    graph = package / "decoder.onnx"
    content = graph.read_bytes()
    graph.write_bytes(content[: len(content) // 2])
    refused(package, "decoder.onnx does not match")


@pytest.mark.parametrize("version", [4, 99])  # 4: a package from before the prompting section
def test_another_format_version_is_refused_with_what_to_do(package, version):
    rewrite_manifest(package, lambda d: d.update(format_version=version))
    refused(package, f"format version {version} is not supported .*export it again")


def test_a_package_without_a_name_is_refused(package):
    rewrite_manifest(package, lambda d: d.update(name=""))
    refused(package, "name must be a non-empty string")


def test_missing_field_is_refused(package):
    rewrite_manifest(package, lambda d: d.pop("preprocess"))
    refused(package, "missing preprocess")


def test_path_outside_the_package_is_refused(package):
    def escape(d):
        d["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}

    rewrite_manifest(package, escape)
    refused(package, "not a plain file name")


def test_symlink_inside_the_package_is_refused(package, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(package / "tokenizer.json", outside)
    (package / "tokenizer.json").unlink()
    (package / "tokenizer.json").symlink_to(outside)
    refused(package, "tokenizer.json is missing or not a regular file")


def test_not_a_package(tmp_path):
    refused(tmp_path, "no manifest.json")


def retarget_external_data(package, location):
    """Point one decoder weight at `location`, and re-hash so only the graph vetting can object."""
    import onnx

    graph = package / "decoder.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(graph))

    def rehash(d):
        d["files"]["decoder.onnx"] = {"sha256": sha256(graph), "bytes": graph.stat().st_size}

    rewrite_manifest(package, rehash)


def test_external_data_outside_the_package_is_refused(package):
    retarget_external_data(package, "../../etc/passwd")
    refused(package, "decoder.onnx reads external data from '../../etc/passwd', which is not a file of the package")


def test_external_data_in_an_unlisted_file_is_refused(package):
    shutil.copy(package / "decoder.onnx.data", package / "other.data")
    retarget_external_data(package, "other.data")
    refused(package, "reads external data from 'other.data'")


def test_graph_inputs_and_outputs_are_bound_by_role(package):
    """Every input and output the runtime binds must be declared by its role name, and be the
    graph's own: a manifest that renames one, or whose graph has them otherwise, is refused."""
    def rename(d):
        d["graphs"]["decoder"]["inputs"][0]["name"] = "token_ids"

    rewrite_manifest(package, rename)
    refused(package, r"the decoder graph's inputs do not fit this package \(missing input_ids; unexpected token_ids\)")


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
def test_declared_io_must_be_the_graphs_own(package, kind):
    def swap(d):
        io = d["graphs"]["decoder"][kind]
        io[1]["name"], io[2]["name"] = io[2]["name"], io[1]["name"]  # the same roles, bound to the wrong tensors

    rewrite_manifest(package, swap)
    refused(package, f"decoder.onnx has {kind} .*, not the ones the manifest declares")


@pytest.mark.parametrize("change, match", [
    (lambda d: d["tokenizer"].update(eos_ids="2"), "tokenizer.eos_ids has the wrong type"),
    (lambda d: d["tokenizer"].update(eos_ids=[True]), "tokenizer.eos_ids has the wrong type"),
    (lambda d: d["tokenizer"].update(eos_id=2), "tokenizer.eos_id is unknown"),  # format 4's field
    (lambda d: d["generation"].pop("max_new_tokens"), "generation.max_new_tokens is missing"),
    (lambda d: d["generation"].update(early_stopping="sometimes"), "generation is malformed"),
    (lambda d: d["prompting"].update(input="telepathy"), "prompting.input must be one of"),
    (lambda d: d["prompting"].update(input="chat"), "prompting does not fit its input 'chat'"),
    (lambda d: d["prompting"].update(input="encoder"), "vision graph's inputs do not fit .*missing text_ids"),
    (lambda d: d["preprocess"].update(layout="NCHW"), "preprocess.layout is unknown"),
    (lambda d: d["preprocess"].update(resample="nearest"), "preprocess.resample has an unknown value"),
    (lambda d: d["preprocess"].update(kind="mosaic"), "preprocess.kind has an unknown value"),
    (lambda d: d["preprocess"].update(crop=[224]), "preprocess is malformed"),
    (lambda d: d["preprocess"].update(kind="tiles"), "preprocess.longest_edge is missing"),
    (lambda d: d["decoder"].update(kv_heads=3), "decoder is malformed"),
    (lambda d: d["decoder"].update(vocab_size=1000), "logits .* does not fit the manifest's decoder"),
    (lambda d: d["decoder"].update(heads=2, kv_heads=2), "cross_key.0 .* does not fit the manifest's decoder"),
    (lambda d: d["decoder"].update(attention="flash"), "decoder.attention must be one of onnx, grouped"),
    (lambda d: d["decoder"].update(attention="grouped"), "decoder.attention does not fit decoder.onnx"),
], ids=["eos-type", "eos-bool", "old-field", "missing", "early-stopping", "input", "chat-without-template",
        "input-without-graph-input", "unknown", "resample", "kind", "crop", "tiles-fields", "kv-heads", "vocabulary",
        "heads", "attention", "attention-graph"])
def test_malformed_manifest_values_are_one_line_errors(package, change, match):
    rewrite_manifest(package, change)
    refused(package, match)


def test_graph_onnx_runtime_rejects_is_a_one_line_error(package):
    """Structurally valid protobuf, hashes re-signed, but not a model ONNX Runtime can run."""
    import onnx

    graph = package / "vision.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, str(graph))
    rewrite_manifest(package, lambda d: d["files"].update(
        {"vision.onnx": {"sha256": sha256(graph), "bytes": graph.stat().st_size}}))
    refused(package, "vision.onnx: ONNX Runtime cannot load it")


def test_broken_tokenizer_is_a_one_line_error(package):
    tok = package / "tokenizer.json"
    tok.write_text("{not json")
    rewrite_manifest(package, lambda d: d["files"].update(
        {"tokenizer.json": {"sha256": sha256(tok), "bytes": tok.stat().st_size}}))
    refused(package, "unusable tokenizer")
