"""Bad and unusual inputs, through the Python API and the CLI: each image either
captions correctly or fails with one line naming the file; the batch goes on."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from runtime import DEFAULT_MODEL, Captioner, ImageError


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header claiming a huge image, with a few bytes of data: a decompression bomb
    must be refused from the header alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def cases(photo_paths, tmp_path_factory):
    """name -> (path, expected error fragment, or None for "captions")."""
    d = tmp_path_factory.mktemp("cases")
    cat = Image.open(photo_paths["chelsea"])
    out = {}

    def write(name, data, error):
        (d / name).write_bytes(data)
        out[name] = (d / name, error)

    def save(name, image, error=None, **kw):
        image.save(d / name, **kw)
        out[name] = (d / name, error)

    jpeg, png = photo_paths["chelsea"].read_bytes(), (d / "full.png")
    cat.save(png)
    write("zero.jpg", b"", "not an image")
    write("truncated.jpg", jpeg[: len(jpeg) // 3], "cannot decode")
    write("truncated.png", png.read_bytes()[:5000], "cannot decode")
    png.unlink()
    write("text.jpg", b"just some text, not a JPEG\n", "not an image")
    write("doc.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n", "not an image")
    write("drawing.svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "not an image")
    write("bomb.png", png_declaring(30000, 30000), "pixels")
    write("big-header.png", png_declaring(9000, 5000), "over the limit of 40000000")
    out["missing.jpg"] = (d / "missing.jpg", "no such file")
    save("cmyk.jpg", cat.convert("CMYK"))
    save("gray.png", cat.convert("L"))
    save("palette-transparent.png", cat.convert("P"), transparency=0)
    save("rgba.png", cat.convert("RGBA"))
    save("tiny.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save("strip.png", Image.new("RGB", (10000, 10), (0, 0, 0)), "aspect ratio")
    sixteen = (np.asarray(cat.convert("L")).astype(np.uint16) * 257)
    save("gray16.png", Image.fromarray(sixteen))
    frames = [cat, cat.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    return out


def test_every_case_through_the_api(captioner, cases):
    paths = [p for p, _ in cases.values()]
    results = captioner.caption(paths)
    for (name, (path, error)), result in zip(cases.items(), results, strict=True):
        assert result.image == str(path)
        if error is None:
            assert result.error is None and result.text, name
        else:
            assert result.text is None and error in result.error, (name, result.error)
            assert str(path) in result.error and "\n" not in result.error


def test_every_case_through_the_cli(cases):
    paths = [str(p) for p, _ in cases.values()]
    r = subprocess.run([sys.executable, "-m", "runtime.caption", *paths, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["image"] for rec in records] == paths
    for (name, (_, error)), rec in zip(cases.items(), records, strict=True):
        assert ("error" in rec) == (error is not None), (name, rec)


def test_parity_over_every_case_reports_bad_files_in_one_line_each(cases):
    """The parity tool skips what cannot be decoded (one line each) and measures the rest."""
    paths = [str(p) for p, _ in cases.values()]
    r = subprocess.run([sys.executable, "-m", "benchmarks.parity", "--model", str(DEFAULT_MODEL), *paths, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    bad = [name for name, (_, error) in cases.items() if error is not None]
    assert len(r.stderr.strip().splitlines()) == len(bad)
    result = json.loads(r.stdout)
    assert result["images"] == len(cases) - len(bad) and result["exact_caption_match"] == 1.0


@pytest.mark.parametrize("model", ["missing.jpg", "zero.jpg", "doc.pdf"])
def test_doctor_on_a_file_that_is_no_package(cases, model):
    r = subprocess.run([sys.executable, "-m", "runtime.doctor", "--model", str(cases[model][0])],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr and "problem: " in r.stdout


def test_modes_caption_like_their_source(captioner, cases, photo_paths):
    """Lossless re-encodings must give the very same tokens as the 8-bit RGB original."""
    gray = captioner.caption(cases["gray.png"][0]).tokens
    assert captioner.caption(cases["gray16.png"][0]).tokens == gray
    png_rgb = Image.open(photo_paths["chelsea"])
    assert captioner.caption(cases["rgba.png"][0]).tokens == captioner.caption(png_rgb).tokens
    first_frame = Image.open(cases["animated.gif"][0]).convert("RGB")
    assert captioner.caption(cases["animated.gif"][0]).tokens == captioner.caption(first_frame).tokens


def test_exif_rotated_captions_like_upright(captioner, photo_paths, tmp_path):
    upright = Image.open(photo_paths["coffee"])
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated 90 CW: "rotate 90 CCW to view"... applied by exif_transpose
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_270).save(path, exif=exif)
    assert captioner.caption(path).tokens == captioner.caption(upright).tokens


def test_pixel_limit_is_a_setting(captioner, photo_paths):
    small = Captioner(captioner.manifest.root, provider="cpu", max_pixels=10_000)
    with pytest.raises(ImageError, match=r"451x300 is 135300 pixels, over the limit of 10000"):
        small.caption(photo_paths["chelsea"])


def test_unreadable_file_as_a_normal_user(photo_paths):
    """Root reads everything, so the check drops to `nobody` after loading the model."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    folder = Path(tempfile.mkdtemp(prefix="edgecap-perm-"))
    folder.chmod(0o755)
    secret, good = folder / "secret.jpg", folder / "good.jpg"
    good.write_bytes(photo_paths["chelsea"].read_bytes())
    secret.write_bytes(photo_paths["coffee"].read_bytes())
    secret.chmod(0o000)
    package = shutil.copytree(DEFAULT_MODEL, folder / "pkg")  # readable by `nobody`, unlike some checkouts
    # This interpreter's stdlib may live where `nobody` cannot read: import what the CLI imports lazily first.
    code = f"""
import argparse, json, os, shutil, sys
from runtime import Captioner
from runtime.caption import main
cap = Captioner(provider="cpu")
os.setgid(65534); os.setuid(65534)
api = cap.caption([{str(secret)!r}, {str(good)!r}])
print(json.dumps([c.error for c in api]))
sys.exit(main([{str(secret)!r}, {str(good)!r}, "--json", "--model", {str(package)!r}]))
"""
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        shutil.rmtree(folder)
    lines = r.stdout.splitlines()
    assert r.returncode == 1 and len(lines) == 3, r.stderr
    assert json.loads(lines[0]) == [f"{secret}: permission denied", None]
    assert json.loads(lines[1])["error"] == f"{secret}: permission denied"
    assert "cat" in json.loads(lines[2])["caption"]


def test_threads_share_one_captioner(captioner, image_paths, tmp_path):
    """4 threads x 50 images on one Captioner give exactly the single-threaded captions."""
    rng = np.random.default_rng(7)
    images = [str(p) for p in image_paths]
    for i in range(50 - len(images)):
        path = tmp_path / f"gen{i}.png"
        Image.fromarray(rng.integers(0, 256, (rng.integers(40, 300), rng.integers(40, 300), 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    want = [c.tokens for c in (captioner.caption(i) for i in images)]

    def worker(offset):
        order = images[offset:] + images[:offset]
        return [captioner.caption(i).tokens for i in order], order

    with ThreadPoolExecutor(4) as pool:
        for tokens, order in pool.map(worker, [0, 12, 25, 37]):
            assert tokens == [want[images.index(i)] for i in order]
