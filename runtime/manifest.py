"""The model package contract: `manifest.json` beside the graphs and the tokenizer.

The runtime learns everything from here. A package is refused, with a one-line
reason, before ONNX Runtime reads any graph: wrong format or version, a missing
field, a file that is missing, outside the package or whose SHA-256 differs.
"""

import hashlib
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .answers import PARSERS
from .onnx_graph import ProtoError, graph_facts

FORMAT = "edgecap-model-package"
# 2: prompt_ids, HF generation settings, exact-size resize; 3: fixed-capacity KV cache; 4: per-layer caches
# written in place (TensorScatter), graph inputs and outputs bound by role name, kv_heads, name required
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
WEIGHT_ONLY = ("int8", "int4")  # precisions whose weights alone are quantized, activations FP32 (export.quantize)
REQUIRED = ("format", "format_version", "name", "precision", "files", "graphs", "dims", "decoder", "preprocess",
            "tokenizer", "generation")


class PackageError(Exception):
    """A model package that cannot be used; the message is one line naming the cause."""


@dataclass(frozen=True)
class Decoder:
    """The decoder step as the runtime drives it: its cache is `layers` x (batch, kv_heads, capacity,
    head_dim), keys and values; `memory` is how it reads the vision graph's output: "cross"
    (cross-attention keys and values per layer, fed every step), "prefix" (keys and values per
    layer that fill the cache's first slots: GIT's image tokens) or "embeddings" (image features
    that take the place of the prompt's `image_token` placeholders: the LLM-based families)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    memory: str
    image_token: int | None = None
    # "1d": one position per token; "mrope": Qwen2-VL's 3-D rotary positions, which the step
    # computes from the 1-D ones and an `image_grid` input (runtime.search.image_grid)
    rope: str = "1d"


def memory_roles(decoder: Decoder) -> list[str]:
    """The vision graph's outputs: what the decoder step reads (cross, embeddings) or its cache
    starts with (prefix)."""
    if decoder.memory == "embeddings":
        return ["image_features"]
    return [f"{decoder.memory}_{kv}.{i}" for kv in ("key", "value") for i in range(decoder.layers)]


def roles(decoder: Decoder, text_input: bool) -> dict[str, tuple[list[str], list[str]]]:
    """(inputs, outputs) of each graph by role name: the runtime binds them by these names."""
    cache = [f"past_{kv}.{i}" for kv in ("key", "value") for i in range(decoder.layers)]
    memory = {"cross": memory_roles(decoder), "prefix": [],
              "embeddings": ["image_features", "feature_index", *(["image_grid"] if decoder.rope == "mrope" else [])]}
    return {"vision": (["pixel_values", *(["text_ids"] if text_input else [])], memory_roles(decoder)),
            "decoder": (["input_ids", "position_ids", "cache_lengths", "logit_index", *cache, *memory[decoder.memory]],
                        ["logits", *(name.replace("past_", "present_") for name in cache)])}


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
    def decoder(self) -> Decoder:
        return Decoder(**self.data["decoder"])

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
    def chat(self) -> dict | None:
        """A chat model's prompting (runtime.prompting): {"template", "question", "image": layout}."""
        return self.data.get("chat")

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a sequence (the first also fills finished rows)."""
        return self.tokenizer.get("eos_ids", [self.tokenizer["eos_id"]])

    @property
    def question(self) -> str | None:
        """Where a question goes: "prompt" (its tokens follow the prompt, as GIT reads one),
        "encoder" (with the tokenizer's special tokens, into the vision graph's second input,
        as BLIP VQA reads one: the model then needs a question), or None (a captioner)."""
        return self.data.get("question", {}).get("input")

    @property
    def text_inputs(self) -> dict[str, bool]:
        """The text a request may send beside its image, each with whether it is required: a chat
        model's question, Florence-2's task and its text, a VQA model's question (required where it
        feeds the vision graph, as BLIP VQA's does), none for a captioner. The service and the
        batch job take these."""
        if self.chat is not None:
            return {"question": False}
        if self.tasks is not None:
            return {"task": False, "text": False}
        return {} if self.question is None else {"question": self.question == "encoder"}

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
    # kind "fixed" (the default): one picture of a fixed size. resize: an int sets the shorter side
    # (aspect kept), [h, w] an exact size, as torchvision's Resize. crop_offset: "round" is
    # torchvision's CenterCrop, "floor" transformers' center_crop. Kind "tiles": PREPROCESS_TILES.
    "preprocess": {"resize": (int, list), "crop": (list, type(None)), "crop_offset": str, "resample": str,
                   "rescale": float, "mean": list, "std": list},
    "tokenizer": {"file": str, "eos_id": int, "clean_up_spaces": bool},
    "generation": {"prompt_ids": list, "max_new_tokens": int, "num_beams": int, "length_penalty": (int, float),
                   "early_stopping": (bool, str), "no_repeat_ngram_size": int},
    "decoder": {"layers": int, "heads": int, "kv_heads": int, "head_dim": int, "vocab_size": int, "max_positions": int,
                "memory": str},
}
# SmolVLM's tiles (runtime.preprocess.to_tiles): the longest edge resized to `longest_edge`, then
# (`split`) cut into tiles of `tile` pixels plus the whole image as one more tile.
PREPROCESS_TILES = {"longest_edge": int, "tile": int, "split": bool, "resample": str, "rescale": float, "mean": list,
                    "std": list}
# Qwen2-VL's smart_resize (runtime.preprocess.to_grid): sides multiples of `factor`, the area between
# min_pixels and max_pixels; one feature per factor x factor pixels.
PREPROCESS_GRID = {"factor": int, "min_pixels": int, "max_pixels": int, "resample": str, "rescale": float, "mean": list,
                   "std": list}
PREPROCESS = {"fixed": SCHEMA["preprocess"], "tiles": PREPROCESS_TILES, "grid": PREPROCESS_GRID}
# A chat model's prompt (runtime.prompting): its chat template, the question asked when none is
# given, and how one image is laid out ("tiles": SmolVLM's).
CHAT = {"template": str, "question": str, "image": dict}
# "tiles": SmolVLM's (runtime.prompting.tile_layout); "repeat": the LLaVA layout, `tokens` image tokens;
# "grid": one image token per feature of the image's grid (Qwen2-VL's).
CHAT_IMAGE = {"tiles": {"layout": str, "tokens": int, "image": str, "around": str, "global": str},
              "repeat": {"layout": str, "tokens": int, "image": str}, "grid": {"layout": str, "image": str}}
GRAPHS = ("vision", "decoder")
QUESTION_INPUTS, MEMORY_KINDS = (None, "prompt", "encoder"), ("cross", "prefix", "embeddings")
CHOICES = {("preprocess", "resample"): ("bilinear", "bicubic", "lanczos"), ("preprocess", "crop_offset"): ("round", "floor"),
           ("generation", "early_stopping"): (True, False, "never"), ("chat.image", "layout"): tuple(CHAT_IMAGE)}
ROPES = ("1d", "mrope")


def has_type(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return bool in kinds if isinstance(value, bool) else isinstance(value, kinds)


def check_question(root: Path, data: dict) -> None:
    """The optional `question` and `decoder.memory` fields, and the vision graph's inputs they imply."""
    question = data.get("question", {"input": None})
    if not isinstance(question, dict) or question.get("input") not in QUESTION_INPUTS:
        raise PackageError(f"{root}: manifest field question.input must be one of {', '.join(QUESTION_INPUTS[1:])}")
    if data["decoder"]["memory"] not in MEMORY_KINDS:
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
        unknown = sorted({p["parse"] for p in prompts.values()} - set(PARSERS))
        if unknown:
            raise PackageError(f"{root}: this runtime cannot parse answers of kind {', '.join(unknown)} "
                               f"(it knows {', '.join(PARSERS)}): update edgecap")
    if (data.get("chat") is not None) != (data["decoder"]["memory"] == "embeddings") or \
            (data["preprocess"].get("kind") in ("tiles", "grid") and data.get("chat") is None):
        raise PackageError(f"{root}: manifest fields chat, preprocess.kind and decoder.memory do not fit together")
    decoder = data["decoder"]
    required = {f.name for f in fields(Decoder) if f.default is MISSING}
    if not required <= set(decoder) <= {f.name for f in fields(Decoder)} or decoder["heads"] % decoder["kv_heads"] \
            or (decoder["memory"] == "embeddings") != has_type(decoder.get("image_token"), int) \
            or decoder.get("rope", "1d") not in ROPES or (decoder.get("rope") == "mrope" and decoder["memory"] != "embeddings"):
        raise PackageError(f"{root}: manifest field decoder is malformed")
    expected = roles(Decoder(**decoder), question["input"] == "encoder" or tasks is not None)
    for role, (inputs, outputs) in expected.items():
        graph = data["graphs"][role]
        declared = [i["name"] for i in graph["inputs"]], [o["name"] for o in graph["outputs"]]
        for kind, want, got in (("inputs", inputs, declared[0]), ("outputs", outputs, declared[1])):
            if sorted(got) != sorted(want):
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                raise PackageError(f"{root}: the {role} graph's {kind} do not fit this package "
                                   f"(missing {', '.join(missing[:4]) or 'none'}; unexpected {', '.join(extra[:4]) or 'none'})")


def check_fields(root: Path, section: str, values: dict, schema: dict, empty: tuple = ()) -> None:
    """Every field of `schema` in `values`, of its type, not empty unless named in `empty`."""
    for key, kind in schema.items():
        value = values[key]
        if not has_type(value, kind) or (value in ([], "") and key not in empty):
            raise PackageError(f"{root}: manifest field {section}.{key} has the wrong type")
        if (section, key) in CHOICES and value not in CHOICES[section, key]:
            raise PackageError(f"{root}: manifest field {section}.{key} has an unknown value {value!r}")


def check_schema(root: Path, data: dict) -> None:
    chat = data.get("chat")
    kind = data["preprocess"].get("kind", "fixed")
    if kind not in PREPROCESS:
        raise PackageError(f"{root}: manifest field preprocess.kind has an unknown value {kind!r}")
    for section, schema in SCHEMA.items():
        schema = PREPROCESS[kind] if section == "preprocess" else schema
        # A chat model's prompt is built per request (runtime.prompting): it has no fixed prompt ids.
        check_fields(root, section, data[section], schema, ("prompt_ids",) if chat is not None else ())
    if chat is not None:
        check_fields(root, "chat", chat, CHAT)
        check_fields(root, "chat.image", chat["image"], {"layout": str})
        check_fields(root, "chat.image", chat["image"], CHAT_IMAGE[chat["image"]["layout"]])
    if not all(has_type(i, int) for i in data["generation"]["prompt_ids"]):
        raise PackageError(f"{root}: manifest field generation.prompt_ids must list token ids")
    if not all(has_type(i, int) for i in data["tokenizer"].get("eos_ids", [0])):
        raise PackageError(f"{root}: manifest field tokenizer.eos_ids must list token ids")
    for role in GRAPHS:
        graph = data["graphs"][role]
        if not isinstance(graph["file"], str) or not all(isinstance(i["name"], str) for i in graph["inputs"] + graph["outputs"]):
            raise PackageError(f"{root}: manifest entry for the {role} graph is malformed")
    for name, dim in data["dims"].items():
        if not all(has_type(dim[k], int) for k in ("min", "opt")) or not (dim["max"] is None or has_type(dim["max"], int)):
            raise PackageError(f"{root}: manifest dims.{name} is malformed")
    symbols = {d for role in GRAPHS for i in data["graphs"][role]["inputs"] for d in i["shape"] if isinstance(d, str)}
    if not isinstance(data["name"], str) or not data["name"]:
        raise PackageError(f"{root}: manifest field name must be a non-empty string")
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
    """What ONNX Runtime would read: declared inputs and outputs, and external-data files."""
    for role in GRAPHS:
        graph = data["graphs"][role]
        try:
            facts = graph_facts(root / graph["file"])
        except ProtoError as e:
            raise PackageError(f"{root}: {graph['file']} is not a valid ONNX model ({e})") from None
        for kind, found in (("inputs", facts.inputs), ("outputs", facts.outputs)):
            declared = [i["name"] for i in graph[kind]]
            if found != declared:
                shown = found if len(found) < 8 else [*found[:6], "..."]
                raise PackageError(f"{root}: {graph['file']} has {kind} {shown}, not the ones the manifest declares")
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
