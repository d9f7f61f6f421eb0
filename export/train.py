"""Train the concept decoder on generated (top-k distribution, sentence) pairs.

One deterministic command: same seed, same data, same weights. The checkpoint holds
the decoder config, its weights and the tokenizer, which is all `export package`
needs besides the pretrained EfficientNet-Lite0 file.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.manifest import Decoder
from runtime.search import GenerationConfig, cached, capacity, greedy, start

from .check import ExportError
from .concepts import class_names, describe_scene, people, sample_scene, with_article
from .model import ConceptDecoder, DecoderConfig
from .progress import Progress
from .reference import torch_graph_step
from .tokenizer import special_ids, train_tokenizer



@dataclass(frozen=True)
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    examples: int = 200_000
    heldout: int = 1000
    vocab_size: int = 1500
    seed: int = 0
    threads: int = 2  # fixed: CPU float reductions depend on the thread count


def make_examples(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[str]]:
    """n sampled scenes as stacked signals (export.concepts.Signals, one row each) and their sentences."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return [np.stack(x) for x in zip(*scenes)], [describe_scene(*s) for s in scenes]


def rows(signals: list[np.ndarray], index) -> list[torch.Tensor]:
    return [torch.from_numpy(x[index]) for x in signals]


def encode(tok, sentences, max_positions: int) -> np.ndarray:
    """[bos] sentence [eos], right-padded with pad to the longest sentence."""
    sp = special_ids(tok)
    rows = [[sp["bos_id"], *e.ids, sp["eos_id"]] for e in tok.encode_batch(sentences)]
    longest = max(map(len, rows))
    if longest > max_positions + 1:
        raise ExportError(f"a target sentence needs {longest} positions, the decoder has {max_positions}")
    out = np.full((len(rows), longest), sp["pad_id"], dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Shuffled batches of similar-length sentences: padding costs most of a step otherwise."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for first in range(0, len(order), chunk):
        part = order[first : first + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_exact_match(model, tok, signals, sentences) -> float:
    """Greedy captions from the trained decoder vs the rule's sentence, on unseen inputs."""
    sp = special_ids(tok)
    with torch.inference_mode():
        memory = model.cross_kv(model.memory(*rows(signals, slice(None))))
    prompt = np.full((len(sentences), 1), sp["bos_id"], dtype=np.int64)
    c, cfg = model.cfg, GenerationConfig(max_new_tokens=model.cfg.max_positions)
    decoder = Decoder(c.n_layer, c.n_head, c.n_head, c.head_dim, c.vocab_size, c.max_positions, "cross")
    state = start(decoder, tuple([t.numpy() for t in layers] for layers in memory), capacity(1, cfg.max_new_tokens))
    out = greedy(cached(torch_graph_step(model, decoder)), state, prompt, sp["eos_id"], cfg)
    return float(np.mean([tok.decode(o) == s for o, s in zip(out, sentences)]))


def train(cfg: TrainConfig, out: Path) -> dict:
    """Deterministic training; torch's thread count and algorithm choice are put back afterwards, so a
    process that trains (a test) computes everything else as it would have."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True)
        return train_deterministic(cfg, out)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_deterministic(cfg: TrainConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    signals, sentences = make_examples(rng, cfg.examples)
    # Every class name in every article form, so BPE never sees a name for the first time at run time.
    names = [with_article(n) for n in class_names()] + [people(n) for n in (1, 2, 3)]
    tok = train_tokenizer(sentences + names, cfg.vocab_size)
    model_cfg = DecoderConfig(vocab_size=tok.get_vocab_size())
    targets = encode(tok, sentences, model_cfg.max_positions)
    pad = special_ids(tok)["pad_id"]
    lengths = (targets != pad).sum(1)
    h_signals, h_sentences = make_examples(np.random.default_rng(cfg.seed + 1), cfg.heldout)

    model = ConceptDecoder(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    progress = Progress("train", cfg.steps)
    batches, step, loss_avg = [], 0, None
    model.train()
    while step < cfg.steps:
        if not batches:
            batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
        batch = batches.pop()
        width = int(lengths[batch].max())
        seq = torch.from_numpy(targets[batch, :width])
        logits = model(rows(signals, batch), seq[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), ignore_index=pad)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        progress.update(step, f"loss {loss_avg:.4f}")
    model.eval()
    exact = heldout_exact_match(model, tok, h_signals, h_sentences)
    summary = {"steps": cfg.steps, "seed": cfg.seed, "examples": cfg.examples, "final_loss": round(loss_avg, 4),
               "heldout_exact_match": exact, "heldout": cfg.heldout}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model_cfg.to_dict(), "state_dict": model.state_dict(),
                "tokenizer": tok.to_str(), "train": summary}, out)
    return summary
