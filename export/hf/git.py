"""Family: `GitForCausalLM` (microsoft/git-base, git-base-coco, git-base-vqav2, git-large-*): a
CLIP ViT whose projected patch tokens are a prefix of the text decoder's self-attention
("prefix" memory: GitDecoder). Any GIT takes a question as prompt tokens after [CLS],
as transformers' VQA example feeds one; the VQA checkpoints are trained to answer it."""

from pathlib import Path

import torch
from torch import nn

from ..check import ExportError
from ..hf_random import BASE, TINY, wordpiece_tokenizer
from ..kv import cached_attention, pick, window
from ..model import merge_heads, split_heads
from .common import Family, HFCaptioner


class GitDecoder(nn.Module):
    """`GitForCausalLM`'s text side (BERT-style post-LN layers): the image tokens are a prefix of
    every layer's self-attention, which they see whole and the text sees causally after them.
    They never attend to text, so their keys and values depend on the image alone: `memory_kv`
    runs the layers over them once per image, and they fill the cache's first slots ("prefix"
    memory): a step's causal attention over the cache is then GIT's [image tokens; text] mask.
    Text positions count from 0, after the prefix."""

    def __init__(self, git: nn.Module):
        super().__init__()
        self.git, self.n_head = git, git.config.num_attention_heads

    def memory_kv(self, memory: torch.Tensor) -> tuple[list, list]:
        keys, values, layers, x = [], [], self.git.git.encoder.layer, memory
        for i, layer in enumerate(layers):
            keys.append(split_heads(layer.attention.self.key(x), self.n_head))
            values.append(split_heads(layer.attention.self.value(x), self.n_head))
            if i < len(layers) - 1:
                x = layer(x)  # no mask: image tokens attend to each other bidirectionally
        return keys, values

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values):
        emb = self.git.git.embeddings
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(position_ids))
        keys, values, w = [], [], window(cache_lengths, input_ids.shape[1])
        for i, layer in enumerate(self.git.git.encoder.layer):
            sa = layer.attention.self
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.query, sa.key, sa.value))
            a, k, v = cached_attention(q, k, v, past_keys[i], past_values[i], w)
            a = layer.attention.output(merge_heads(a), x)
            x = layer.output(layer.intermediate(a), a)
            keys.append(k)
            values.append(v)
        return self.git.output(pick(x, logit_index)), keys, values


class ImageTokens(nn.Module):
    """The image encoder's last hidden state (CLIP's post-LayerNorm included)."""

    def __init__(self, git: nn.Module):
        super().__init__()
        self.image_encoder = git.image_encoder

    def forward(self, pixels):
        return (self.image_encoder(pixels).last_hidden_state,)


class Git(Family):
    ARCHITECTURE, MODEL_TYPE = "GitForCausalLM", "git"
    SUPPORTS = "GitForCausalLM (image checkpoints)"
    MEMORY, INPUT = "prefix", "prompt"

    def unsupported(self, config: dict) -> str | None:
        if config.get("num_image_with_embedding"):
            return "a video GIT (num_image_with_embedding: several frames per input)"
        return None

    def model_class(self):
        from transformers import GitForCausalLM

        return GitForCausalLM

    def captioner(self, model) -> HFCaptioner:
        return HFCaptioner(ImageTokens(model.git), model.git.visual_projection, GitDecoder(model)).eval()

    def text_config(self, model):
        return model.config

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        """[CLS] (the config's BOS), as generate starts without input ids; a prompt's tokens follow it."""
        if prompt:
            raise ExportError(f"{src}: a GIT takes its text as a question at run time (--question), not at export")
        return [model.config.bos_token_id], model.generation_config.eos_token_id or model.config.eos_token_id

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward over [image tokens; text], no cache: the text positions' logits."""
        logits = model(input_ids=ids, pixel_values=inputs[0]).logits
        return logits[:, -ids.shape[1] :]

    def generate(self, model, inputs, prompt, eos: list[int], **kwargs):
        return model.generate(pixel_values=inputs[0], input_ids=prompt, eos_token_id=eos, **kwargs)


FAMILY = Git()


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
def build_git(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0) -> Path:
    """GIT (microsoft/git-base's shape at "base": CLIP ViT-B/16, 6 text layers): a BERT tokenizer,
    CLIP's image processor (shortest edge, then a centre crop)."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM

    s, init = (TINY if size == "tiny" else BASE), (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = wordpiece_tokenizer(s.get("blip_vocab", s["vocab"]))
    vision = {"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "intermediate_size": 4 * s["hidden"], "image_size": s["image"], "patch_size": s["patch"],
              "initializer_range": init}
    config = GitConfig(vision_config=vision, vocab_size=max(len(tok), s.get("blip_vocab", 0)), hidden_size=s["hidden"],
                       num_hidden_layers=s["layers"] if size == "tiny" else 6, num_attention_heads=s["heads"],
                       intermediate_size=4 * s["hidden"], max_position_embeddings=64 if size == "tiny" else 1024,
                       initializer_range=init, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                       pad_token_id=tok.pad_token_id)
    model = GitForCausalLM(config).eval()
    if conditioned:
        with torch.no_grad():
            model.output.bias[tok.sep_token_id] += 3.5
    model.generation_config.update(max_length=16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": s["image"]},
                       crop_size={"height": s["image"], "width": s["image"]}).save_pretrained(out)
    return out
