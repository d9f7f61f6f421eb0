"""The Python API: load a model package once, caption paths, PIL images or arrays.

    from runtime import Captioner
    cap = Captioner()                      # the bundled default model
    print(cap.caption("photo.jpg").text)
    for c in cap.caption(["a.jpg", "b.png"], num_beams=4): print(c.image, c.text or c.error)

A Captioner holds no per-call state, and ONNX Runtime sessions may be run from
several threads at once, so one instance can serve many threads.
"""

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import providers as prov
from .graphs import Graphs, host, session_options
from .manifest import PackageError, load_manifest
from .answers import parse
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, load_pixels, open_image, to_grid, to_pixels, to_tiles
from .prompting import Prompter
from .search import GenerationConfig, cached, capacity, chat_memory, generate, greedy_steps, take_rows, uncached

DEFAULT_MODEL = Path(__file__).parent / "models" / "default"
# The bundled model's variants. INT8 passes the fidelity gate (README "Quantization"), so it
# is the default on the CPU; GPU providers get FP32 (its int8 Conv weights are CPU-folded).
BUNDLED = {"fp32": DEFAULT_MODEL, "int8": DEFAULT_MODEL.parent / "default-int8"}


@dataclass
class Caption:
    """A caption; with `question` set, the answer to it; with `task` set, the model's output for
    that task (Florence-2: text with <loc_N> tokens)."""

    image: str
    text: str | None = None
    question: str | None = None
    task: str | None = None
    result: dict | str | None = None  # the task's parsed answer (runtime.answers), sizes in original pixels
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # the decoder's prompt, image tokens included (a chat model's)
    ms: float = 0.0
    error: str | None = None


def name_of(image) -> str:
    """How results and messages name an input: its path, or its type (an array, a PIL image, bytes)."""
    return str(image) if isinstance(image, (str, Path)) else type(image).__name__


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces` rules."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class Captioner:
    def __init__(self, model: str | Path | None = None, provider: str = "auto", threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_batch: int = 8, io_binding: bool | None = None,
                 precision: str | None = None):
        """`model` None is the bundled model, in `precision` (fp32 or int8; default int8 on
        the CPU, fp32 on a GPU). `max_batch` bounds images x beams per forward pass for
        TensorRT's profiles; `io_binding` keeps caches on the device (default: on for CUDA
        and TensorRT)."""
        names, note = prov.resolve(provider)
        if model is not None and precision is not None:
            raise ValueError("precision picks a variant of the bundled model; a model package has its own")
        if precision is not None and precision not in BUNDLED:
            raise ValueError(f"precision must be one of {', '.join(BUNDLED)}")
        if model is None:
            model = BUNDLED[precision or ("int8" if names[0] == prov.ORT_NAMES["cpu"] else "fp32")]
        self.manifest = load_manifest(model)
        self.max_batch = max_batch
        names = prov.for_package(names, self.manifest.data["precision"], provider != "auto")
        self.max_pixels = max_pixels
        opts = session_options(self.manifest.data["precision"], threads)
        (vision, decoder), fallbacks = prov.open_sessions(self.manifest, names, provider != "auto", opts, max_batch)
        # `notes`: a provider this onnxruntime has failed to start (news, always shown); `info`: which
        # providers the build lacks (expected with the CPU wheel: shown with --verbose and by doctor).
        self.notes = [n for n in fallbacks if n]
        self.info = [note] if note else []
        self.provider = prov.LABELS[decoder.get_providers()[0]]
        use_binding = self.provider != "CPU" if io_binding is None else io_binding
        # Where bound caches live: GPU memory under CUDA/TensorRT; host memory when forced on CPU.
        self.graphs = Graphs(vision, decoder, self.manifest.decoder,
                             None if not use_binding else ("cpu" if self.provider == "CPU" else "cuda"))
        try:
            self.tokenizer = Tokenizer.from_file(str(self.manifest.path(self.manifest.tokenizer.file)))
        except Exception as e:
            raise PackageError(f"{self.manifest.root}: unusable tokenizer: {str(e).splitlines()[0]}") from None
        self.defaults = GenerationConfig(**asdict(self.manifest.generation))
        self.prompting = Prompter(self.manifest, self.tokenizer)
        self.eos = np.array(self.manifest.tokenizer.eos_ids, dtype=np.int64)

    def generation_config(self, max_new_tokens=None, num_beams=None, length_penalty=None, question: str | None = None,
                          task: str | None = None, text: str | None = None, temperature: float | None = None,
                          top_p: float | None = None, top_k: int | None = None,
                          seed: int | None = None) -> GenerationConfig:
        """The package's settings with these overrides; the default length is cut to what fits
        after a question's tokens. A temperature above 0 samples (runtime.search.sample_next_token)
        with one beam, whatever beams the package defaults to."""
        prompt = self.prompting.ask(question, task, text)[0]
        # The prompt takes positions too; the last generated token is never fed back.
        limit = self.manifest.max_positions - len(prompt) + 1
        default = min(self.defaults.max_new_tokens, limit)
        if temperature and num_beams is None:
            num_beams = 1
        given = {"max_new_tokens": default if max_new_tokens is None else max_new_tokens, "num_beams": num_beams,
                 "length_penalty": length_penalty, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                 "seed": seed}
        cfg = replace(self.defaults, **{k: v for k, v in given.items() if v is not None})
        if not 1 <= cfg.max_new_tokens <= limit:
            raise ValueError(f"max tokens must be between 1 and {limit} for this model")
        if not 1 <= cfg.num_beams <= self.max_batch:
            raise ValueError(f"beams must be between 1 and the max batch ({self.max_batch})")
        return cfg

    def images_per_pass(self, num_beams: int) -> int:
        """Images in one forward pass: images x beams stays within `max_batch`, the batch
        TensorRT's profiles were built for (explicit profiles cannot grow at run time)."""
        return self.max_batch // num_beams

    def generate(self, pixels: np.ndarray, cfg: GenerationConfig, cache: bool = True, question: str | None = None,
                 task: str | None = None, text: str | None = None) -> list[list[int]]:
        """Tokens per image, in forward passes of at most `images_per_pass` images."""
        return self._generate(pixels, cfg, cache, *self.prompting.ask(question, task, text))

    def _generate(self, pixels: np.ndarray, cfg: GenerationConfig, cache: bool, prompt: np.ndarray,
                  inputs: list[np.ndarray]) -> list[list[int]]:
        tokens, n = [], self.images_per_pass(cfg.num_beams)
        for i in range(0, len(pixels), n):
            chunk = pixels[i : i + n]
            tokens += self.graphs.generate(chunk, prompt, self.eos, cfg, cache, [np.tile(x, (len(chunk), 1)) for x in inputs])
        return tokens

    def decode(self, tokens: list[int]) -> str:
        """Text as transformers' `decode(prompt + tokens, skip_special_tokens=True)` gives it:
        a text prompt (BLIP's "a picture of") is part of the caption; a question is not part of
        its answer. A package whose special tokens carry meaning (Florence-2's <loc_N>) keeps
        them: the text its processor parses, without the decoder's start and forced BOS. A chat
        model's answer is its tokens alone, without the spaces around them."""
        if self.manifest.prompting.input == "chat":
            return self.tokenizer.decode(tokens).strip()
        if not self.manifest.tokenizer.skip_special_tokens:
            forced = self.defaults.forced_bos_token_id
            return self.tokenizer.decode(tokens[1:] if tokens[:1] == [forced] else tokens, skip_special_tokens=False)
        text = self.tokenizer.decode([*self.prompting.prefix.tolist(), *tokens])
        return clean_up_tokenization(text) if self.manifest.tokenizer.clean_up_spaces else text

    def encode(self, image) -> tuple[np.ndarray, np.ndarray]:
        """The image's memory keys and values in host memory, every layer's stacked: (layers, 1,
        heads, tokens, head_dim) each (what score_memories takes; a retrieval index keeps it).
        Raises ImageError."""
        pixels = load_pixels(image, self.manifest.preprocess, self.max_pixels)[None]
        outputs = self.graphs.encode(pixels, *(x[None] for x in self.prompting.ask()[1]))
        return tuple(np.stack([host(x) for x in layers]) for layers in outputs)

    def score(self, image, texts: list[str], mean: bool = False, question: str | None = None,
              task: str | None = None, text: str | None = None) -> list[float]:
        """log p(text | image) for each text: the sum over the text's tokens and the end of
        sequence, after the model's prompt (teacher forcing; a text is what the model would
        generate after its prompt, or the answer to `question`). `mean` divides by those tokens.
        All texts of the image share one encoder pass and go through the decoder together,
        `max_batch` at a time. Raises ImageError for a bad image, ValueError for an empty list
        or a text too long."""
        if not texts:
            raise ValueError("no texts to score")
        prompt, inputs = self.prompting.ask(question, task, text)
        sequences = [self.scored_sequence(t, prompt) for t in texts]
        pixels = load_pixels(image, self.manifest.preprocess, self.max_pixels)[None]
        outputs = self.graphs.encode(pixels, *(x[None] for x in inputs))
        return self._scores(outputs, np.zeros(len(texts), dtype=np.int64), sequences, len(prompt), mean)

    def score_memories(self, key: np.ndarray, value: np.ndarray, text: str, mean: bool = False) -> list[float]:
        """log p(text | image) for each image whose memory (`encode`) is a row of key/value
        (axis 1): retrieval's ranking, `max_batch` images per decoder pass."""
        sequence = self.scored_sequence(text, self.prompting.prefix)
        return self._scores((list(key), list(value)), np.arange(key.shape[1]), [sequence] * key.shape[1],
                            len(self.prompting.prefix), mean)

    def _scores(self, outputs: tuple[list, list], rows: np.ndarray, sequences: list[np.ndarray], start: int,
                mean: bool) -> list[float]:
        """Sequence i scored against memory row rows[i] of the per-layer `outputs`, `max_batch`
        sequences per decoder pass."""
        n = self.max_batch
        scores = np.concatenate([self.graphs.score(tuple([take_rows(x, rows[i : i + n]) for x in layers] for layers in outputs),
                                                   sequences[i : i + n], start) for i in range(0, len(sequences), n)])
        if mean:
            scores = scores / np.array([len(s) - start for s in sequences])
        return scores.tolist()

    def scored_sequence(self, text: str, prompt: np.ndarray | None = None) -> np.ndarray:
        """prompt + the text's tokens + end of sequence; ValueError if the text does not fit."""
        prompt = self.prompting.prefix if prompt is None else prompt
        ids, limit = self.tokenizer.encode(text, add_special_tokens=False).ids, self.manifest.max_positions - len(prompt)
        if not 1 <= len(ids) <= limit:
            raise ValueError(f"text {text!r} is {len(ids)} tokens; this model scores 1 to {limit}")
        return np.array([*prompt, *ids, self.manifest.tokenizer.eos_ids[0]], dtype=np.int64)

    def caption(self, images, max_new_tokens=None, num_beams=None, length_penalty=None, batch_size: int = 8,
                question: str | None = None, task: str | None = None, text: str | None = None, cache: bool = True,
                temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                seed: int | None = None):
        """One image -> Caption (raises ImageError); a list -> list of Caption, where a
        bad image gets `error` set and the others are still captioned. With `question`, each
        Caption's text answers it; with `task` (and its `text`), it is the task's output
        (ValueError on a model that takes neither). A temperature above 0 samples (top_p, top_k;
        a seed gives the same text on every run). `cache=False` recomputes the whole prefix at
        every step: the reference the KV cache must equal."""
        asked = {"question": question, "task": task, "text": text}
        cfg = self.generation_config(max_new_tokens, num_beams, length_penalty, **asked, temperature=temperature,
                                     top_p=top_p, top_k=top_k, seed=seed)
        batch = self._answer_batch if self.manifest.prompting.input == "chat" else self._caption_batch
        if not isinstance(images, (list, tuple)):
            result = batch([images], cfg, asked, cache)[0]
            if result.error:
                raise ImageError(result.error)
            return result
        results = []
        for start in range(0, len(images), batch_size):
            results += batch(images[start : start + batch_size], cfg, asked, cache)
        return results

    def chat_tiles(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """A chat model's vision input for one image and its grid: the tiles and the global image
        (rows, cols of tiles), the photo at its own aspect ratio (rows, cols of features: Qwen2-VL's
        grid), or the one resized image of a fixed-size tower (0, 0). ImageError for an image that
        does not decode."""
        rgb, spec = open_image(image, self.max_pixels), self.manifest.preprocess
        if spec.kind != "fixed":
            tiles, rows, cols = (to_tiles if spec.kind == "tiles" else to_grid)(rgb, spec)
            return tiles.reshape(-1, *tiles.shape[-3:]), (rows, cols)
        return to_pixels(rgb, spec)[None], (0, 0)

    def chat_features(self, tiles: np.ndarray) -> np.ndarray:
        """One image's tiles through the vision graph one tile per run: its features (K, D) in prompt
        order. SmolVLM-256M's 13 tiles of a photo in one run took 3.6 GiB and 19.7-22 s, one by one
        830 MiB and 15.4-16.3 s (the activations of a tile stay in cache; the same features)."""
        features = np.concatenate([host(self.graphs.encode(tiles[i : i + 1])[0][0]) for i in range(len(tiles))])
        return features.reshape(-1, features.shape[-1])

    def chat_input(self, image, question: str | None, cfg: GenerationConfig) -> tuple[np.ndarray, np.ndarray, tuple]:
        """A chat model's (prompt ids, image features (K, D), grid) for one image, the prompt laid out
        for its grid (chat_tiles). ImageError for an image that does not decode or whose prompt and
        answer would not fit the model's positions (checked before the vision pass)."""
        tiles, (rows, cols) = self.chat_tiles(image)
        prompt = self.prompting.chat(question, [(rows, cols)])
        if len(prompt) + cfg.max_new_tokens - 1 > self.manifest.max_positions:
            raise ImageError(f"{name_of(image)}: its {rows}x{cols} grid makes a {len(prompt)}-token prompt; with "
                             f"{cfg.max_new_tokens} new tokens that is beyond the model's {self.manifest.max_positions}")
        return prompt, self.chat_features(tiles), (rows, cols)

    def chat_memory(self, features: np.ndarray, prompt: np.ndarray, grid: tuple[int, int]) -> tuple:
        """The decoder's memory for rows of image features (N, K, D) asked the same prompt about
        images of the same grid (runtime.search.chat_memory)."""
        return chat_memory(self.graphs.spec, features, np.tile(prompt, (len(features), 1)), grid)

    def _answer_batch(self, images, cfg: GenerationConfig, asked: dict, cache: bool) -> list[Caption]:
        """A chat model: each image's prompt laid out for its grid (`chat_input`); images whose
        prompts and grids are the same are decoded together, `images_per_pass` at a time. An
        image that fails gets its error; the others are answered."""
        start, question = time.perf_counter(), asked["question"]
        results, groups = [], {}
        for image in images:
            results.append(Caption(image=name_of(image), question=question))
            try:
                prompt, features, grid = self.chat_input(image, question, cfg)
            except ImageError as e:
                results[-1].error = str(e)
                continue
            groups.setdefault((prompt.tobytes(), grid), (prompt, grid, []))[2].append((results[-1], features))
        step, n = (cached if cache else uncached)(self.graphs.step), self.images_per_pass(cfg.num_beams)
        for prompt, grid, members in groups.values():
            for i in range(0, len(members), n):
                chunk = members[i : i + n]
                memory = self.chat_memory(np.stack([f for _, f in chunk]), prompt, grid)
                state = self.graphs.start(memory, capacity(len(prompt), cfg.max_new_tokens))
                for (r, _), t in zip(chunk, generate(step, state, np.tile(prompt, (len(chunk), 1)), self.eos, cfg)):
                    r.tokens, r.text, r.prompt_tokens = t, self.decode(t), len(prompt)
        ok = [r for r in results if r.error is None]
        for r in ok:
            r.ms = (time.perf_counter() - start) * 1000 / len(ok)
        return results

    def stream(self, image, max_new_tokens=None, question: str | None = None, task: str | None = None,
               text: str | None = None, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, seed: int | None = None) -> Generator[str, None, Caption]:
        """The caption (or answer) of one image as pieces of text while it is generated: joined,
        they are `caption(image, ...).text`; the generator's return value is that Caption. A piece
        is what the tokens so far add to the text (trailing spaces held back until a word follows,
        a character split across tokens until it is whole). With the package's default of beam
        search the whole text comes as one piece, once the search ends. Raises ImageError,
        ValueError as `caption` does."""
        asked = {"question": question, "task": task, "text": text}
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        cfg = self.generation_config(max_new_tokens, **asked, **sampling)
        if cfg.num_beams > 1:
            result = self.caption(image, max_new_tokens, **asked)
            yield result.text
            return result
        start = time.perf_counter()
        if self.manifest.prompting.input == "chat":
            prompt, features, grid = self.chat_input(image, question, cfg)
            state = self.graphs.start(self.chat_memory(features[None], prompt, grid), capacity(len(prompt), cfg.max_new_tokens))
        else:
            prompt, inputs = self.prompting.ask(**asked)
            rgb = open_image(image, self.max_pixels)
            pixels = to_pixels(rgb, self.manifest.preprocess)[None]
            state = self.graphs.start(self.graphs.encode(pixels, *(x[None] for x in inputs)),
                                      capacity(len(prompt), cfg.max_new_tokens))
        tokens, shown = [], ""
        for token in greedy_steps(cached(self.graphs.step), state, prompt[None], self.eos, cfg):
            if token[0] in self.eos:
                break
            tokens.append(int(token[0]))
            so_far = self.decode(tokens).rstrip()
            if so_far.startswith(shown) and len(so_far) > len(shown) and not so_far.endswith("\ufffd"):
                yield so_far[len(shown):]
                shown = so_far
        if rest := self.decode(tokens)[len(shown):]:
            yield rest
        result = Caption(image=name_of(image), text=self.decode(tokens), question=question, tokens=tokens,
                         prompt_tokens=len(prompt), ms=(time.perf_counter() - start) * 1000)
        if (tasks := self.manifest.prompting.tasks) is not None:
            result.task = task or tasks["default"]
            result.result = parse(result.text, result.task, rgb.size, tasks)
        return result

    def _caption_batch(self, images, cfg: GenerationConfig, asked: dict, cache: bool) -> list[Caption]:
        start = time.perf_counter()
        results, pixels, sizes = [], [], []
        tasks = self.manifest.prompting.tasks
        task = asked["task"] or (tasks or {}).get("default")
        for image in images:
            results.append(Caption(image=name_of(image), question=asked["question"], task=task))
            try:
                rgb = open_image(image, self.max_pixels)
                pixels.append(to_pixels(rgb, self.manifest.preprocess))
                sizes.append(rgb.size)
            except ImageError as e:
                results[-1].error = str(e)
        ok = [r for r in results if r.error is None]
        if ok:
            prompt, inputs = self.prompting.ask(**asked)
            tokens = self._generate(np.stack(pixels), cfg, cache, prompt, inputs)
            ms = (time.perf_counter() - start) * 1000 / len(ok)
            for r, t, size in zip(ok, tokens, sizes, strict=True):
                r.tokens, r.text, r.ms, r.prompt_tokens = t, self.decode(t), ms, len(prompt)
                if tasks is not None:
                    r.result = parse(r.text, task, size, tasks)
        return results
