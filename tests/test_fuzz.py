"""Bounded, derandomized fuzzing (hypothesis) of the two trust boundaries: image
decoding + preprocessing, and manifest parsing. Inputs are mutations of a committed
seed corpus (tests/corpus: one tiny file per allowed format) and of the bundled
manifest. Only the documented errors may come out, as one line."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ROOT
from export.preprocess import EFFICIENTNET_LITE0
from runtime import DEFAULT_MODEL, ImageError, PackageError
from runtime.manifest import MANIFEST, load_manifest
from runtime.preprocess import load_pixels

CORPUS = sorted((ROOT / "tests" / "corpus").iterdir())
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                     st.integers(0, 1 << 20), st.integers(0, 255))


def mutate(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, where, byte in mutations:
        i = where % max(len(data), 1)
        if kind == "flip" and data:
            data[i] ^= 1 << (byte % 8)
        elif kind == "set" and data:
            data[i] = byte
        elif kind == "insert":
            data[i:i] = bytes([byte]) * (1 + byte % 16)
        elif kind == "delete":
            del data[i : i + 1 + byte % 16]
        elif kind == "truncate":
            del data[i:]
    return bytes(data)


def test_every_seed_decodes():
    for seed in CORPUS:
        assert load_pixels(seed, EFFICIENTNET_LITE0).shape == (3, 224, 224), seed.name


@FUZZ
@given(seed=st.sampled_from(CORPUS), mutations=st.lists(mutation, min_size=1, max_size=6))
def test_image_decoding_fails_only_with_image_error(tmp_path, seed, mutations):
    path = tmp_path / f"fuzz{seed.suffix}"
    path.write_bytes(mutate(seed.read_bytes(), mutations))
    try:
        pixels = load_pixels(path, EFFICIENTNET_LITE0, max_pixels=4_000_000)
    except ImageError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert pixels.shape == (3, 224, 224) and np.isfinite(pixels).all()


def leaf_paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out = [prefix] if prefix else []
    for key, value in items:
        out += leaf_paths(value, prefix + (key,))
    return out


MANIFEST_DATA = json.loads((DEFAULT_MODEL / MANIFEST).read_text())
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=6)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    return shutil.copytree(DEFAULT_MODEL, tmp_path_factory.mktemp("fuzz") / "pkg")


@settings(FUZZ, max_examples=150)
@given(path=st.sampled_from(leaf_paths(MANIFEST_DATA)), value=json_values, delete=st.booleans())
def test_manifest_fails_only_with_package_error(package_copy, path, value, delete):
    data = json.loads(json.dumps(MANIFEST_DATA))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    (package_copy / MANIFEST).write_text(json.dumps(data))
    try:
        load_manifest(package_copy)
    except PackageError as e:
        assert "\n" not in str(e)
