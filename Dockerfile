# Runtime-only image (no torch): ONNX Runtime with CUDA/TensorRT, the bundled model, the serve
# and video extras; entrypoint `python -m runtime.caption`, or `python -m runtime.serve` (below). The base image is a build argument:
#
#   Jetson (JetPack 6, L4T r36: CUDA, cuDNN and TensorRT come with JetPack; onnxruntime-gpu
#   from NVIDIA's Jetson wheel index, whose releases differ from PyPI's):
#     docker build -t edgecap:jetson \
#       --build-arg BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 \
#       --build-arg ORT_INDEX_URL=https://pypi.jetson-ai-lab.io/jp6/cu126 \
#       --build-arg ORT_VERSION= --build-arg TENSORRT_LIBS= .
#   x86_64 with an NVIDIA GPU (the defaults): CUDA 12.6 + cuDNN 9 base, onnxruntime-gpu 1.23.2
#   (a CUDA 12 build: releases after 1.26 are CUDA 13 builds) and TensorRT 10 from PyPI, the
#   combination its wheel asks for (deploy/onnxruntime-gpu-1.23.2.wheel.txt; a test checks it):
#     docker build -t edgecap:cuda .
#
# Run (engines are cached in the /cache volume, keyed by model, onnxruntime, TensorRT and GPU):
#     docker run --rm --runtime nvidia -v edgecap-cache:/cache -v "$PWD/photos:/photos:ro" edgecap:jetson /photos
# Serve (the caption service, README "Caption service"; beyond loopback, always with a key):
#     docker run -d --runtime nvidia -v edgecap-cache:/cache -p 127.0.0.1:8000:8000 -e EDGECAP_API_KEY=... \
#       --entrypoint python edgecap:jetson -m runtime.serve --host 0.0.0.0
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG ORT_INDEX_URL=
ARG ORT_VERSION=1.23.2
ARG TENSORRT_LIBS=tensorrt-cu12-libs==10.13.3.9

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDGECAP_CACHE_DIR=/cache \
    PATH=/opt/edgecap/bin:$PATH \
    LD_LIBRARY_PATH=/opt/edgecap/lib/python3.12/site-packages/tensorrt_libs

# The two bases are different Ubuntu releases: pinning apt versions would tie the file to one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/edgecap

WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime ./runtime

# The base install pulls the CPU onnxruntime; onnxruntime-gpu provides the same module,
# so the CPU wheel is removed and the GPU one (re)installed over it. TensorRT's libraries
# (libnvinfer.so.10, libnvonnxparser.so.10) come from PyPI's tensorrt-cu12-libs on x86; the
# loader finds them through LD_LIBRARY_PATH (Python 3.12 is Ubuntu 24.04's).
# hadolint ignore=DL3013
RUN pip install ${ORT_INDEX_URL:+--extra-index-url "$ORT_INDEX_URL"} ".[serve,video]" \
 && pip uninstall -y onnxruntime \
 && pip install ${ORT_INDEX_URL:+--extra-index-url "$ORT_INDEX_URL"} --force-reinstall --no-deps \
        "onnxruntime-gpu${ORT_VERSION:+==$ORT_VERSION}" \
 && if [ -n "$TENSORRT_LIBS" ]; then pip install "$TENSORRT_LIBS"; fi \
 && rm -rf /src

RUN useradd --create-home --uid 10001 edgecap \
 && mkdir -p /cache \
 && chown edgecap /cache
USER 10001
WORKDIR /home/edgecap
VOLUME ["/cache"]

EXPOSE 8000
# For the service; a one-shot caption run ends before the first check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "runtime.caption"]
CMD ["--help"]
