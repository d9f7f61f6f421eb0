"""What the machine's CUDA and TensorRT libraries say about themselves, read with ctypes
(no CUDA Python packages needed). Every function answers None where a library or a GPU
is missing, so the same code runs on a CPU-only box. Answers are cached: they cannot
change within a process."""

import ctypes
import glob
import site
from functools import cache

# File names as the dynamic loader takes them (it searches LD_LIBRARY_PATH, the ldconfig cache
# and the default folders), newest first; pip's nvidia-* and tensorrt wheels keep theirs in
# site-packages, where the loader does not look.
CUDART = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
NVINFER = ("libnvinfer.so", "libnvinfer.so.10", "libnvinfer.so.8")
CUDNN = ("libcudnn.so", "libcudnn.so.9", "libcudnn.so.8")


def wheel_library_dirs() -> list[str]:
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return sorted(d for root in roots for d in (*glob.glob(f"{root}/nvidia/*/lib"), *glob.glob(f"{root}/tensorrt_libs")))


def _load(names: tuple[str, ...]):
    folders = wheel_library_dirs()
    for name in names:
        for path in (name, *(f"{folder}/{name}" for folder in folders)):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def cuda_runtime():
    return _load(CUDART)


@cache
def tensorrt_version() -> str | None:
    lib = _load(NVINFER)
    if lib is None:
        return None
    v = lib.getInferLibVersion()  # major*1000 + minor*100 + patch (TensorRT 8/9); 10: major*10000 + ...
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 100000 else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


@cache
def cudnn_version() -> str | None:
    lib = _load(CUDNN)
    return None if lib is None else str(lib.cudnnGetVersion())


@cache
def gpu() -> dict | None:
    """{"name", "compute_capability", "cuda_runtime"} of device 0, or None."""
    lib = cuda_runtime()
    if lib is None:
        return None
    count, major, minor, runtime = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    lib.cudaRuntimeGetVersion(ctypes.byref(runtime))
    props = ctypes.create_string_buffer(4096)  # cudaDeviceProp starts with char name[256]
    name = props.raw[:256].split(b"\0")[0].decode() if lib.cudaGetDeviceProperties(props, 0) == 0 else "unknown"
    return {"name": name, "compute_capability": f"{major.value}.{minor.value}",
            "cuda_runtime": f"{runtime.value // 1000}.{runtime.value % 1000 // 10}"}
