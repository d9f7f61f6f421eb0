# Runtime-only image (no torch): ONNX Runtime with CUDA/TensorRT, the bundled model,
# entrypoint `python -m runtime.caption`. The base image is a build argument:
#
#   Jetson (JetPack 6, L4T r36; onnxruntime-gpu from NVIDIA's Jetson wheel index):
#     docker build -t edgecap:jetson \
#       --build-arg BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 \
#       --build-arg ORT_INDEX_URL=https://pypi.jetson-ai-lab.io/jp6/cu126 .
#   x86_64 with an NVIDIA GPU (CUDA 12 + cuDNN 9 runtime; onnxruntime-gpu from PyPI):
#     docker build -t edgecap:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 .
#
# Run (engines are cached in the /cache volume, keyed by model, onnxruntime, TensorRT and GPU):
#     docker run --rm --runtime nvidia -v edgecap-cache:/cache -v "$PWD/photos:/photos:ro" edgecap:jetson /photos
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG ORT_INDEX_URL=
ARG ORT_VERSION=

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDGECAP_CACHE_DIR=/cache \
    PATH=/opt/edgecap/bin:$PATH

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
# so the CPU wheel is removed and the GPU one (re)installed over it. Which onnxruntime-gpu
# releases exist depends on the index (PyPI or NVIDIA's Jetson one): pin with ORT_VERSION.
# hadolint ignore=DL3013
RUN pip install ${ORT_INDEX_URL:+--extra-index-url "$ORT_INDEX_URL"} . \
 && pip uninstall -y onnxruntime \
 && pip install ${ORT_INDEX_URL:+--extra-index-url "$ORT_INDEX_URL"} --force-reinstall --no-deps \
        "onnxruntime-gpu${ORT_VERSION:+==$ORT_VERSION}" \
 && rm -rf /src

RUN useradd --create-home --uid 10001 edgecap \
 && mkdir -p /cache \
 && chown edgecap /cache
USER 10001
WORKDIR /home/edgecap
VOLUME ["/cache"]

ENTRYPOINT ["python", "-m", "runtime.caption"]
CMD ["--help"]
