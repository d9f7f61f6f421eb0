"""Execution provider choice, and a package's two sessions opened on it: `auto` tries
TensorRT, then CUDA, then CPU.

Only providers compiled into the installed onnxruntime are tried; a provider that is
compiled in but fails to initialise (missing CUDA/TensorRT libraries) is caught
after session creation, from what the session really uses.
"""

import hashlib
import logging
import os
import re
from pathlib import Path

import onnxruntime as ort

from .gpu import gpu, tensorrt_version
from .manifest import GRAPHS, WEIGHT_ONLY, Manifest, PackageError

ORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CHOICES = ("auto", *ORT_NAMES)
LABELS = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}


class ProviderError(Exception):
    """An explicitly requested provider that cannot be used (a usage error, exit 2)."""


class LoadError(Exception):
    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason


def cache_dir(manifest, max_batch: int) -> Path | None:
    """Engines and timing caches are only valid for these graphs and profiles, this
    onnxruntime, this TensorRT and this GPU: all of them key the folder, so a stale engine is
    never reused. None where the TensorRT version or the GPU cannot be read: such a key could
    not tell an upgraded TensorRT from the old one, so nothing is cached."""
    version, device = tensorrt_version(), gpu()
    if version is None or device is None:
        return None
    graphs = [manifest.data["files"][manifest.graph(role)["file"]]["sha256"] for role in GRAPHS]
    profiles = [shapes for role in GRAPHS for shapes in profile_shapes(manifest, role, max_batch).values()]
    key = ":".join([*graphs, *profiles, ort.__version__, version, device["compute_capability"]])
    root = Path(os.environ.get("EDGECAP_CACHE_DIR", Path.home() / ".cache" / "edgecap"))
    return root / "tensorrt" / hashlib.sha256(key.encode()).hexdigest()[:16]


def profile_shapes(manifest, role: str, max_batch: int) -> dict[str, str]:
    """TensorRT optimisation profile covering every shape the package allows, so no
    engine is rebuilt mid-caption: symbolic dims span the manifest's `dims` ranges
    (batch up to `max_batch`), optimised for each dim's `opt`: one image, one new token, the
    cache of the package's default run, the model's real memory length."""
    dims = manifest.data["dims"]
    bounds = {name: (d["min"], d["max"] if d["max"] is not None else max_batch) for name, d in dims.items()}
    opt = {name: min(max(dims[name]["opt"], lo), hi) for name, (lo, hi) in bounds.items()}
    dynamic = [i for i in manifest.graph(role)["inputs"] if any(isinstance(d, str) for d in i["shape"])]

    def shapes(pick):
        return ",".join(f"{i['name']}:" + "x".join(str(d if isinstance(d, int) else pick(d)) for d in i["shape"])
                        for i in dynamic)

    return {"trt_profile_min_shapes": shapes(lambda d: bounds[d][0]),
            "trt_profile_opt_shapes": shapes(lambda d: opt[d]),
            "trt_profile_max_shapes": shapes(lambda d: bounds[d][1])}


def provider_options(name: str, manifest, role: str, max_batch: int) -> dict:
    """TensorRT: profiles, the engine and timing cache (the folder is made here: the provider
    creates only its last level and fails on a fresh machine or an empty Docker volume), FP16
    for FP16 packages. Never TensorRT's INT8: int8 packages are weight-only (no calibration
    table, MatMulNBits) and are routed to CUDA by `for_package`."""
    if name != ORT_NAMES["tensorrt"]:
        return {}
    options = {"trt_fp16_enable": manifest.data["precision"] == "fp16", **profile_shapes(manifest, role, max_batch)}
    folder = cache_dir(manifest, max_batch)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder)}
    # No trt_layer_norm_fp32_fallback: it acts on Pow -> ReduceMean pairs only, not on the
    # LayerNormalization op these graphs use; FP16 packages keep LayerNormalization FP32 in the
    # graph itself (export/quantize.py).
    return options


def engine_note(manifest, max_batch: int) -> str | None:
    folder = cache_dir(manifest, max_batch)
    if folder is None:
        return "building TensorRT engine (not cached: the TensorRT version or the GPU could not be read)"
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
        # Nodes TensorRT rejects belong on CUDA, not the CPU.
        fallback = [p for p in (ORT_NAMES["cuda"], ORT_NAMES["cpu"]) if p != name and p in available + [ORT_NAMES["cpu"]]]
        return ([name] if name == ORT_NAMES["cpu"] else [name, *fallback]), None
    wanted = [ORT_NAMES[k] for k in ("tensorrt", "cuda", "cpu")]
    chosen = [p for p in wanted if p in available]
    missing = [LABELS[p] for p in wanted[: wanted.index(chosen[0])]]
    note = f"provider: {LABELS[chosen[0]]} ({' and '.join(missing)} not available)" if missing else None
    return chosen, note


def for_package(names: list[str], precision: str, explicit: bool) -> list[str]:
    """int8 and int4 packages are weight-only (MatMulNBits, int8 weights folded at load): TensorRT can
    neither build their MatMulNBits nor calibrate INT8 without activation scales, so they run
    on CUDA or the CPU; asking for TensorRT explicitly is an error."""
    if precision not in WEIGHT_ONLY or names[0] != ORT_NAMES["tensorrt"]:
        return names
    if explicit:
        raise ProviderError(f"{precision} packages are weight-only (MatMulNBits) and TensorRT cannot build them; "
                            "use --provider cuda, or an fp32/fp16 package with TensorRT")
    return names[1:]


def check_session(session: ort.InferenceSession, requested: list[str], explicit: bool, role: str) -> str | None:
    """Did the session of the `role` graph get the first provider asked for? An error if it was
    explicit, a one-line note if `auto` silently fell further back."""
    used = session.get_providers()
    if requested[0] in used:
        return None
    label, fallback = LABELS[requested[0]], LABELS.get(used[0], used[0])
    if explicit:
        raise ProviderError(f"{label} failed to initialise for the {role} graph (onnxruntime fell back to {fallback}); "
                            "python -m runtime.doctor shows why")
    return (f"provider: {label} failed to initialise for the {role} graph; running it on {fallback} "
            "(python -m runtime.doctor shows why)")


def open_session(path: Path, opts: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        # onnxruntime's own fallback prints to stdout (it would corrupt --json) and hides the
        # reason; ours says in one line which provider failed and why.
        return ort.InferenceSession(str(path), opts, providers=providers, enable_fallback=0)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        # "/onnxruntime_src/...cc:729 void f(Args&) Please install ..." -> "Please install ..."
        raise LoadError(path, re.sub(r"^\S+\.cc:\d+ [^)]*\)\s*", "", reason)) from None


def open_sessions(manifest: Manifest, names: list[str], explicit: bool, opts: ort.SessionOptions,
                  max_batch: int) -> tuple[tuple[ort.InferenceSession, ort.InferenceSession], list[str]]:
    """(vision, decoder) sessions on the first provider of `names` that initialises, and a line
    for each provider that failed: an explicit provider that fails is an error; `auto` moves down
    the list. PackageError where even the CPU cannot load a graph."""
    notes = []
    while True:
        if names[0] == ORT_NAMES["tensorrt"] and tensorrt_version() and (build := engine_note(manifest, max_batch)):
            logging.getLogger("edgecap").warning(build)
        try:
            sessions = tuple(open_session(manifest.path(manifest.graph(role)["file"]), opts,
                                          [(n, provider_options(n, manifest, role, max_batch)) for n in names])
                             for role in GRAPHS)
        except LoadError as e:
            if names[0] == ORT_NAMES["cpu"]:
                raise PackageError(f"{e.path}: ONNX Runtime cannot load it: {e.reason}") from None
            failed = LABELS[names[0]]
            if explicit:
                raise ProviderError(f"{failed} failed to initialise: {e.reason}") from None
            notes.append(f"provider: {failed} failed to initialise ({e.reason}); falling back to {LABELS[names[1]]}")
            names = names[1:]
            continue
        # Either session may have fallen back alone: ONNX Runtime places each graph's nodes apart.
        return sessions, [*notes, *(check_session(s, names, explicit, role) for role, s in zip(GRAPHS, sessions))]
