"""The model package contract: `manifest.json` beside the graphs and the tokenizer.

The runtime learns everything from here. A package is refused, with a one-line
reason, before ONNX Runtime reads any graph: wrong format or version, a missing
field, a file that is missing, outside the package or whose SHA-256 differs.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .onnx_graph import ProtoError, graph_facts

FORMAT = "edgecap-model-package"
FORMAT_VERSION = 3  # 2: prompt_ids, HF generation settings, exact-size resize; 3: fixed-capacity KV cache
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "precision", "files", "graphs", "dims", "decoder", "preprocess", "tokenizer",
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
    def digest(self) -> str:
        """SHA-256 of manifest.json, which pins every file of the package by its own hash."""
        return sha256(self.path(MANIFEST))

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

    @property
    def tasks(self) -> dict | None:
        """Florence-2's tasks: {"default": task, "prompts": {task: {"prompt", "parse"}}, "parse":
        the processor's post_processor_config}; a task's prompt, with "{input}" replaced by the
        task's text where it takes one, feeds the vision graph's second input."""
        return self.data.get("tasks")

    @property
    def question(self) -> str | None:
        """Where a question goes: "prompt" (its tokens follow the prompt, as GIT reads one),
        "encoder" (with the tokenizer's special tokens, into the vision graph's second input,
        as BLIP VQA reads one: the model then needs a question), or None (a captioner)."""
        return self.data.get("question", {}).get("input")

    def graph(self, role: str) -> dict:
        return self.data["graphs"][role]


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


# Every field the runtime reads, with its type: checked up front so that a malformed
# manifest is one clear error, not a KeyError deep in session setup.
SCHEMA = {
    # resize: an int sets the shorter side (aspect kept), [h, w] an exact size, as torchvision's Resize.
    # crop_offset: "round" is torchvision's CenterCrop, "floor" transformers' center_crop.
    "preprocess": {"resize": (int, list), "crop": (list, type(None)), "crop_offset": str, "resample": str,
                   "rescale": float, "mean": list, "std": list},
    "tokenizer": {"file": str, "eos_id": int, "clean_up_spaces": bool},
    "generation": {"prompt_ids": list, "max_new_tokens": int, "num_beams": int, "length_penalty": (int, float),
                   "early_stopping": (bool, str), "no_repeat_ngram_size": int},
    "decoder": {"max_positions": int},
}
GRAPHS = ("vision", "decoder")
QUESTION_INPUTS, MEMORY_KINDS = (None, "prompt", "encoder"), ("cross", "prefix")
CHOICES = {("preprocess", "resample"): ("bilinear", "bicubic"), ("preprocess", "crop_offset"): ("round", "floor"),
           ("generation", "early_stopping"): (True, False, "never")}


def has_type(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return bool in kinds if isinstance(value, bool) else isinstance(value, kinds)


def check_question(root: Path, data: dict) -> None:
    """The optional `question` and `decoder.memory` fields, and the vision graph's inputs they imply."""
    question = data.get("question", {"input": None})
    if not isinstance(question, dict) or question.get("input") not in QUESTION_INPUTS:
        raise PackageError(f"{root}: manifest field question.input must be one of {', '.join(QUESTION_INPUTS[1:])}")
    if data["decoder"].get("memory", "cross") not in MEMORY_KINDS:
        raise PackageError(f"{root}: manifest field decoder.memory must be one of {', '.join(MEMORY_KINDS)}")
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        if not has_type(data["generation"].get(key), (int, type(None))):
            raise PackageError(f"{root}: manifest field generation.{key} has the wrong type")
    tasks = data.get("tasks")
    if tasks is not None:
        prompts = tasks["prompts"]
        if question["input"] or tasks["default"] not in prompts or \
                not all(isinstance(p["prompt"], str) and isinstance(p["parse"], str) for p in prompts.values()):
            raise PackageError(f"{root}: manifest field tasks is malformed")
    inputs = 2 if question["input"] == "encoder" or tasks is not None else 1
    if len(data["graphs"]["vision"]["inputs"]) != inputs:
        reads = "tasks" if tasks is not None else f"question.input {question['input']!r}"
        raise PackageError(f"{root}: the vision graph must take {inputs} input(s) for its {reads}")


def check_schema(root: Path, data: dict) -> None:
    for section, keys in SCHEMA.items():
        for key, kind in keys.items():
            value = data[section][key]
            if not has_type(value, kind) or value in ([], ""):
                raise PackageError(f"{root}: manifest field {section}.{key} has the wrong type")
            if (section, key) in CHOICES and value not in CHOICES[section, key]:
                raise PackageError(f"{root}: manifest field {section}.{key} has an unknown value {value!r}")
    if not all(has_type(i, int) for i in data["generation"]["prompt_ids"]):
        raise PackageError(f"{root}: manifest field generation.prompt_ids must list token ids")
    for role in GRAPHS:
        graph = data["graphs"][role]
        if not isinstance(graph["file"], str) or not all(isinstance(i["name"], str) for i in graph["inputs"]):
            raise PackageError(f"{root}: manifest entry for the {role} graph is malformed")
    for name, dim in data["dims"].items():
        if not isinstance(dim["min"], int) or not (dim["max"] is None or isinstance(dim["max"], int)):
            raise PackageError(f"{root}: manifest dims.{name} is malformed")
    symbols = {d for role in GRAPHS for i in data["graphs"][role]["inputs"] for d in i["shape"] if isinstance(d, str)}
    if symbols - set(data["dims"]):
        raise PackageError(f"{root}: manifest dims do not cover {', '.join(sorted(symbols - set(data['dims'])))}")
    for name, meta in data["files"].items():
        if not isinstance(meta["sha256"], str) or not isinstance(meta["bytes"], int):
            raise PackageError(f"{root}: manifest entry for {name} is malformed")
    check_question(root, data)


def check_files(root: Path, data: dict) -> None:
    needed = [data["graphs"][role]["file"] for role in GRAPHS] + [data["tokenizer"]["file"]]
    unlisted = [n for n in needed if n not in data["files"]]
    if unlisted:
        raise PackageError(f"{root}: manifest uses files it does not list: {', '.join(unlisted)}")
    for name, meta in data["files"].items():
        path = package_file(root, name)
        if path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            raise PackageError(f"{root}: {name} does not match its SHA-256 in the manifest (corrupt or tampered)")


def check_graphs(root: Path, data: dict) -> None:
    """What ONNX Runtime would read: declared inputs and external-data files."""
    for role in GRAPHS:
        graph = data["graphs"][role]
        try:
            facts = graph_facts(root / graph["file"])
        except ProtoError as e:
            raise PackageError(f"{root}: {graph['file']} is not a valid ONNX model ({e})") from None
        declared = [i["name"] for i in graph["inputs"]]
        if facts.inputs != declared:
            raise PackageError(f"{root}: {graph['file']} takes inputs {facts.inputs}, the manifest declares {declared}")
        for location in facts.locations:
            if location not in data["files"] or Path(location).name != location:
                raise PackageError(f"{root}: {graph['file']} reads external data from {location!r}, "
                                   "which is not a file of the package")


def load_manifest(root: Path | str) -> Manifest:
    """Read and vet a package: format, schema, every file's SHA-256 (about 35 ms for
    the bundled 33 MB package, so it is done at every load), then the graphs."""
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
                           f"(this runtime reads version {FORMAT_VERSION}); export it again with this version's python -m export")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise PackageError(f"{root}: manifest is missing {', '.join(missing)}")
    try:
        check_schema(root, data)
        check_files(root, data)
    except (KeyError, TypeError, AttributeError) as e:
        raise PackageError(f"{root}: manifest is malformed ({type(e).__name__}: {e})") from None
    check_graphs(root, data)
    return Manifest(root, data)
