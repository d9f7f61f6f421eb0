"""Execution provider choice: `auto` tries TensorRT, then CUDA, then CPU.

Only providers compiled into the installed onnxruntime are tried; a provider that is
compiled in but fails to initialise (missing CUDA/TensorRT libraries) is caught
after session creation, from what the session really uses.
"""

import hashlib
import os
from pathlib import Path

import onnxruntime as ort

from .gpu import gpu, tensorrt_version
from .manifest import GRAPHS

ORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CHOICES = ("auto", *ORT_NAMES)
LABELS = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}


class ProviderError(Exception):
    """An explicitly requested provider that cannot be used (a usage error, exit 2)."""


def cache_dir(manifest) -> Path:
    """Engines and timing caches are only valid for these graphs, this onnxruntime, this
    TensorRT and this GPU: all of them key the folder, so a stale engine is never reused."""
    graphs = [manifest.data["files"][manifest.graph(role)["file"]]["sha256"] for role in GRAPHS]
    device = gpu() or {}
    key = ":".join([*graphs, ort.__version__, tensorrt_version() or "trt?", device.get("compute_capability", "sm?")])
    root = Path(os.environ.get("EDGECAP_CACHE_DIR", Path.home() / ".cache" / "edgecap"))
    return root / "tensorrt" / hashlib.sha256(key.encode()).hexdigest()[:16]


def profile_shapes(manifest, role: str, max_batch: int) -> dict[str, str]:
    """TensorRT optimisation profile covering every shape the package allows, so no
    engine is rebuilt mid-caption: symbolic dims span the manifest's `dims` ranges
    (batch up to `max_batch`), optimised for batch 1, one new token, half-full cache."""
    dims = manifest.data["dims"]
    bounds = {name: (d["min"], d["max"] if d["max"] is not None else max_batch) for name, d in dims.items()}
    opt = {name: lo if name != "past" else (lo + hi) // 2 for name, (lo, hi) in bounds.items()}

    def shapes(pick):
        return ",".join(f"{i['name']}:" + "x".join(str(d if isinstance(d, int) else pick(d)) for d in i["shape"])
                        for i in manifest.graph(role)["inputs"])

    return {"trt_profile_min_shapes": shapes(lambda d: bounds[d][0]),
            "trt_profile_opt_shapes": shapes(lambda d: opt[d]),
            "trt_profile_max_shapes": shapes(lambda d: bounds[d][1])}


def provider_options(name: str, manifest, role: str, max_batch: int) -> dict:
    if name == ORT_NAMES["tensorrt"]:
        cache = str(cache_dir(manifest))
        precision = manifest.data["precision"]
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8",
                "trt_layer_norm_fp32_fallback": True,  # LayerNorm overflows in FP16 decoders
                **profile_shapes(manifest, role, max_batch)}
    return {}


def engine_note(manifest) -> str | None:
    folder = cache_dir(manifest)
    if folder.is_dir() and any(folder.iterdir()):
        return None
    return f"building TensorRT engine, once (cached in {folder})"


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
    label, fallback = LABELS[requested[0]], LABELS.get(used[0], used[0])
    if explicit:
        raise ProviderError(f"{label} failed to initialise (onnxruntime fell back to {fallback}); "
                            "python -m runtime.doctor shows why")
    return f"provider: {label} failed to initialise; running on {fallback} (python -m runtime.doctor shows why)"
