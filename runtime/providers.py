"""Execution provider choice: `auto` tries TensorRT, then CUDA, then CPU.

Only providers compiled into the installed onnxruntime are tried; a provider that is
compiled in but fails to initialise (missing CUDA/TensorRT libraries) is caught
after session creation, from what the session really uses.
"""

import hashlib
from pathlib import Path

import onnxruntime as ort

ORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CHOICES = ("auto", *ORT_NAMES)
LABELS = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}


class ProviderError(Exception):
    """An explicitly requested provider that cannot be used (a usage error, exit 2)."""


def cache_dir(package_hash: str) -> Path:
    """TensorRT engines are only valid for one model and one onnxruntime build."""
    key = hashlib.sha256(f"{package_hash}:{ort.__version__}".encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "edgecap" / "tensorrt" / key


def provider_options(name: str, package_hash: str, precision: str) -> dict:
    if name == "TensorrtExecutionProvider":
        cache = str(cache_dir(package_hash))
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                "trt_fp16_enable": precision == "fp16"}
    return {}


def resolve(choice: str, available: list[str] | None = None) -> tuple[list[str], str | None]:
    """(provider names in priority order, a one-line note when `auto` falls back)."""
    available = ort.get_available_providers() if available is None else available
    if choice not in CHOICES:
        raise ProviderError(f"unknown provider {choice!r}; choose one of {', '.join(CHOICES)}")
    if choice != "auto":
        name = ORT_NAMES[choice]
        if name not in available:
            raise ProviderError(f"provider {choice} is not available in this onnxruntime build "
                                f"(available: {', '.join(LABELS.get(p, p) for p in available)})")
        return ([name] if name == ORT_NAMES["cpu"] else [name, ORT_NAMES["cpu"]]), None
    wanted = [ORT_NAMES[k] for k in ("tensorrt", "cuda", "cpu")]
    chosen = [p for p in wanted if p in available]
    missing = [LABELS[p] for p in wanted[: wanted.index(chosen[0])]]
    note = f"provider: {LABELS[chosen[0]]} ({' and '.join(missing)} not available)" if missing else None
    return chosen, note


def check_session(session: ort.InferenceSession, requested: list[str], explicit: bool) -> str | None:
    """Did the session get the first provider asked for? An error if it was explicit,
    a one-line note if `auto` silently fell further back."""
    used = session.get_providers()
    if requested[0] in used:
        return None
    msg = f"{LABELS[requested[0]]} failed to initialise (missing libraries?); running on {LABELS.get(used[0], used[0])}"
    if explicit:
        raise ProviderError(msg)
    return f"provider: {msg}"
