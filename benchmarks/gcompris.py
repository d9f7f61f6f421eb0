"""python -m benchmarks.gcompris DEB OUT: the photos of Debian's gcompris-qt-data (`apt-get download
gcompris-qt-data`), out of its Qt resource files, as JPEG copies 400 px on their long side.

GCompris ships Wikimedia Commons photographs (public domain, CC0, CC-BY-SA; each resource folder's
README names author, licence and source) inside .rcc files. The caption table's batches
(benchmarks/photos/SOURCES.md) were taken from them; the photos it holds are left out, so what this
writes is free for other uses (`python -m export distill`'s training photos) without ever touching
the table's. Only photographs are kept: WebP and JPEG files of 20 KB or more (GCompris's drawings
are SVG or small PNG).
"""

import argparse
import io
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from PIL import Image

SOURCES = Path(__file__).parent / "photos" / "SOURCES.md"
RCC_DIR = "usr/share/gcompris-qt/rcc"
MIN_BYTES = 20_000


def rcc_files(data: bytes):
    """(path, bytes) of every file in a Qt resource file (format versions 1-3, zlib or uncompressed)."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, blobs, names = struct.unpack(">IIII", data[4:20])
    entry = 22 if version >= 2 else 14

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        return data[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        node, prefix = stack.pop()
        at = tree + node * entry
        name_offset, flags = struct.unpack(">IH", data[at : at + 6])
        path = f"{prefix}/{name(name_offset)}" if node else ""
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack(">II", data[at + 6 : at + 14])
            stack += [(child, path) for child in range(first, first + count)]
            continue
        (offset,) = struct.unpack(">I", data[at + 10 : at + 14])
        (size,) = struct.unpack(">I", data[blobs + offset : blobs + offset + 4])
        blob = data[blobs + offset + 4 : blobs + offset + 4 + size]
        if flags & 4:
            continue  # zstd-compressed: GCompris's photos are stored plainly
        yield path.lstrip("/"), zlib.decompress(blob[4:]) if flags & 1 else blob


def in_table() -> set[str]:
    """'<rcc>: <path>' of every GCompris photo the caption table holds."""
    return set(re.findall(r"rcc/(\S+\.rcc: \S+)", SOURCES.read_text()))


def extract(deb: Path, out: Path) -> int:
    taken, written = in_table(), 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        for rcc in sorted((Path(tmp) / RCC_DIR).glob("*.rcc")):
            for path, blob in rcc_files(rcc.read_bytes()):
                photo = Path(path).suffix in (".webp", ".jpg") and len(blob) >= MIN_BYTES
                if not photo or f"{rcc.name}: {path}" in taken:
                    continue
                image = Image.open(io.BytesIO(blob)).convert("RGB")
                image.thumbnail((400, 400), Image.LANCZOS)
                image.save(out / f"{rcc.stem}-{Path(path).stem}.jpg", quality=90)
                written += 1
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gcompris", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deb", type=Path, help="gcompris-qt-data_*.deb")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        print(f"{extract(args.deb, args.out)} photos -> {args.out}")
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
