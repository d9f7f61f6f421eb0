"""Decoding as small functions over one decoder step.

A `GraphStep` is the decoder-step graph itself, whoever runs it (ONNX Runtime here, eager
PyTorch in the reference):
    (input_ids (N, T), position_ids (N, T), cache, memory, logit_index (N, K)) -> logits (N, K, V)
It writes the T tokens' keys and values into the cache's per-layer buffers, in place, at slots
cache.lengths .. +T-1 of each row, attends to the slots before them, and returns the logits at
the positions `logit_index` picks (the last one when decoding; every one when scoring). `cached`
and `uncached` turn it into a `Step` over a `State`; greedy and beam search only see `Step`, so
the same search runs over ONNX Runtime and over the eager reference, and the with-cache and
without-cache paths differ in nothing else.
"""

from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .manifest import memory_roles


@dataclass(frozen=True)
class GenerationConfig:
    """Hugging Face `generate` semantics for the settings a package may carry."""

    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None  # the first token of a sequence (BART's <s> after </s>)
    forced_eos_token_id: int | None = None  # the token at the length limit
    # Sampling (one beam): temperature 0 is greedy, as in the peers' servers; top_k 0 and top_p 1
    # filter nothing; a seed makes each row's draws the same on every run and in any batch.
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")
        if self.temperature > 0 and self.num_beams > 1:
            raise ValueError("sampling (temperature > 0) takes one beam")


@dataclass(frozen=True)
class Cache:
    """gpt-fast's KVCache: per layer, key and value buffers (N, kv_heads, capacity, head_dim) of a
    fixed capacity that the decoder step writes in place; `lengths` (N,) says how many slots of
    each row are written. A step costs what it attends to, whatever the capacity: nothing is ever
    copied whole (graphs.py binds the buffers as the step's inputs and outputs). `start` counts
    the slots a memory prefix holds (GIT's image tokens), which rewinding keeps."""

    keys: list
    values: list
    lengths: np.ndarray
    start: np.ndarray

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def advanced(self, t: int) -> "Cache":
        return replace(self, lengths=self.lengths + t)

    def rewound(self) -> "Cache":
        return replace(self, lengths=self.start.copy())

    def select(self, rows: np.ndarray) -> "Cache":
        """A new cache of these rows (beam expansion: each image's row repeated per beam)."""
        return replace(self, keys=[take_rows(k, rows) for k in self.keys], values=[take_rows(v, rows) for v in self.values],
                       lengths=self.lengths[rows], start=self.start[rows])

    def reorder(self, parents: np.ndarray) -> "Cache":
        """Row i becomes a copy of row parents[i], in place; only rows whose parent changed are
        copied, and only their written slots (beam search, every step)."""
        moved = np.flatnonzero(parents != np.arange(len(parents)))
        if len(moved):
            slots = int(self.lengths.max())
            for buffer in (*self.keys, *self.values):
                buffer[moved, :, :slots] = buffer[parents[moved], :, :slots]  # the right side is a copy
        return replace(self, lengths=self.lengths[parents], start=self.start[parents])


def empty_cache(layers: int, n: int, kv_heads: int, slots: int, head_dim: int, dtype=np.float32,
                prefix: tuple = ()) -> Cache:
    """A cache of `slots` slots per row beyond the prefix; `prefix`: per-layer (keys, values)
    (N, kv_heads, M, head_dim) that fill the first M slots (GIT's image tokens)."""
    m = prefix[0][0].shape[2] if prefix else 0
    keys = [np.zeros((n, kv_heads, m + slots, head_dim), dtype) for _ in range(layers)]
    values = [np.zeros((n, kv_heads, m + slots, head_dim), dtype) for _ in range(layers)]
    for buffers, given in zip((keys, values), prefix):
        for buffer, layer in zip(buffers, given):
            buffer[:, :, :m] = layer
    start = np.full(n, m, dtype=np.int64)
    return Cache(keys, values, start.copy(), start)


class State(NamedTuple):
    tokens: np.ndarray  # (N, P) int64: every token fed so far
    positions: np.ndarray  # (N, P) int64: the position of each of them
    cache: Cache
    memory: tuple  # what the decoder reads: cross-attention (keys, values) per layer, ([image features],) or ()


GraphStep = Callable[..., np.ndarray]
Step = Callable[[State, np.ndarray], tuple[np.ndarray, State]]


def capacity(prompt_length: int, max_new_tokens: int) -> int:
    """Cache slots a generation fills: the prompt and every generated token but the last
    (which is never fed back)."""
    return prompt_length + max_new_tokens - 1


def initial_state(cache: Cache, memory: tuple = ()) -> State:
    n = len(cache.lengths)
    return State(np.zeros((n, 0), np.int64), np.zeros((n, 0), np.int64), cache, memory)


def start(decoder, outputs: tuple[list, list], slots: int, dtype=np.float32) -> State:
    """The state before a prompt, from the vision graph's per-layer (keys, values): the decoder's
    cross-attention memory (`decoder.memory` "cross"), or the cache's first slots ("prefix").
    `decoder` has layers, kv_heads, head_dim and memory (runtime.manifest.Decoder)."""
    prefix = outputs if decoder.memory == "prefix" else ()
    cache = empty_cache(decoder.layers, len(outputs[0][0]), decoder.kv_heads, slots, decoder.head_dim, dtype, prefix)
    return initial_state(cache, () if prefix else outputs)


def next_positions(positions: np.ndarray, t: int) -> np.ndarray:
    """Positions of t new tokens: on from the last one fed, or from 0."""
    first = positions[:, -1] + 1 if positions.shape[1] else np.zeros(len(positions), np.int64)
    return first[:, None] + np.arange(t)


def last_index(n: int, t: int) -> np.ndarray:
    """`logit_index` for the next token only."""
    return np.full((n, 1), t - 1, dtype=np.int64)


def cached(graph_step: GraphStep) -> Step:
    def step(state: State, ids: np.ndarray) -> tuple[np.ndarray, State]:
        positions = next_positions(state.positions, ids.shape[1])
        logits = graph_step(ids, positions, state.cache, state.memory, last_index(*ids.shape))
        return logits[:, -1], State(np.concatenate([state.tokens, ids], 1), np.concatenate([state.positions, positions], 1),
                                    state.cache.advanced(ids.shape[1]), state.memory)

    return step


def prefix_logits(graph_step: GraphStep, state: State, ids: np.ndarray) -> np.ndarray:
    """Logits (N, T, V) at every position of `ids`, fed in one call over the state's cache
    rewound (teacher forcing); the cache needs T slots beyond its prefix."""
    every = np.tile(np.arange(ids.shape[1]), (len(ids), 1))
    return graph_step(ids, next_positions(state.positions[:, :0], ids.shape[1]), state.cache.rewound(), state.memory,
                      every)


def text_logprobs(logits: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row, the sum of log p(targets[i, t]) over t < lengths[i]: logits (N, T, V) are the
    teacher-forced predictions of targets (N, T); rows are right-padded beyond their length."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    logp = np.take_along_axis(x, targets[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    return np.where(np.arange(targets.shape[1]) < lengths[:, None], logp, 0.0).sum(1)


def uncached(graph_step: GraphStep) -> Step:
    """Recompute the whole prefix every step over the cache rewound: the reference the KV cache
    must equal."""

    def step(state: State, ids: np.ndarray) -> tuple[np.ndarray, State]:
        tokens = np.concatenate([state.tokens, ids], axis=1)
        logits = prefix_logits(graph_step, state, tokens)[:, -1]
        positions = np.concatenate([state.positions, next_positions(state.positions, ids.shape[1])], 1)
        return logits, State(tokens, positions, state.cache, state.memory)

    return step


def feature_index(ids: np.ndarray, cache: Cache, image_token: int, features: int) -> np.ndarray:
    """(N, T): which image feature each fed token takes, -1 for none. In a sequence fed from its
    start, the k-th `image_token` takes feature k, for k < `features` (the processor's placeholders
    in the prompt); later tokens, an image token the model writes itself included, keep their own
    embeddings, as in transformers' generate."""
    if (cache.lengths != cache.start).any():
        return np.full(ids.shape, -1, dtype=np.int64)
    placeholder = ids == image_token
    k = np.cumsum(placeholder, axis=1) - 1
    return np.where(placeholder & (k < features), k, -1)


def image_grid(prompt: np.ndarray, image_token: int, grid: tuple[int, int]) -> np.ndarray:
    """(N, 3) for M-RoPE (a decoder whose `rope` is "mrope"): per row of prompts (N, T), the
    position of its first image token and the image's grid of features (rows, cols)."""
    first = np.argmax(prompt == image_token, axis=1)
    return np.stack([first, np.full_like(first, grid[0]), np.full_like(first, grid[1])], axis=1).astype(np.int64)


def chat_memory(decoder, features, prompt: np.ndarray, grid: tuple[int, int]) -> tuple:
    """A chat model's memory for rows of prompts (N, T) about images whose features (N, K, D) lie
    in a grid of rows x cols: ([features],), with the image grid for an M-RoPE decoder."""
    if decoder.rope == "mrope":
        return [features], [image_grid(prompt, decoder.image_token, grid)]
    return ([features],)


def memory_feeds(decoder, memory: tuple, ids: np.ndarray, cache: Cache) -> dict:
    """The decoder step's memory inputs by role name (runtime.manifest.roles) for these ids:
    cross-attention keys and values, or image features, which token takes which (and the image
    grid, for M-RoPE: chat_memory)."""
    if decoder.memory == "cross":
        return dict(zip(memory_roles(decoder), (*memory[0], *memory[1])))
    if decoder.memory == "embeddings":
        features = memory[0][0]
        return {"image_features": features,
                "feature_index": feature_index(ids, cache, decoder.image_token, features.shape[1]),
                **({"image_grid": memory[1][0]} if decoder.rope == "mrope" else {})}
    return {}


def take_rows(x, rows: np.ndarray):
    """x[rows], a copy (a device tensor's way of taking rows, graphs.DeviceTensor, otherwise)."""
    return np.take(x, rows, 0) if isinstance(x, np.ndarray) else x[rows]


def expand(state: State, rows: np.ndarray) -> State:
    """A state of these rows (beam expansion): copies, not views."""
    return State(state.tokens[rows], state.positions[rows], state.cache.select(rows),
                 tuple([take_rows(x, rows) for x in layers] for layers in state.memory))


def reorder(state: State, parents: np.ndarray) -> State:
    """Beams take their parents' rows (within one image, whose memory rows are all the same)."""
    return State(state.tokens[parents], state.positions[parents], state.cache.reorder(parents), state.memory)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def prefill(step: Step, state: State, prompt: np.ndarray) -> tuple[np.ndarray, State]:
    """Feed the prompt (N, T) in one call; returns the last position's logits."""
    return step(state, prompt)


def ban_repeated_ngrams(scores: np.ndarray, tokens: np.ndarray, n: int) -> np.ndarray:
    """transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram
    already present in the row (prompt included) gets -inf."""
    if n <= 0 or tokens.shape[1] + 1 < n:
        return scores
    scores = scores.copy()
    for row, seq in enumerate(tokens.tolist()):
        prefix = tuple(seq[len(seq) - n + 1 :])
        for i in range(len(seq) - n + 1):
            if tuple(seq[i : i + n - 1]) == prefix:
                scores[row, seq[i + n - 1]] = -np.inf
    return scores


def force_tokens(scores: np.ndarray, length: int, max_length: int, cfg: GenerationConfig) -> np.ndarray:
    """transformers' ForcedBOSTokenLogitsProcessor and ForcedEOSTokenLogitsProcessor, in that
    order: at sequence length 1 only the BOS token, at `max_length` - 1 only EOS, each scored 0
    (lengths count the prompt, as transformers' cur_len and max_length do)."""
    token = cfg.forced_eos_token_id if length == max_length - 1 else None
    if token is None and length == 1:
        token = cfg.forced_bos_token_id
    if token is None:
        return scores
    forced = np.full_like(scores, -np.inf)
    forced[:, token] = 0
    return forced


def pick_next_token(logits: np.ndarray) -> np.ndarray:
    """Greedy choice; argmax takes the first of equal maxima, like torch.argmax."""
    return logits.argmax(axis=-1)


def sampling_scores(logits: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in generate's
    order: logits / temperature; below the k-th largest -inf; then, in ascending order, the tokens
    whose cumulative probability stays within 1 - top_p -inf (the most likely one always kept)."""
    scores = logits / np.float32(cfg.temperature)
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = -np.partition(-scores, cfg.top_k - 1, axis=-1)[:, cfg.top_k - 1 : cfg.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if cfg.top_p < 1:
        order = np.argsort(scores, axis=-1, kind="stable")
        ascending = np.take_along_axis(scores, order, -1)
        cumulative = np.cumsum(np.exp(log_softmax(ascending)), axis=-1)
        drop = cumulative <= 1 - cfg.top_p
        drop[:, -1] = False
        np.put_along_axis(scores, order, np.where(drop, -np.inf, ascending), -1)
    return scores


def sample_next_token(logits: np.ndarray, cfg: GenerationConfig, rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row drawn from softmax(sampling_scores), each row with its own generator (so
    that a row's tokens do not depend on the rows beside it)."""
    probs = np.exp(log_softmax(sampling_scores(logits, cfg).astype(np.float64)))
    cumulative = np.cumsum(probs, axis=-1)
    draws = np.array([rng.random() for rng in rngs]) * cumulative[:, -1]
    return np.array([min(int(np.searchsorted(c, d, side="right")), len(c) - 1) for c, d in zip(cumulative, draws)])


def decode_one_token(step: Step, state: State, tokens: np.ndarray) -> tuple[np.ndarray, State]:
    return step(state, tokens[:, None])


def until_eos(row, eos) -> list[int]:
    """The row up to its first end-of-sequence token (`eos`: one id or several)."""
    row, ends = [int(t) for t in row], set(np.atleast_1d(eos).tolist())
    return next((row[:i] for i, t in enumerate(row) if t in ends), row)


def greedy_steps(step: Step, state: State, prompt: np.ndarray, eos, cfg: GenerationConfig) -> Iterator[np.ndarray]:
    """Batched greedy decoding (or sampling, with a temperature), yielding each step's new token per row as it is picked (what a
    stream prints); rows that reach an EOS (`eos`: one id or several, as transformers'
    eos_token_id) keep feeding the first one until all are done."""
    ends = np.atleast_1d(eos)
    rngs = [np.random.default_rng(cfg.seed) for _ in range(prompt.shape[0])]
    logits, state = prefill(step, state, prompt)
    done = np.zeros(prompt.shape[0], dtype=bool)
    for t in range(cfg.max_new_tokens):
        logits = ban_repeated_ngrams(logits, state.tokens, cfg.no_repeat_ngram_size)
        logits = force_tokens(logits, prompt.shape[1] + t, prompt.shape[1] + cfg.max_new_tokens, cfg)
        picked = pick_next_token(logits) if cfg.temperature == 0 else sample_next_token(logits, cfg, rngs)
        token = np.where(done, ends[0], picked)
        yield token
        done |= np.isin(token, ends)
        if done.all() or t == cfg.max_new_tokens - 1:
            break
        logits, state = decode_one_token(step, state, token)


def greedy(step: Step, state: State, prompt: np.ndarray, eos, cfg: GenerationConfig) -> list[list[int]]:
    """Generated tokens per row (prompt and EOS excluded), greedily."""
    return [until_eos(row, eos) for row in np.stack(list(greedy_steps(step, state, prompt, eos, cfg)), axis=1)]


class Hypotheses:
    """The best `size` finished beams of one image, scored sum(logp) / length**penalty,
    where length counts the generated tokens including EOS (as transformers does)."""

    def __init__(self, size: int, cfg: GenerationConfig):
        self.size, self.length_penalty, self.items = size, cfg.length_penalty, []
        self.early_stopping, self.max_new_tokens = cfg.early_stopping, cfg.max_new_tokens

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        self.items.append((sum_logprobs / length**self.length_penalty, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size :]

    def is_done(self, best_running: float, length: int) -> bool:
        """transformers' stopping rule: with early_stopping=True as soon as `size` beams have
        finished; otherwise when the best running beam, scored at the current length (or,
        for "never" with a positive penalty, at the longest possible), cannot beat the worst."""
        if len(self.items) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0:
            length = self.max_new_tokens
        return self.items[-1][0] >= best_running / length**self.length_penalty

    def best(self) -> list[int]:
        return self.items[0][1]


def beam_search(step: Step, state: State, prompt: np.ndarray, eos, cfg: GenerationConfig) -> list[list[int]]:
    """Batched beam search, token for token what transformers' `generate` picks. Rows are
    image-major (image b's beams are b*K .. b*K+K-1); a finished image keeps its rows
    (fed EOS) until every image is done. `eos`: one id or several."""
    ends = np.atleast_1d(eos)
    n, k, max_new_tokens = prompt.shape[0], cfg.num_beams, cfg.max_new_tokens
    rows = np.repeat(np.arange(n), k)
    state, ids = expand(state, rows), prompt[rows]
    scores = np.tile(np.array([0.0] + [-np.inf] * (k - 1), dtype=np.float32), n)
    generated = np.zeros((n * k, 0), dtype=np.int64)
    hyps = [Hypotheses(k, cfg) for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    logits, state = prefill(step, state, ids)
    for t in range(max_new_tokens):
        vocab = logits.shape[-1]
        # As in transformers, banned n-grams and forced tokens are set after normalisation.
        logprobs = ban_repeated_ngrams(log_softmax(logits), state.tokens, cfg.no_repeat_ngram_size)
        logprobs = force_tokens(logprobs, prompt.shape[1] + t, prompt.shape[1] + max_new_tokens, cfg)
        flat = (logprobs + scores[:, None]).reshape(n, k * vocab)
        # As transformers: (1 + EOS ids) x K candidates, at least 2K, guarantee K that are not EOS.
        wide = max(2, 1 + len(ends)) * k
        top = np.argpartition(-flat, wide, axis=1)[:, :wide]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(flat, top, 1), 1, kind="stable"), 1)
        src, tok = np.arange(n * k), np.full(n * k, ends[0], dtype=np.int64)
        last = t == max_new_tokens - 1
        for b in np.flatnonzero(~done):
            chosen = []
            for rank, c in enumerate(top[b]):
                beam, token = divmod(int(c), vocab)
                # A candidate finishes on EOS, or at the length limit whatever it is; as in
                # transformers, only the step's K best candidates can finish.
                ended = token in ends
                if (ended or last) and rank < k:
                    tokens = generated[b * k + beam].tolist() + ([] if ended else [token])
                    hyps[b].add(tokens, float(flat[b, c]), t + 1)
                if not ended:
                    chosen.append((b * k + beam, token, flat[b, c]))
                if len(chosen) == k:
                    break
            for j, (row, token, score) in enumerate(chosen):
                src[b * k + j], tok[b * k + j], scores[b * k + j] = row, token, score
            done[b] = hyps[b].is_done(float(chosen[0][2]), t + 1)
        if done.all() or last:
            break
        generated = np.concatenate([generated[src], tok[:, None]], axis=1)
        logits, state = decode_one_token(step, reorder(state, src), tok)
    return [until_eos(h.best(), ends) for h in hyps]


def generate(step: Step, state: State, prompt: np.ndarray, eos, cfg: GenerationConfig) -> list[list[int]]:
    """Generated tokens per row (prompt and EOS excluded)."""
    if cfg.num_beams == 1:
        return greedy(step, state, prompt, eos, cfg)
    return beam_search(step, state, prompt, eos, cfg)
