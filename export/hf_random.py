"""What the families share to build Hugging Face folders with random weights offline, from configs
(each family's own builder, build_<family>, lives in its module under export/hf): tokenizers trained
on a caption corpus, the conditioning below and a trained checkpoint's magnitudes. For tests and
benchmarks, since no pretrained captioner can be downloaded here.

    python -m export random-hf OUT --encoder vit --decoder gpt2 [--size base]

Random weights make a poor parity subject: greedy output repeats one token whatever the
image and never ends. `conditioned=True` widens the weight init (captions vary by image,
top-1 margins are not near-ties) and raises the EOS logit until captions end at different
lengths, so that parity also covers finished beams, length penalty and early stopping.
`realistic=True` then gives the weights a trained checkpoint's magnitudes (see realistic_scale).
"""

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .concepts import class_names

# "base" is ViT-base/16 + GPT-2 small (nlpconnect/vit-gpt2-image-captioning) or BLIP-base. Its
# vocabulary is the real one in size; the tokenizer trained here has fewer tokens, and
# ids beyond it decode to nothing.
TINY = {"hidden": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "vocab": 400}
BASE = {"hidden": 768, "layers": 12, "heads": 12, "image": 224, "patch": 16, "vocab": 50257, "blip_image": 384,
        "blip_vocab": 30524}


def corpus() -> list[str]:
    return [f"a photo of a {name}" for name in class_names()]


def byte_level_bpe(vocab: int, special: list[str], texts: list[str] = ()) -> Tokenizer:
    """A byte-level BPE (the scheme of GPT-2, BART, SmolLM2 and Qwen2) trained on the caption corpus
    and `texts`, its `special` tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus() + list(texts), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def byte_level_tokenizer(vocab: int):
    """GPT-2's scheme: byte-level BPE, <|endoftext|> as BOS, EOS and pad."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(vocab, ["<|endoftext|>"]), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def wordpiece_tokenizer(vocab: int):
    """BERT's scheme ([PAD] 0, [CLS] ... [SEP]) plus BLIP's [DEC] start token."""
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=special,
                                                                show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]",
                                   clean_up_tokenization_spaces=True)


def boost_eos(lm, eos: int) -> None:
    """Make EOS compete: GPT-2's (untied) output row scaled, BERT's output bias raised."""
    with torch.no_grad():
        if hasattr(lm, "lm_head"):
            lm.lm_head.weight[eos] *= 2.5
        else:
            lm.cls.predictions.decoder.bias[eos] += 3.5


# A trained checkpoint is far larger than a fresh init: logits in the tens to hundreds, and a
# few residual dimensions carrying hundreds at every position (GPT-2's "massive activations",
# BERT's outlier LayerNorm dimensions). FP32 differences between two correct implementations
# grow with them, so exports are also tested at this scale.
MASSIVE = {3: 400.0, 11: -400.0}  # opposite signs leave each position's mean where it was
LOGIT_GAIN = 12.0


def realistic_scale(lm) -> None:
    """Give `lm` a trained model's magnitudes while keeping roughly what it computes, as
    training does: every LayerNorm that reads the outlier dimensions gives them zero gain and
    scales the others' gain by the std they add (so the image still steers the caption)."""
    dims, values = list(MASSIVE), torch.tensor(list(MASSIVE.values()))

    def compensate(norm):
        width = norm.weight.shape[0]
        norm.weight *= (1 + (values**2).sum() / width) ** 0.5
        norm.weight[dims] = 0.0

    with torch.no_grad():
        if hasattr(lm, "lm_head"):  # GPT-2, pre-LN: the residual stream carries them through every layer
            lm.transformer.wpe.weight[:, dims] += values
            blocks = lm.transformer.h
            for norm in [lm.transformer.ln_f, *(n for b in blocks for n in (b.ln_1, b.ln_cross_attn, b.ln_2))]:
                compensate(norm)
            lm.lm_head.weight *= LOGIT_GAIN
        else:  # BERT and BLIP, post-LN: every residual LayerNorm puts them back, the next one reads them
            layers = lm.bert.encoder.layer
            sublayers = [n for layer in layers for n in (layer.attention.output, layer.crossattention.output,
                                                           layer.output)]
            for i, out in enumerate([lm.bert.embeddings, *sublayers]):
                if i:
                    compensate(out.LayerNorm)
                out.LayerNorm.bias[dims] = values
            # Every layer reads the residual directly, so the outlier dimensions are made inert to
            # its readers (as a trained model learns); they still pass through every LayerNorm.
            readers = [lm.cls.predictions.transform.dense, *(lin for layer in layers for lin in (
                layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                layer.crossattention.self.query, layer.intermediate.dense))]
            for linear in readers:
                linear.weight[:, dims] = 0.0
            lm.cls.predictions.decoder.weight *= LOGIT_GAIN
            lm.cls.predictions.decoder.bias *= LOGIT_GAIN


def realistic_llm(model, lm_head, sinks: list[int]) -> None:
    """A trained LLM's magnitudes (see realistic_scale): logits LOGIT_GAIN times larger, and two
    residual dimensions at +-400 where trained LLMs carry them (Sun et al. 2024, "Massive activations
    in large language models"): at a few tokens only, here the `sinks` (the chat turns' start token,
    first in every prompt), which every RMSNorm reads with zero gain, so that those tokens' keys and
    values are near zero and they become the attention sinks trained models make of them.

    Not at every position, as realistic_scale puts them for the encoder-decoder families: an RMSNorm
    whose sum of squares is dominated by constant dimensions no longer normalizes the others, so the
    gated MLPs' growth compounds over depth. Built that way (the norms' gains compensating),
    FastVLM-0.5B's architecture drifted 0.08 -> 0.84 of its residual over its last four layers from
    8-bit weights alone (simulated in torch) and kept 7% of its next tokens: no 4- or 8-bit package
    of it could be judged. Built this way it keeps 95% at 8 bits and 47% at 4 (SmolVLM-256M's: 95%,
    37%): a random model's next-token logits are flat (top-1 leads top-2 by a quarter of their
    standard deviation), which 4-bit noise of ~8% per product overturns where a trained model's
    peaked ones hold."""
    dims, values = list(MASSIVE), torch.tensor(list(MASSIVE.values()))
    with torch.no_grad():
        for token in sinks:
            model.embed_tokens.weight[token, dims] = values
        for norm in [model.norm, *(n for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm))]:
            norm.weight[dims] = 0.0
        lm_head.weight *= LOGIT_GAIN


def qwen_tokenizer(vocab: int):
    """Qwen2's scheme: byte-level BPE, no BOS; chat turns and the LLaVA image placeholder."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(vocab, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})
