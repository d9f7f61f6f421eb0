"""python -m runtime.doctor [--model PKG] [--json]: the first thing to run when a device
misbehaves. Versions, providers, CUDA/cuDNN/TensorRT libraries, the GPU, the model
package and its checks, and the provider `auto` picks and why. Exit 1 if the package
cannot be used."""

import argparse
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import onnxruntime as ort

from . import providers as prov
from .engine import Captioner
from .gpu import cudnn_version, gpu, tensorrt_version
from .manifest import GRAPHS, PackageError
from .onnx_graph import graph_facts, tensorrt_problems


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def report(model) -> tuple[dict, list[str]]:
    """(facts, problems)."""
    dists = {d: installed(d) for d in ("edgecap", "onnxruntime", "onnxruntime-gpu")}
    facts = {
        "edgecap": dists["edgecap"] or "not installed (running from a checkout)",
        "python": f"{platform.python_version()} on {platform.machine()} {platform.system()}",
        "onnxruntime": f"{ort.__version__} ({', '.join(d for d in ('onnxruntime', 'onnxruntime-gpu') if dists[d])})",
        "providers_available": [prov.LABELS.get(p, p) for p in ort.get_available_providers()],
        "tensorrt": tensorrt_version() or "not found",
        "cudnn": cudnn_version() or "not found",
        "gpu": gpu() or "none found",
    }
    problems = []
    if dists["onnxruntime"] and dists["onnxruntime-gpu"]:
        problems.append("onnxruntime and onnxruntime-gpu are both installed and share one module: "
                        "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu")
    try:
        cap = Captioner(model, provider="auto")
    except (PackageError, prov.ProviderError) as e:
        return facts | {"model": str(model)}, problems + [str(e)]
    m = cap.manifest
    hygiene = {role: tensorrt_problems(graph_facts(m.path(m.graph(role)["file"]))) for role in GRAPHS}
    facts["model"] = {
        "path": str(m.root), "name": m.data.get("name"), "precision": m.data["precision"],
        "mib": round(sum(f["bytes"] for f in m.data["files"].values()) / 2**20, 1),
        "checks": "manifest, SHA-256 of every file, graph inputs, outputs and external data: ok",
        "tensorrt_ready": ", ".join(f"{role} {'; '.join(p) or 'ok'}" for role, p in hygiene.items()),
    }
    facts["auto_provider"] = cap.provider
    facts["auto_notes"] = cap.info + cap.notes
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        facts["tensorrt_cache"] = str(prov.cache_dir(m, cap.max_batch) or "none: the TensorRT version or the GPU "
                                                                              "cannot be read")
        # A problem only where TensorRT could run it (the CPU default, INT8, is not for TensorRT).
        problems += [f"{role} graph: {p}" for role, ps in hygiene.items() for p in ps]
    return facts, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.doctor", description=__doc__)
    parser.add_argument("--model", default=None, help="model package folder (default: the bundled model, as "
                        "runtime.caption picks it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    facts, problems = report(args.model)
    if args.json:
        print(json.dumps({**facts, "problems": problems}, indent=2))
    else:
        for key, value in facts.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "; ".join(value) or "-"
            print(f"{key.replace('_', ' ')}: {value}")
        for problem in problems:
            print(f"problem: {problem}")
    return 0 if "auto_provider" in facts else 1


if __name__ == "__main__":
    sys.exit(main())
