"""The reference captioner in PyTorch: EfficientNet-Lite0 -> top-k concept tokens for the whole
photo and its four quadrants, and MTCNN's faces -> a GPT-2-style decoder with cross-attention
and an explicit KV cache.

Everything the runtime runs is traced from here, and parity is measured against it.
Caches are per-layer buffers of fixed capacity (export.kv): a step writes its tokens' K/V at
slots cache_lengths.. in place and attends to the slots written, so one `step` serves prefill
(an empty cache) and decoding, and no buffer shape depends on how far a caption has got.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from . import DEFAULT_CHECKPOINT
from .concepts import (EXTRAS, FACES, FORMS, MAIN_SURE, MAY_SHOW, PAIR_SURE, PERSON_P, REGION_SURE, REGION_TOP_K,
                       REGIONS, SECOND_SURE, WORN_SURE, class_groups, class_names, worn_ids)
from .encoder import NUM_CLASSES, EfficientNetLite0, load_pretrained
from .faces import FaceDetector
from .kv import attend, cached_attention, pick, window


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 256
    max_positions: int = 40
    top_k: int = 5
    regions: int = REGIONS
    region_top_k: int = REGION_TOP_K
    faces: int = FACES
    num_classes: int = NUM_CLASSES

    @property
    def memory_tokens(self) -> int:
        return self.top_k + self.regions * self.region_top_k + self.faces

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class Block(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to memory, MLP."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, self.n_head = cfg.n_embd, cfg.n_head
        self.ln_1, self.ln_2, self.ln_3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_qkv = nn.Linear(d, 3 * d)
        self.self_proj = nn.Linear(d, d)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)  # applied once per image, in the vision graph
        self.cross_proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x, past_k, past_v, w, cross_k, cross_v):
        q, k, v = (split_heads(t, self.n_head) for t in self.self_qkv(self.ln_1(x)).chunk(3, dim=-1))
        a, k, v = cached_attention(q, k, v, past_k, past_v, w)
        x = x + self.self_proj(merge_heads(a))
        q = split_heads(self.cross_q(self.ln_2(x)), self.n_head)
        x = x + self.cross_proj(merge_heads(attend(q, cross_k, cross_v)))
        x = x + self.mlp(self.ln_3(x))
        return x, k, v


class ConceptDecoder(nn.Module):
    """Concept tokens (class ids + probabilities, whole photo and regions) and face tokens
    (probability, size) -> memory -> text, one step at a time."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.class_emb = nn.Embedding(cfg.num_classes, d)
        self.rank_emb = nn.Embedding(cfg.top_k, d)
        self.prob_proj = nn.Linear(4, d)
        self.region_emb = nn.Embedding(cfg.regions + 1, d)  # 0: the whole photo
        self.form_emb = nn.Embedding(len(FORMS), d)  # the whole photo's sentence form, on its top class
        self.face_proj = nn.Linear(4, d)
        self.face_emb = nn.Embedding(cfg.faces, d)
        self.ln_mem = nn.LayerNorm(d)
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.wpe = nn.Embedding(cfg.max_positions, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init)
        # What the caption names is decided here, in the vision graph (`named`), and given to the
        # decoder as one more feature: left to the decoder, it skipped or repeated an object in
        # half of the several-object scenes it had not seen. Derived from export.concepts, not saved.
        groups, names = class_groups(), class_names()
        group_index = {g: i for i, g in enumerate(sorted({g for g in groups if g}))}
        nouns = [cfg.num_classes + group_index[g] if g else c for c, g in enumerate(groups)]
        self.register_buffer("nouns", torch.tensor(nouns), persistent=False)
        worn = torch.zeros(len(names), dtype=torch.bool)
        worn[list(worn_ids())] = True
        self.register_buffer("worn", worn, persistent=False)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for proj in (block.self_proj, block.cross_proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(3 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def concept_tokens(self, class_ids, probs, named, region: int) -> torch.Tensor:
        """(B, K) ids and probabilities, (B,) whether the caption names the top class -> (B, K, D).
        Probability enters on three scales so that both 0.9 vs 0.5 and 0.02 vs 0.002 stay
        distinguishable."""
        first = torch.zeros_like(probs)
        first[:, 0] = named
        feats = torch.stack([probs, probs.sqrt(), torch.log(probs.clamp_min(1e-4)) / math.log(1e4) + 1, first], dim=-1)
        ranks = self.rank_emb.weight[: class_ids.shape[1]]
        return self.class_emb(class_ids) + self.prob_proj(feats) + ranks + self.region_emb.weight[region]

    def named(self, ids, region_ids, region_probs, people, form) -> tuple[torch.Tensor, torch.Tensor]:
        """export.concepts.scene_objects as tensor operations, given `form`'s sentence forms: whether
        the caption names the main object (B,) and each region's top class (B, R), as 0/1. Objects are
        compared by noun (their group, else their class); regions are taken most sure first."""
        main, sure = self.nouns[ids[:, 0]], form <= 2  # sure of the class, or of its group (concepts.sure_of)
        main_named = sure & ~(people & self.worn[ids[:, 0]])
        count, seen, flags = main_named.long(), [(main, sure)], []
        # Without people, a region's object alone is not said (concepts.scene_objects): cleared below.
        top_p, top_c = region_probs[:, :, 0], region_ids[:, :, 0]
        order = top_p.topk(top_p.shape[1], dim=1).indices  # (ties: any order; real probabilities have none)
        for i in range(order.shape[1]):
            p, c = top_p.gather(1, order[:, i : i + 1])[:, 0], top_c.gather(1, order[:, i : i + 1])[:, 0]
            noun = self.nouns[c]
            repeat = torch.stack([(noun == n) & known for n, known in seen]).any(dim=0)
            new = (p >= REGION_SURE) & (count < 1 + EXTRAS) & ~repeat & ~(people & self.worn[c])
            seen.append((noun, new))
            count = count + new.long()
            flags.append(new)
        alone = ~people & ~main_named & (count == 1)
        flags = torch.stack(flags, dim=1) & ~alone[:, None]
        named = torch.zeros_like(top_p).scatter(1, order, flags.to(top_p.dtype))
        return main_named.to(top_p.dtype), named

    def form(self, ids, probs) -> torch.Tensor:
        """export.concepts.form as tensor operations: which of describe's sentences (B,) the whole
        photo's classes get. Left to the decoder, its thresholds were rounded: on two photos whose top
        class lay a hair's breadth under and over the rule's 0.2, it said "may show" and "unclear"."""
        noun = self.nouns[ids[:, 0]]
        grouped = noun >= self.cfg.num_classes
        mass = (probs * (self.nouns[ids] == noun[:, None])).sum(dim=1)
        p1, p2 = probs[:, 0], probs[:, 1]
        either = (self.nouns[ids[:, 1]] == noun) & (p2 >= SECOND_SURE)
        form = torch.where(p1 >= MAY_SHOW, 4, 5)
        form = torch.where(p1 + p2 >= PAIR_SURE, 3, form)
        form = torch.where(grouped & (mass >= MAIN_SURE), torch.where(either, 1, 2), form)
        return torch.where(p1 >= MAIN_SURE, 0, form)

    def wearing(self, ids, probs, count, main, regions) -> torch.Tensor:
        """export.concepts.wearing as tensor operations, (B,) as 0/1, given `named`'s flags. Left to
        the decoder, this threshold was rounded: a gown at 0.29 was said to be worn."""
        nothing_named = (main == 0) & (regions.sum(dim=1) == 0)
        wears = (count == 1) & nothing_named & self.worn[ids[:, 0]] & (probs[:, 0] >= WORN_SURE)
        return wears.to(probs.dtype)

    def memory(self, class_ids, probs, region_ids, region_probs, faces) -> torch.Tensor:
        """Whole-photo (B, K) and regions' (B, R, Kr) ids and probabilities, faces (B, F, 2) ->
        (B, K + R * Kr + F, D). A face's probability enters also as "counts as a person". The main
        token's flag says that the caption names its class: as an object, or as what a person wears
        (the two exclude each other); it also carries which of describe's sentences is the photo's."""
        p, size = faces.unbind(-1)
        person = (p >= PERSON_P).to(p.dtype)
        count = person.sum(dim=1)
        form = self.form(class_ids, probs)
        main, regions = self.named(class_ids, region_ids, region_probs, count > 0, form)
        main = main + self.wearing(class_ids, probs, count, main, regions)
        whole = self.concept_tokens(class_ids, probs, main, 0)
        tokens = [torch.cat([whole[:, :1] + self.form_emb(form)[:, None], whole[:, 1:]], dim=1)]
        tokens += [self.concept_tokens(region_ids[:, r], region_probs[:, r], regions[:, r], r + 1)
                   for r in range(region_ids.shape[1])]
        face = torch.stack([p, person, size, size.sqrt()], dim=-1)
        tokens.append(self.face_proj(face) + self.face_emb.weight[: faces.shape[1]])
        return self.ln_mem(torch.cat(tokens, dim=1))

    def cross_kv(self, memory: torch.Tensor) -> tuple[list, list]:
        """Per-layer cross-attention K/V: two lists of (B, H, K, Dh)."""
        kv = [block.cross_kv(memory).chunk(2, dim=-1) for block in self.blocks]
        return [split_heads(k, self.cfg.n_head) for k, _ in kv], [split_heads(v, self.cfg.n_head) for _, v in kv]

    def step(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, cross_keys, cross_values):
        """input_ids (B, T) + caches -> logits (B, K, V) at logit_index, present keys/values per layer."""
        x, w = self.wte(input_ids) + self.wpe(position_ids), window(cache_lengths, input_ids.shape[1])
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past_keys[i], past_values[i], w, cross_keys[i], cross_values[i])
            keys.append(k)
            values.append(v)
        logits = self.ln_f(pick(x, logit_index)) @ self.wte.weight.T  # tied LM head
        return logits, keys, values

    def forward(self, signals, input_ids):
        """Teacher-forced logits for training: the same step over an empty cache."""
        cross = self.cross_kv(self.memory(*signals))
        c, (b, t) = self.cfg, input_ids.shape
        past = [torch.zeros(b, c.n_head, t, c.head_dim, device=input_ids.device)] * c.n_layer
        every = torch.arange(t, device=input_ids.device).expand(b, t)
        return self.step(input_ids, every, torch.zeros(b, dtype=torch.int64, device=input_ids.device), every,
                         past, past, *cross)[0]


class Captioner(nn.Module):
    """pixels -> signals (whole-photo and region top-k ids and probs, faces) -> cross K/V;
    `decoder.step` does the rest."""

    def __init__(self, encoder: EfficientNetLite0, faces: FaceDetector, decoder: ConceptDecoder):
        super().__init__()
        self.encoder, self.faces, self.decoder = encoder, faces, decoder

    def signals(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg, features = self.decoder.cfg, self.encoder.features(pixels)
        probs, ids = self.encoder._fc(features.mean(dim=(2, 3))).softmax(dim=-1).topk(cfg.top_k, dim=-1)
        region_probs, region_ids = self.encoder.region_logits(features).softmax(dim=-1).topk(cfg.region_top_k, dim=-1)
        return ids, probs, region_ids, region_probs, self.faces(pixels)

    def vision(self, pixels: torch.Tensor) -> tuple[list, list]:
        return self.decoder.cross_kv(self.decoder.memory(*self.signals(pixels)))

    def step(self, *feeds):
        return self.decoder.step(*feeds)


def bundled(decoder: ConceptDecoder) -> Captioner:
    """The bundled captioner around a trained decoder: pretrained EfficientNet-Lite0 and MTCNN."""
    return Captioner(load_pretrained(), FaceDetector().load(), decoder).eval()


def load_decoder(path: Path = DEFAULT_CHECKPOINT):
    """(decoder in eval mode, tokenizer, checkpoint dict) from a training checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = ConceptDecoder(DecoderConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), Tokenizer.from_str(ckpt["tokenizer"]), ckpt
