"""Provider choice and fallback, with the provider lists a GPU/Jetson build would report."""

import pytest

from runtime import Captioner, ProviderError
from runtime.providers import ORT_NAMES, provider_options, resolve

CPU, CUDA, TRT = ORT_NAMES["cpu"], ORT_NAMES["cuda"], ORT_NAMES["tensorrt"]


def test_auto_prefers_tensorrt_then_cuda_then_cpu():
    assert resolve("auto", [TRT, CUDA, CPU]) == ([TRT, CUDA, CPU], None)
    providers, note = resolve("auto", [CUDA, CPU])
    assert providers == [CUDA, CPU] and note == "provider: CUDA (TensorRT not available)"
    providers, note = resolve("auto", [CPU])
    assert providers == [CPU] and note == "provider: CPU (TensorRT and CUDA not available)"


def test_explicit_provider_keeps_cpu_for_unsupported_nodes():
    assert resolve("tensorrt", [TRT, CUDA, CPU]) == ([TRT, CPU], None)
    assert resolve("cpu", [TRT, CUDA, CPU]) == ([CPU], None)


@pytest.mark.parametrize("choice", ["tensorrt", "cuda"])
def test_explicit_unavailable_provider_is_an_error(choice):
    with pytest.raises(ProviderError, match=f"provider {choice} is not available"):
        resolve(choice, [CPU])


def test_unknown_provider():
    with pytest.raises(ProviderError, match="unknown provider"):
        resolve("npu", [CPU])


def test_tensorrt_options_cache_engines_per_model_and_precision():
    a = provider_options(TRT, "a" * 64, "fp32")
    b = provider_options(TRT, "b" * 64, "fp16")
    assert a["trt_engine_cache_enable"] and a["trt_engine_cache_path"] != b["trt_engine_cache_path"]
    assert not a["trt_fp16_enable"] and b["trt_fp16_enable"]
    assert provider_options(CPU, "a" * 64, "fp32") == {}


def test_auto_on_this_machine_runs(captioner):
    """Whatever this build offers, `auto` ends on a provider that captions."""
    auto = Captioner(captioner.manifest.root, provider="auto")
    assert auto.provider in ("TensorRT", "CUDA", "CPU")
