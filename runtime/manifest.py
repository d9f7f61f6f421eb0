"""The model package contract: `manifest.json` beside the graphs and the tokenizer.

The runtime learns everything from here, and this module alone defines the format: each section
the runtime reads is a dataclass below, which export builds and writes (dataclasses.asdict) and
load_manifest reads back, field by field, of the declared types. A package is refused, with a
one-line reason, before ONNX Runtime reads any graph: wrong format or version, a missing,
unknown or mistyped field, a file that is missing, outside the package or whose SHA-256 differs.
"""

import hashlib
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import UnionType
from typing import get_args, get_origin, get_type_hints

from .answers import PARSERS
from .onnx_graph import ProtoError, graph_facts

FORMAT = "edgecap-model-package"
# 2: prompt_ids, HF generation settings, exact-size resize; 3: fixed-capacity KV cache; 4: per-layer caches
# written in place (TensorScatter), graph inputs and outputs bound by role name, kv_heads, name required;
# 5: one `prompting` section (where asked text goes, the prompt prefix, tasks, chat) and typed sections
# (tokenizer.eos_ids alone, no unread fields)
FORMAT_VERSION = 5
MANIFEST = "manifest.json"
WEIGHT_ONLY = ("int8", "int4")  # precisions whose weights alone are quantized, activations FP32 (export.quantize)
REQUIRED = ("format", "format_version", "name", "precision", "files", "graphs", "dims", "decoder", "preprocess",
            "tokenizer", "generation", "prompting")
GRAPHS = ("vision", "decoder")
MEMORY_KINDS, ROPES, ATTENTIONS = ("cross", "prefix", "embeddings"), ("1d", "mrope"), ("onnx", "grouped")
PROMPT_INPUTS = ("none", "prompt", "encoder", "task", "chat")


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
    # "onnx": attention in standard ONNX ops; "grouped": ONNX Runtime's GroupQueryAttention (one
    # node per layer), which takes several tokens over a written cache one row at a time
    # (runtime.graphs.Graphs.step runs such a step row by row)
    attention: str = "onnx"

    def __post_init__(self):
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"manifest field decoder.memory must be one of {', '.join(MEMORY_KINDS)}")
        if self.rope not in ROPES or (self.rope == "mrope" and self.memory != "embeddings"):
            raise ValueError(f"manifest field decoder.rope must be one of {', '.join(ROPES)} (mrope with embeddings memory)")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"manifest field decoder.attention must be one of {', '.join(ATTENTIONS)}")
        if min(self.layers, self.heads, self.kv_heads, self.head_dim, self.vocab_size, self.max_positions) < 1 \
                or self.heads % self.kv_heads or (self.memory == "embeddings") != (self.image_token is not None):
            raise ValueError("manifest field decoder is malformed")


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer file and how its ids become text: `eos_ids` end a sequence (the first also
    fills finished rows); `clean_up_spaces` is transformers' clean_up_tokenization; special tokens
    are dropped unless `skip_special_tokens` is false (Florence-2's answers keep its location tokens)."""

    file: str
    eos_ids: list[int]
    clean_up_spaces: bool
    skip_special_tokens: bool = True

    def __post_init__(self):
        if not self.file or not self.eos_ids:
            raise ValueError("manifest field tokenizer.file and tokenizer.eos_ids must not be empty")


@dataclass(frozen=True)
class Generation:
    """The checkpoint's generate() defaults, with Hugging Face's meaning (runtime.search.GenerationConfig)."""

    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.early_stopping not in (True, False, "never"):
            raise ValueError("manifest field generation is malformed")


# A chat section (runtime.prompting): the checkpoint's chat template, the question asked when none is
# given, and how one image is laid out: "tiles" (SmolVLM's, runtime.prompting.tile_layout), "repeat"
# (LLaVA's: `tokens` image tokens) or "grid" (one image token per feature of the image's grid: Qwen2-VL's).
CHAT = {"template": str, "question": str, "image": dict}
CHAT_IMAGE = {"tiles": {"layout": str, "tokens": int, "image": str, "around": str, "global": str},
              "repeat": {"layout": str, "tokens": int, "image": str}, "grid": {"layout": str, "image": str}}


@dataclass(frozen=True)
class Prompting:
    """How a prompt is built (runtime.prompting.Prompter) and where the text a request sends goes
    (`input`): "none" (a captioner), "prompt" (a question's tokens follow `prefix`, as GIT reads
    one), "encoder" (a question, required, into the vision graph's `text_ids`, as BLIP VQA reads
    one), "task" (a task's prompt from `tasks` into `text_ids`: Florence-2) or "chat" (the question
    and the images in `chat`'s template: the LLM-based families). `prefix`: the ids every decoder
    prompt starts with (none for chat, whose prompt is built per request). `tasks`: {"default":
    task, "prompts": {task: {"prompt", "parse"}}, "parse": the processor's post_processor_config};
    a prompt's "{input}" is replaced by the task's text; "parse" names a parser in runtime.answers."""

    input: str
    prefix: list[int]
    tasks: dict | None = None
    chat: dict | None = None

    def __post_init__(self):
        if self.input not in PROMPT_INPUTS:
            raise ValueError(f"manifest field prompting.input must be one of {', '.join(PROMPT_INPUTS)}")
        if (self.tasks is not None) != (self.input == "task") or (self.chat is not None) != (self.input == "chat") \
                or bool(self.prefix) == (self.input == "chat"):
            raise ValueError(f"manifest field prompting does not fit its input {self.input!r} (tasks go with task, "
                             "chat with chat, a prefix with every other)")
        if self.tasks is not None:
            prompts = self.tasks["prompts"]
            if self.tasks["default"] not in prompts or \
                    not all(isinstance(p["prompt"], str) and isinstance(p["parse"], str) for p in prompts.values()):
                raise ValueError("manifest field prompting.tasks is malformed")
            unknown = sorted({p["parse"] for p in prompts.values()} - set(PARSERS))
            if unknown:
                raise ValueError(f"this runtime cannot parse answers of kind {', '.join(unknown)} "
                                 f"(it knows {', '.join(PARSERS)}): update edgecap")
        if self.chat is not None:
            check_fields("prompting.chat", self.chat, CHAT)
            layout = self.chat["image"].get("layout")
            if layout not in CHAT_IMAGE:
                raise ValueError(f"manifest field prompting.chat.image.layout has an unknown value {layout!r}")
            check_fields("prompting.chat.image", self.chat["image"], CHAT_IMAGE[layout])

    @property
    def vision_text(self) -> bool:
        """Whether the vision graph reads text (`text_ids`): a question or a task's prompt."""
        return self.input in ("encoder", "task")

    @property
    def text_inputs(self) -> dict[str, bool]:
        """The text a request may send beside its image, each with whether it is required: a chat
        model's question, Florence-2's task and its text, a VQA model's question (required where it
        feeds the vision graph, as BLIP VQA's does), none for a captioner. The service and the
        batch job take these."""
        return {"none": {}, "prompt": {"question": False}, "encoder": {"question": True},
                "task": {"task": False, "text": False}, "chat": {"question": False}}[self.input]


RESAMPLE_FILTERS, CROP_OFFSETS = ("bilinear", "bicubic", "lanczos"), ("round", "floor")


@dataclass(frozen=True)
class Pixels:
    """How a sized picture becomes pixel values (runtime.preprocess.normalized): Pillow's `resample`
    filter for the resize, then x * rescale, minus mean, over std, per channel."""

    resample: str
    rescale: float
    mean: list[float]
    std: list[float]

    def __post_init__(self):
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"manifest field preprocess.resample has an unknown value {self.resample!r}")
        if not self.rescale > 0 or len(self.mean) != 3 or len(self.std) != 3 or not all(self.std):
            raise ValueError("manifest field preprocess is malformed")


@dataclass(frozen=True)
class FixedSize(Pixels):
    """One picture of a fixed size (runtime.preprocess.to_pixels): `resize` an int sets the shorter
    side (aspect kept), [h, w] an exact size, as torchvision's Resize; then a center `crop` [h, w] or
    none, its offsets rounded ("round", torchvision's CenterCrop) or floored ("floor", transformers')."""

    resize: int | list[int]
    crop: list[int] | None
    crop_offset: str
    kind: str = "fixed"

    def __post_init__(self):
        super().__post_init__()
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"manifest field preprocess.crop_offset has an unknown value {self.crop_offset!r}")
        if any(isinstance(size, list) and len(size) != 2 for size in (self.resize, self.crop)):
            raise ValueError("manifest field preprocess is malformed")


@dataclass(frozen=True)
class Tiles(Pixels):
    """SmolVLM's tiles (runtime.preprocess.to_tiles): the longest edge resized to `longest_edge`,
    then (`split`) cut into tiles of `tile` pixels plus the whole image as one more tile."""

    longest_edge: int
    tile: int
    split: bool
    kind: str = "tiles"


@dataclass(frozen=True)
class Grid(Pixels):
    """Qwen2-VL's smart_resize (runtime.preprocess.to_grid): sides multiples of `factor`, the area
    between min_pixels and max_pixels; one feature per factor x factor pixels."""

    factor: int
    min_pixels: int
    max_pixels: int
    kind: str = "grid"


PREPROCESS = {cls.kind: cls for cls in (FixedSize, Tiles, Grid)}
Preprocess = FixedSize | Tiles | Grid


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
    """A vetted package: its typed sections, and `data`, the manifest as read (files, graphs, dims
    and source, which reports and the providers' profiles read)."""

    root: Path
    data: dict
    decoder: Decoder
    preprocess: Preprocess
    tokenizer: TokenizerSpec
    generation: Generation
    prompting: Prompting

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def digest(self) -> str:
        """SHA-256 of manifest.json, which pins every file of the package by its own hash."""
        return sha256(self.path(MANIFEST))

    @property
    def max_positions(self) -> int:
        return self.decoder.max_positions

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


def conforms(value, hint) -> bool:
    """`value`, as json.load gives it, is of the annotated type `hint` (a bool is not a number)."""
    if get_origin(hint) is UnionType:
        return any(conforms(value, h) for h in get_args(hint))
    if get_origin(hint) is list:
        return isinstance(value, list) and all(conforms(v, get_args(hint)[0]) for v in value)
    if value is None or isinstance(value, bool):
        return hint is type(value)
    return isinstance(value, (int, float) if hint is float else hint)


def typed(cls, section: str, values):
    """A manifest section as its dataclass: every field of its declared type, the required ones
    present and no others; the dataclass checks the values themselves."""
    known, hints = {f.name: f for f in fields(cls)}, get_type_hints(cls)
    if not isinstance(values, dict):
        raise ValueError(f"manifest field {section} has the wrong type")
    odd = [k for k, f in known.items() if f.default is MISSING and k not in values] + sorted(set(values) - set(known))
    if odd:
        raise ValueError(f"manifest field {section}.{odd[0]} is {'unknown' if odd[0] in values else 'missing'}")
    for key, value in values.items():
        if not conforms(value, hints[key]):
            raise ValueError(f"manifest field {section}.{key} has the wrong type")
    return cls(**values)


def check_fields(section: str, values: dict, schema: dict) -> None:
    """Exactly the fields of `schema` in `values`, each of its type (bool is no number), none empty."""
    if set(values) != set(schema):
        odd = sorted(set(values) ^ set(schema))
        raise ValueError(f"manifest field {section}.{odd[0]} is {'unknown' if odd[0] in values else 'missing'}")
    for key, kind in schema.items():
        value, kinds = values[key], kind if isinstance(kind, tuple) else (kind,)
        if not (bool in kinds if isinstance(value, bool) else isinstance(value, kinds)) or value in ([], ""):
            raise ValueError(f"manifest field {section}.{key} has the wrong type")


def read_preprocess(values) -> Preprocess:
    kind = values.get("kind", "fixed") if isinstance(values, dict) else None
    if kind not in PREPROCESS:
        raise ValueError(f"manifest field preprocess.kind has an unknown value {kind!r}")
    return typed(PREPROCESS[kind], "preprocess", values)


def check_graph_roles(data: dict, decoder: Decoder, prompting: Prompting) -> None:
    """Every graph's inputs and outputs are the roles this package's decoder and prompting imply."""
    for role, (inputs, outputs) in roles(decoder, prompting.vision_text).items():
        graph = data["graphs"][role]
        if not isinstance(graph["file"], str) or not all(isinstance(i["name"], str) for i in graph["inputs"] + graph["outputs"]):
            raise ValueError(f"manifest entry for the {role} graph is malformed")
        declared = [i["name"] for i in graph["inputs"]], [o["name"] for o in graph["outputs"]]
        for kind, want, got in (("inputs", inputs, declared[0]), ("outputs", outputs, declared[1])):
            if sorted(got) != sorted(want):
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                raise ValueError(f"the {role} graph's {kind} do not fit this package "
                                 f"(missing {', '.join(missing[:4]) or 'none'}; unexpected {', '.join(extra[:4]) or 'none'})")


def check_shapes(data: dict, decoder: Decoder) -> None:
    """The graphs' declared shapes agree with the decoder's fields, where they are numbers: each
    layer's cache (batch, kv_heads, slots, head_dim), cross-attention memory (batch, heads, tokens,
    head_dim) and prefix (as the cache it fills), and the logits' vocabulary."""
    cache = {1: decoder.kv_heads, 3: decoder.head_dim}
    want = {"logits": {2: decoder.vocab_size}, "cross": {1: decoder.heads, 3: decoder.head_dim},
            "past": cache, "present": cache, "prefix": cache}
    for role in GRAPHS:
        for tensor in data["graphs"][role]["inputs"] + data["graphs"][role]["outputs"]:
            fixed, shape = want.get(tensor["name"].split("_")[0], {}), tensor["shape"]
            if any(axis >= len(shape) or isinstance(shape[axis], int) and shape[axis] != size for axis, size in fixed.items()):
                raise ValueError(f"the {role} graph's {tensor['name']} {tensor['shape']} does not fit the manifest's "
                                 "decoder (heads, kv_heads, head_dim, vocab_size)")


def check_dims(data: dict) -> None:
    for name, dim in data["dims"].items():
        if not all(isinstance(dim[k], int) for k in ("min", "opt")) or not (dim["max"] is None or isinstance(dim["max"], int)):
            raise ValueError(f"manifest dims.{name} is malformed")
    symbols = {d for role in GRAPHS for i in data["graphs"][role]["inputs"] for d in i["shape"] if isinstance(d, str)}
    if symbols - set(data["dims"]):
        raise ValueError(f"manifest dims do not cover {', '.join(sorted(symbols - set(data['dims'])))}")
    for name, meta in data["files"].items():
        if not isinstance(meta["sha256"], str) or not isinstance(meta["bytes"], int):
            raise ValueError(f"manifest entry for {name} is malformed")


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
        if role == "decoder" and ("com.microsoft::GroupQueryAttention" in facts.ops) != (data["decoder"].get("attention") == "grouped"):
            raise PackageError(f"{root}: manifest field decoder.attention does not fit {graph['file']} "
                               "(\"grouped\" exactly when it has GroupQueryAttention nodes)")


def read_sections(root: Path, data: dict) -> Manifest:
    """The manifest's typed sections, each checked, and how they fit together."""
    decoder = typed(Decoder, "decoder", data["decoder"])
    prompting = typed(Prompting, "prompting", data["prompting"])
    preprocess = read_preprocess(data["preprocess"])
    if (prompting.input == "chat") != (decoder.memory == "embeddings") or \
            (preprocess.kind != "fixed" and prompting.input != "chat"):
        raise ValueError("manifest fields prompting.input, preprocess.kind and decoder.memory do not fit together")
    if not isinstance(data["name"], str) or not data["name"]:
        raise ValueError("manifest field name must be a non-empty string")
    check_graph_roles(data, decoder, prompting)
    check_shapes(data, decoder)
    check_dims(data)
    return Manifest(root, data, decoder, preprocess, typed(TokenizerSpec, "tokenizer", data["tokenizer"]),
                    typed(Generation, "generation", data["generation"]), prompting)


def load_manifest(root: Path | str) -> Manifest:
    """Read and vet a package: format, sections, every file's SHA-256 (about 35 ms for
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
        manifest = read_sections(root, data)
    except ValueError as e:
        raise PackageError(f"{root}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise PackageError(f"{root}: manifest is malformed ({type(e).__name__}: {e})") from None
    check_files(root, data)
    check_graphs(root, data)
    return manifest
