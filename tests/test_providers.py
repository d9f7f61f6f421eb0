"""Provider choice, fallback and TensorRT/CUDA settings, proven on CPU with the provider
lists and failures a GPU or Jetson build would produce."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import Captioner, ProviderError
from runtime import providers as prov
from runtime.manifest import load_manifest
from runtime.onnx_graph import graph_facts, tensorrt_problems
from runtime.preprocess import load_pixels
from runtime.providers import ORT_NAMES, provider_options, resolve

CPU, CUDA, TRT = ORT_NAMES["cpu"], ORT_NAMES["cuda"], ORT_NAMES["tensorrt"]


def test_auto_prefers_tensorrt_then_cuda_then_cpu():
    assert resolve("auto", [TRT, CUDA, CPU]) == ([TRT, CUDA, CPU], None)
    providers, note = resolve("auto", [CUDA, CPU])
    assert providers == [CUDA, CPU] and note == "provider: CUDA (TensorRT not available)"
    providers, note = resolve("auto", [CPU])
    assert providers == [CPU] and note == "provider: CPU (TensorRT and CUDA not available)"


def test_explicit_provider_keeps_cuda_then_cpu_for_unsupported_nodes():
    assert resolve("tensorrt", [TRT, CUDA, CPU]) == ([TRT, CUDA, CPU], None)
    assert resolve("tensorrt", [TRT, CPU]) == ([TRT, CPU], None)
    assert resolve("cuda", [TRT, CUDA, CPU]) == ([CUDA, CPU], None)
    assert resolve("cpu", [TRT, CUDA, CPU]) == ([CPU], None)


def test_int8_packages_never_go_to_tensorrt():
    assert prov.for_package([TRT, CUDA, CPU], "int8", explicit=False) == [CUDA, CPU]
    assert prov.for_package([TRT, CUDA, CPU], "fp16", explicit=False) == [TRT, CUDA, CPU]
    with pytest.raises(ProviderError, match="int8 packages are weight-only .* use --provider cuda"):
        prov.for_package([TRT, CUDA, CPU], "int8", explicit=True)


@pytest.mark.parametrize("choice", ["tensorrt", "cuda"])
def test_explicit_unavailable_provider_is_an_error(choice):
    with pytest.raises(ProviderError, match=f"provider {choice} is not available"):
        resolve(choice, [CPU])


def test_unknown_provider():
    with pytest.raises(ProviderError, match="unknown provider"):
        resolve("npu", [CPU])


@pytest.fixture(scope="module")
def manifest(captioner):
    return captioner.manifest


def profile(options: dict, which: str) -> dict[str, str]:
    return dict(item.split(":") for item in options[f"trt_profile_{which}_shapes"].split(","))


def test_tensorrt_profiles_cover_the_package_limits(manifest):
    """No dimension is ever 0; the optimum is one image, one new token, the default run's cache."""
    decoder = provider_options(TRT, manifest, "decoder", max_batch=8)
    low, best, high = (profile(decoder, which) for which in ("min", "opt", "max"))
    assert low["input_ids"] == best["input_ids"] == "1x1" and high["input_ids"] == "8x40"
    assert (low["past_key.0"], best["past_key.2"], high["past_value.1"]) == ("1x4x1x64", "1x4x40x64", "8x4x40x64")
    assert (low["cross_key.0"], high["cross_value.2"]) == ("1x4x20x64", "8x4x20x64")  # 20 memory tokens
    assert (low["cache_lengths"], high["cache_lengths"], high["logit_index"]) == ("1", "8", "8x40")
    assert set(low) == {i["name"] for i in manifest.graph("decoder")["inputs"]}
    vision = provider_options(TRT, manifest, "vision", max_batch=4)
    assert (vision["trt_profile_min_shapes"], vision["trt_profile_max_shapes"]) == \
        ("pixel_values:1x3x224x224", "pixel_values:4x3x224x224")


@pytest.fixture
def known_gpu(monkeypatch, tmp_path):
    """A TensorRT and a GPU whose versions can be read; caches under tmp_path."""
    monkeypatch.setenv("EDGECAP_CACHE_DIR", str(tmp_path / "fresh" / "cache"))
    monkeypatch.setattr(prov, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(prov, "gpu", lambda: {"name": "Orin", "compute_capability": "8.7", "cuda_runtime": "12.6"})


def test_tensorrt_precision_flags_follow_the_package(manifest, known_gpu):
    options = provider_options(TRT, manifest, "decoder", 8)
    assert options["trt_fp16_enable"] is False and "trt_int8_enable" not in options
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    fp16 = replace(manifest, data={**manifest.data, "precision": "fp16"})
    assert provider_options(TRT, fp16, "decoder", 8)["trt_fp16_enable"] is True
    assert provider_options(CPU, manifest, "decoder", 8) == {}


def test_tensorrt_cache_folder_is_created_with_its_parents(manifest, known_gpu, tmp_path):
    """ONNX Runtime's TensorRT provider creates only the last level of the cache path."""
    assert not (tmp_path / "fresh").exists()
    options = provider_options(TRT, manifest, "vision", 8)
    assert Path(options["trt_engine_cache_path"]).is_dir()
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(prov.cache_dir(manifest, 8))


@pytest.mark.parametrize("unknown", ["tensorrt_version", "gpu"])
def test_nothing_is_cached_under_an_unknown_version(manifest, known_gpu, monkeypatch, unknown):
    monkeypatch.setattr(prov, unknown, lambda: None)
    assert prov.cache_dir(manifest, 8) is None
    options = provider_options(TRT, manifest, "decoder", 8)
    assert "trt_engine_cache_enable" not in options and "trt_timing_cache_enable" not in options
    assert prov.engine_note(manifest, 8) == ("building TensorRT engine (not cached: the TensorRT version or the GPU "
                                          "could not be read)")


def test_library_names_are_loaded_as_given(monkeypatch, tmp_path):
    """`libcudart.so.12` is dlopen'ed as such (never `libcudart.so.12.so`), and pip's nvidia
    wheels are searched too, where the loader does not look."""
    from runtime import gpu

    wheel_lib = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    wheel_lib.mkdir(parents=True)
    (wheel_lib / "libcudart.so.12").write_bytes(b"")
    tried = []

    def dlopen(path):
        tried.append(path)
        if path != str(wheel_lib / "libcudart.so.12"):
            raise OSError(f"{path}: cannot open shared object file")
        return "handle"

    monkeypatch.setattr(gpu.ctypes, "CDLL", dlopen)
    monkeypatch.setattr(gpu.site, "getsitepackages", lambda: [str(tmp_path)])
    assert gpu._load(gpu.CUDART) == "handle"
    assert [t for t in tried if "/" not in t] == ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    assert not any(t.endswith(".so.12.so") or t.startswith("liblib") for t in tried)


def test_engine_cache_is_keyed_by_graphs_profiles_runtime_tensorrt_and_gpu(manifest, monkeypatch, tmp_path, known_gpu):
    monkeypatch.setenv("EDGECAP_CACHE_DIR", str(tmp_path))
    base = prov.cache_dir(manifest, 8)
    assert base.parent == tmp_path / "tensorrt"
    changed = {**manifest.data, "files": {**manifest.data["files"], "decoder.onnx": {"sha256": "0" * 64, "bytes": 1}}}
    assert prov.cache_dir(replace(manifest, data=changed), 8) != base
    assert prov.cache_dir(manifest, 4) != base  # another profile: an engine built for batch 8 is not reused
    with monkeypatch.context() as m:
        m.setattr(prov.ort, "__version__", "0.0.0")
        assert prov.cache_dir(manifest, 8) != base
    with monkeypatch.context() as m:
        m.setattr(prov, "tensorrt_version", lambda: "10.4.0")
        assert prov.cache_dir(manifest, 8) != base
    monkeypatch.setattr(prov, "gpu", lambda: {"name": "H100", "compute_capability": "9.0", "cuda_runtime": "12.6"})
    assert prov.cache_dir(manifest, 8) != base
    assert prov.engine_note(manifest, 8).startswith("building TensorRT engine, once")


class FailingGPUSessions:
    """onnxruntime-gpu on a box whose CUDA/TensorRT libraries are missing: the providers
    are listed as available, and creating a session on them raises."""

    def __init__(self, monkeypatch):
        real = ort.InferenceSession
        monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])

        def session(path, opts, providers, **kwargs):
            assert kwargs == {"enable_fallback": 0}, "onnxruntime's own fallback prints to stdout"
            first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
            if first in (TRT, CUDA):
                raise RuntimeError(f"{first} init failed: libcudart.so.12: cannot open shared object file\ndetails")
            return real(path, opts, providers=providers, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", session)


def test_auto_falls_back_one_line_per_failed_provider(manifest, monkeypatch, photo_paths, tmp_path, captioner):
    monkeypatch.setenv("EDGECAP_CACHE_DIR", str(tmp_path))
    FailingGPUSessions(monkeypatch)
    cap = Captioner(manifest.root, provider="auto")
    assert cap.provider == "CPU"
    assert cap.notes == [
        "provider: TensorRT failed to initialise (TensorrtExecutionProvider init failed: libcudart.so.12: "
        "cannot open shared object file); falling back to CUDA",
        "provider: CUDA failed to initialise (CUDAExecutionProvider init failed: libcudart.so.12: "
        "cannot open shared object file); falling back to CPU"]
    assert cap.caption(photo_paths["chelsea"]).tokens == captioner.caption(photo_paths["chelsea"]).tokens


@pytest.mark.parametrize("choice, label", [("tensorrt", "TensorRT"), ("cuda", "CUDA")])
def test_explicit_provider_that_fails_to_initialise_is_an_error(manifest, monkeypatch, tmp_path, choice, label):
    monkeypatch.setenv("EDGECAP_CACHE_DIR", str(tmp_path))
    FailingGPUSessions(monkeypatch)
    with pytest.raises(ProviderError, match=f"{label} failed to initialise: .*cannot open shared object file$"):
        Captioner(manifest.root, provider=choice)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_io_binding_keeps_the_same_tokens(captioner, image_paths, num_beams):
    """The CUDA path (caches bound as device OrtValues between steps), run on CPU memory."""
    bound = Captioner(captioner.manifest.root, provider="cpu", io_binding=True)
    assert bound.graphs.device == "cpu" and captioner.graphs.device is None
    pixels = np.stack([load_pixels(p, captioner.manifest.preprocess) for p in image_paths])
    cfg = captioner.generation_config(num_beams=num_beams)
    assert bound.generate(pixels, cfg) == captioner.generate(pixels, cfg)


def test_graphs_are_fit_for_tensorrt_and_cuda_graphs(manifest):
    """No If/Loop/Scan, only ops TensorRT's parser takes, every input shape declared."""
    for role in ("vision", "decoder"):
        facts = graph_facts(manifest.path(manifest.graph(role)["file"]))
        assert tensorrt_problems(facts) == [], role
        assert {"Conv", "MatMul"} & facts.ops


def test_hygiene_check_catches_control_flow_and_custom_ops():
    from runtime.onnx_graph import GraphFacts

    facts = GraphFacts(["x"], ["y"], {"x": None}, [], {"If", "MatMul", "com.microsoft::MatMulNBits"})
    assert tensorrt_problems(facts) == ["control flow op If", "op com.microsoft::MatMulNBits not supported by TensorRT",
                                        "input x has no declared shape"]


def test_auto_on_this_machine_runs(manifest):
    first_available = prov.LABELS[resolve("auto")[0][0]]
    assert Captioner(manifest.root, provider="auto").provider == first_available
    assert load_manifest(manifest.root).data["dims"]["capacity"] == {"min": 1, "opt": 40, "max": 40}


def test_doctor_reports_the_package_and_the_provider_choice():
    import json
    import subprocess
    import sys

    from helpers import ROOT

    r = subprocess.run([sys.executable, "-m", "runtime.doctor", "--json", "--model", "runtime/models/default"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["model"]["tensorrt_ready"] == "vision ok, decoder ok"
    # The CPU default, INT8, says why it is not for TensorRT.
    r = subprocess.run([sys.executable, "-m", "runtime.doctor", "--json"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stdout
    int8 = json.loads(r.stdout)["model"]
    assert int8["precision"] == "int8" and "MatMulNBits not supported by TensorRT" in int8["tensorrt_ready"]
    assert facts["auto_provider"] == prov.LABELS[resolve("auto")[0][0]] and "CPU" in facts["providers_available"]
    assert facts["onnxruntime"].startswith(ort.__version__)
    bad = subprocess.run([sys.executable, "-m", "runtime.doctor", "--model", "/nonexistent"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "problem: /nonexistent: no manifest.json" in bad.stdout


def test_a_provider_onnxruntime_drops_silently_is_caught(manifest, monkeypatch):
    """What onnxruntime-gpu does when CUDA's libraries are missing: it logs "Failed to create
    CUDAExecutionProvider", creates the session on the CPU anyway and raises nothing."""
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", lambda path, opts, providers, **kw: real(path, opts, providers=[CPU]))
    cap = Captioner(manifest.root, provider="auto")
    assert cap.provider == "CPU"
    assert cap.notes == [f"provider: CUDA failed to initialise for the {role} graph; running it on CPU "
                         "(python -m runtime.doctor shows why)" for role in ("vision", "decoder")]
    with pytest.raises(ProviderError, match=r"^CUDA failed to initialise for the vision graph \(onnxruntime fell back"):
        Captioner(manifest.root, provider="cuda")


def test_the_vision_graph_falling_back_alone_is_caught(manifest, monkeypatch):
    """ONNX Runtime places each graph's nodes apart: the vision graph alone may land on the CPU."""
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])

    def session(path, opts, providers, **kw):
        got = real(path, opts, providers=[CPU])
        if "decoder" in str(path):  # the decoder's session says it got CUDA
            monkeypatch.setattr(got, "get_providers", lambda: [CUDA, CPU], raising=False)
        return got

    monkeypatch.setattr(ort, "InferenceSession", session)
    assert Captioner(manifest.root, provider="auto").notes == [
        "provider: CUDA failed to initialise for the vision graph; running it on CPU (python -m runtime.doctor shows why)"]


def profile_bounds(manifest, role: str, max_batch: int) -> dict[str, tuple[list[int], list[int]]]:
    options = provider_options(TRT, manifest, role, max_batch)

    def parse(spec):
        return {name: [int(d) for d in dims.split("x")] for name, dims in (i.split(":") for i in spec.split(","))}

    low, high = parse(options["trt_profile_min_shapes"]), parse(options["trt_profile_max_shapes"])
    return {name: (low[name], high[name]) for name in low}


@pytest.fixture(scope="module")
def captioners_by_max_batch(manifest):
    return {m: Captioner(manifest.root, provider="cpu", max_batch=m) for m in (1, 3, 8)}


def test_every_forward_pass_fits_the_tensorrt_profile(manifest, captioners_by_max_batch, monkeypatch):
    """Images x beams, prompt and caption lengths: every shape fed to either graph lies inside
    the profile TensorRT was built with (explicit profiles cannot grow at run time)."""
    from hypothesis import given, settings, strategies as st

    fed = []

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(images=st.integers(1, 10), max_batch=st.sampled_from([1, 3, 8]), beams=st.integers(1, 8),
           tokens=st.integers(1, 40))
    def check(images, max_batch, beams, tokens):
        cap = captioners_by_max_batch[max_batch]
        if beams > max_batch:
            with pytest.raises(ValueError, match="beams must be between 1 and the max batch"):
                cap.generation_config(num_beams=beams)
            return
        cfg = cap.generation_config(max_new_tokens=tokens, num_beams=beams)
        pixels = np.random.default_rng(images).uniform(-1, 1, (images, 3, 224, 224)).astype(np.float32)
        fed.clear()
        assert len(cap.generate(pixels, cfg)) == images
        for role, feeds in fed:
            bounds = profile_bounds(manifest, role, max_batch)
            for name, (low, high) in bounds.items():
                shape = list(feeds[name].shape)
                assert all(lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)), (role, name, shape)
            # The rest have fixed shapes, fed exactly as declared.
            declared = {i["name"]: i["shape"] for i in manifest.graph(role)["inputs"]}
            assert {n: list(feeds[n].shape) for n in feeds if n not in bounds} == \
                {n: s for n, s in declared.items() if n not in bounds}

    for cap in captioners_by_max_batch.values():
        for role, session in (("vision", cap.graphs.vision), ("decoder", cap.graphs.decoder)):
            run = session.run
            monkeypatch.setattr(session, "run", lambda out, feeds, role=role, run=run: fed.append((role, feeds))
                                or run(out, feeds))
    check()
