"""The model package contract: `manifest.json` beside the graphs and the tokenizer.

The runtime learns everything from here. A package is refused, with a one-line
reason, before ONNX Runtime reads any graph: wrong format or version, a missing
field, a file that is missing, outside the package or whose SHA-256 differs.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "edgecap-model-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "precision", "files", "graphs", "decoder", "preprocess", "tokenizer",
            "generation")


class PackageError(Exception):
    """A model package that cannot be used; the message is one line naming the cause."""


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    @property
    def generation(self) -> dict:
        return self.data["generation"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def max_positions(self) -> int:
        return self.data["decoder"]["max_positions"]

    def graph(self, role: str) -> dict:
        return self.data["graphs"][role]

    def input_names(self, role: str) -> list[str]:
        return [i["name"] for i in self.graph(role)["inputs"]]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_file(root: Path, name: str) -> Path:
    """A file listed by the manifest: a plain name inside the package, no links."""
    path = root / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise PackageError(f"{root}: manifest lists {name!r}, which is not a plain file name in the package")
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"{root}: {name} is missing or not a regular file")
    return path


def load_manifest(root: Path | str, verify: bool = True) -> Manifest:
    root = Path(root)
    try:
        data = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise PackageError(f"{root}: no {MANIFEST}; not a model package") from None
    except (OSError, ValueError) as e:
        raise PackageError(f"{root}: unreadable {MANIFEST}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PackageError(f"{root}: {MANIFEST} is not an {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{root}: manifest format version {data.get('format_version')!r} is not supported "
                           f"(this runtime reads version {FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise PackageError(f"{root}: manifest is missing {', '.join(missing)}")
    listed = set(data["files"])
    needed = [g["file"] for g in data["graphs"].values()] + [data["tokenizer"]["file"]]
    unlisted = [n for n in needed if n not in listed]
    if unlisted:
        raise PackageError(f"{root}: manifest uses files it does not list: {', '.join(unlisted)}")
    for name, meta in data["files"].items():
        path = package_file(root, name)
        if path.stat().st_size != meta["bytes"] or (verify and sha256(path) != meta["sha256"]):
            raise PackageError(f"{root}: {name} does not match its SHA-256 in the manifest (corrupt or tampered)")
    return Manifest(root, data)
