"""Hugging Face captioner folders with random weights, built offline from configs: the
architectures real users bring (nlpconnect/vit-gpt2-image-captioning, BLIP-base, BLIP VQA, GIT), for
tests and benchmarks, since no pretrained captioner can be downloaded here.

    python -m export random-hf OUT --encoder vit --decoder gpt2 [--size base]

Random weights make a poor parity subject: greedy output repeats one token whatever the
image and never ends. `conditioned=True` widens the weight init (captions vary by image,
top-1 margins are not near-ties) and raises the EOS logit until captions end at different
lengths, so that parity also covers finished beams, length penalty and early stopping.
`realistic=True` then gives the weights a trained checkpoint's magnitudes (see realistic_scale).
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .concepts import class_names

# "base" is ViT-base/16 + GPT-2 small (nlpconnect/vit-gpt2-image-captioning) or BLIP-base. Its
# vocabulary is the real one in size; the tokenizer trained here has fewer tokens, and
# ids beyond it decode to nothing.
TINY = {"hidden": 32, "layers": 2, "heads": 2, "image": 32, "patch": 8, "vocab": 400}
FLORENCE2_BASE_VOCAB = 51289  # florence-community/Florence-2-base's config.json
BASE = {"hidden": 768, "layers": 12, "heads": 12, "image": 224, "patch": 16, "vocab": 50257, "blip_image": 384,
        "blip_vocab": 30524}


def corpus() -> list[str]:
    return [f"a photo of a {name}" for name in class_names()]


def byte_level_tokenizer(vocab: int):
    """GPT-2's scheme: byte-level BPE, <|endoftext|> as BOS, EOS and pad."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


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


def encoder_config(kind: str, s: dict, init: float):
    from transformers import DeiTConfig, SwinConfig, ViTConfig

    if kind == "swin":
        return SwinConfig(image_size=s["image"], patch_size=s["patch"] // 2, embed_dim=s["hidden"] // 2, depths=[1, 1],
                          num_heads=[1, 2], window_size=2, initializer_range=init)
    cls = {"vit": ViTConfig, "deit": DeiTConfig}[kind]
    return cls(image_size=s["image"], patch_size=s["patch"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
               num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"], initializer_range=init)


def build_vision_encoder_decoder(out: Path, encoder: str = "vit", decoder: str = "gpt2", size: str = "tiny",
                                 conditioned: bool = True, seed: int = 0, realistic: bool = False) -> Path:
    from transformers import (BertConfig, DeiTImageProcessor, GPT2Config, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    s, init = (TINY if size == "tiny" else BASE), (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    if decoder == "gpt2":
        tok = byte_level_tokenizer(s["vocab"])
        dec = GPT2Config(vocab_size=max(len(tok), s["vocab"]), n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                         n_positions=64 if size == "tiny" else 1024, add_cross_attention=True, initializer_range=init,
                         tie_word_embeddings=not conditioned,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        start, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    else:
        tok = wordpiece_tokenizer(s["vocab"])
        dec = BertConfig(vocab_size=max(len(tok), s["vocab"]), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"],
                         max_position_embeddings=64 if size == "tiny" else 512, is_decoder=True,
                         add_cross_attention=True, initializer_range=init)
        start, eos, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config(encoder, s, init), dec)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start, eos, pad
    model = VisionEncoderDecoderModel(config=config).eval()
    if conditioned:
        boost_eos(model.decoder, eos)
    if realistic:
        realistic_scale(model.decoder)
    model.generation_config.update(decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad, max_length=16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if encoder == "deit":  # DeiT's own processor: resize, then a centre crop
        DeiTImageProcessor(size={"height": s["image"] * 8 // 7, "width": s["image"] * 8 // 7},
                           crop_size={"height": s["image"], "width": s["image"]}).save_pretrained(out)
    else:
        ViTImageProcessor(size={"height": s["image"], "width": s["image"]}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(out)
    return out


def build_blip(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, realistic: bool = False,
               vqa: bool = False) -> Path:
    """BLIP captioning (Salesforce/blip-image-captioning-base's shape at "base") or, with `vqa`,
    BLIP VQA (blip-vqa-base's: the same parts plus a question encoder)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor

    s, init = (TINY if size == "tiny" else BASE), (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = wordpiece_tokenizer(s.get("blip_vocab", s["vocab"]))
    image = s.get("blip_image", s["image"])
    text = {"vocab_size": max(len(tok), s.get("blip_vocab", 0)), "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "intermediate_size": 4 * s["hidden"], "encoder_hidden_size": s["hidden"],
            "max_position_embeddings": 64 if size == "tiny" else 512, "initializer_range": init,
            "bos_token_id": tok.bos_token_id, "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "intermediate_size": 4 * s["hidden"], "image_size": image, "patch_size": s["patch"],
              "initializer_range": init}
    blip = BlipForQuestionAnswering if vqa else BlipForConditionalGeneration
    model = blip(BlipConfig(text_config=text, vision_config=vision, initializer_range=init)).eval()
    if conditioned:
        boost_eos(model.text_decoder, tok.sep_token_id)
    if realistic:
        realistic_scale(model.text_decoder)
    model.generation_config.update(max_length=16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    BlipImageProcessor(size={"height": image, "width": image}).save_pretrained(out)
    return out


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



# Florence-2's added tokens: boxes and polygons are written with these (the task prompts are text).
FLORENCE_TOKENS = ["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>",
                   *(f"<loc_{i}>" for i in range(1000))]
# The processor's parse settings, as Microsoft's checkpoints ship them.
FLORENCE_PARSE = {"ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
                          "AREA_THRESHOLD": 0.0},
                  "phrase_grounding": {"FILTER_BY_BLACK_LIST": True}, "pure_text": {}, "description_with_bboxes": {},
                  "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {}}


def florence_tokenizer(vocab: int):
    """BART's byte-level BPE (<s> 0, <pad> 1, </s> 2, <unk> 3; "<s> text </s>") plus Florence-2's
    <image> placeholder, box, polygon and OCR tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(["<image>", *FLORENCE_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": FLORENCE_TOKENS})  # what the post-processor skips
    return fast


def build_florence2(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, window: int = 2) -> Path:
    """Florence-2 (transformers' native classes). "tiny": DaViT with four stages at 96 px, windows of
    `window` (several windows per stage, padded where they do not divide), BART 2+2 layers;
    "base": Florence-2-base's architecture (DaViT-base, BART 6+6 layers, 768 px). Generation as
    the checkpoints ship it: beam 3, no 3-gram repeated, </s> then a forced <s>."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    init = 0.3 if conditioned else 0.02
    torch.manual_seed(seed)
    tok = florence_tokenizer(400 if size == "tiny" else 50265)
    if size == "tiny":
        image, vision = 96, Florence2VisionConfig(depths=[1, 1, 2, 1], embed_dim=[16, 32, 32, 32], num_heads=[1, 2, 2, 2],
                                                  num_groups=[1, 2, 2, 2], window_size=window, projection_dim=32,
                                                  drop_path_rate=0.0, initializer_range=init)
        text = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)
    else:
        image, vision = 768, Florence2VisionConfig(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024],
                                                   num_heads=[4, 8, 16, 32], num_groups=[4, 8, 16, 32], window_size=12,
                                                   projection_dim=768, drop_path_rate=0.0)
        text = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
    # "base" has the real checkpoint's vocabulary (51,289: an output head of 158 MB, ~4 ms of every
    # step); its tokenizer, trained here on little text, has fewer tokens: ids beyond it decode to nothing.
    text = BartConfig(vocab_size=len(tok) if size == "tiny" else FLORENCE2_BASE_VOCAB, **text, init_std=init, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2,
                      tie_word_embeddings=not conditioned)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=tok.image_token_id,
                             tie_word_embeddings=not conditioned)
    model = Florence2ForConditionalGeneration(config).eval()
    if conditioned:  # words between the boxes (untouched, random weights write <loc_N> tokens mostly)
        with torch.no_grad():
            model.lm_head.weight[tok.convert_tokens_to_ids("<loc_0>"):] *= 0.9
    model.generation_config.update(num_beams=3, no_repeat_ngram_size=3, early_stopping=False, forced_bos_token_id=0,
                                   max_length=20 if size == "tiny" else 1025)
    model.save_pretrained(out)
    with torch.inference_mode():
        tokens = model.model.get_image_features(torch.zeros(1, 3, image, image)).pooler_output.shape[1]
    processor = Florence2Processor(
        image_processor=CLIPImageProcessor(size={"height": image, "width": image}, do_center_crop=False,
                                           image_seq_length=tokens, image_mean=[0.485, 0.456, 0.406],
                                           image_std=[0.229, 0.224, 0.225]),
        tokenizer=tok, post_processor_config=FLORENCE_PARSE)
    processor.save_pretrained(out)
    return out


# SmolVLM's added tokens: the chat turns, and how an image is laid out in the prompt.
SMOLVLM_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                  *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)), "<end_of_utterance>"]
# HuggingFaceTB/SmolVLM-256M-Instruct and -500M-Instruct: SigLIP-base over 512-pixel tiles (64 features
# each after the 4x4 pixel shuffle), SmolLM2-135M / -360M as the language model.
SMOLVLM = {"tiny": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
                    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512),
                    "scale_factor": 2, "tile": 32, "vocab": None},
           "256m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                   image_size=512, patch_size=16),
                    "text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, max_position_embeddings=8192),
                    "scale_factor": 4, "tile": 512, "vocab": 49280},
           "500m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                   image_size=512, patch_size=16),
                    "text": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                 num_key_value_heads=5, max_position_embeddings=8192),
                    "scale_factor": 4, "tile": 512, "vocab": 49280}}


def smolvlm_tokenizer(vocab: int):
    """SmolLM2's scheme: byte-level BPE, no BOS added; SmolVLM's chat and image tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": SMOLVLM_TOKENS})
    return fast


def build_smolvlm(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, realistic: bool = False) -> Path:
    """SmolVLM (transformers' native classes, the real processor and chat template). "tiny": 32-pixel
    tiles, 4 features each, a 2-layer language model with grouped-query attention (4 heads, 2 for keys
    and values); "256m" and "500m": those checkpoints' whole architectures, vocabulary included (the
    tokenizer trained here has fewer tokens: ids beyond it decode to nothing). Generation ends at
    <end_of_utterance> or <|im_end|> (two EOS ids). `realistic`: a trained checkpoint's magnitudes."""
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor,
                              SmolVLMVideoProcessor)
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    s, init = SMOLVLM[size], (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = smolvlm_tokenizer(400 if size == "tiny" else 50000)
    eos = [tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<|im_end|>")]
    text = dict(**s["text"], vocab_size=s["vocab"] or len(tok), rope_theta=100000.0, initializer_range=init,
                tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=eos[0], pad_token_id=tok.pad_token_id)
    config = SmolVLMConfig(vision_config={**s["vision"], "initializer_range": init}, text_config=text,
                           scale_factor=s["scale_factor"], image_token_id=tok.convert_tokens_to_ids("<image>"),
                           tie_word_embeddings=False)
    model = SmolVLMForConditionalGeneration(config).eval()
    if conditioned:
        boost_eos(model, eos[0])
    if realistic:
        realistic_llm(model.model.text_model, model.lm_head, [tok.convert_tokens_to_ids("<|im_start|>")])
    model.generation_config.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id)
    model.save_pretrained(out)
    tile = s["tile"]
    tokens = (s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2 // s["scale_factor"] ** 2
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=True, max_image_size={"longest_edge": tile},
                                              size={"longest_edge": 4 * tile}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, video_processor=SmolVLMVideoProcessor(), image_seq_len=tokens, chat_template=DEFAULT_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


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


# A Qwen2 chat template over LLaVA-style content (the image's placeholder on its own line), as the
# FastVLM checkpoints prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# apple/FastVLM-0.5B: FastViTHD (timm's fastvit_mci3, 3,072 features of a 16 x 16 map at 1,024 pixels)
# and Qwen2-0.5B. "tiny": the same stages, 8 to 128 wide, at 128 pixels (2 x 2 features).
FASTVLM = {"tiny": {"vision": {"layers": (1, 1, 1, 1, 1), "embed_dims": (8, 16, 32, 64, 128)}, "image": 128,
                    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512), "vocab": None},
           "0.5b": {"vision": {}, "image": 1024,
                    "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, max_position_embeddings=32768), "vocab": 151936}}


def qwen_tokenizer(vocab: int):
    """Qwen2's scheme: byte-level BPE, no BOS; chat turns and the LLaVA image placeholder."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})


def build_fastvlm(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, realistic: bool = False) -> Path:
    """FastVLM (transformers' native classes over timm's fastvit_mci3; LlavaProcessor with CLIP's image
    processor, as the converted checkpoints). "tiny": fastvit_mci3's five stages, narrow, at 128
    pixels; "0.5b": FastVLM-0.5B's whole architecture, vocabulary included. Ends at <|im_end|> or
    <|endoftext|>. `realistic`: a trained checkpoint's magnitudes."""
    from transformers import (CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor,
                              TimmWrapperConfig)
    import timm

    s, init = FASTVLM[size], (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = qwen_tokenizer(400 if size == "tiny" else 50000)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    tower = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, **s["vision"])
    width = tower.num_features
    vision = TimmWrapperConfig(architecture="fastvit_mci3", hidden_size=width, do_pooling=False,
                               model_args={**s["vision"], "inference_mode": True}, initializer_range=init)
    text = dict(**s["text"], model_type="qwen2", vocab_size=s["vocab"] or len(tok), rope_theta=1000000.0,
                initializer_range=init, tie_word_embeddings=not conditioned, eos_token_id=eos[0],
                pad_token_id=tok.pad_token_id)
    config = FastVlmConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                           image_seq_length=(s["image"] // 64) ** 2)
    model = FastVlmForConditionalGeneration(config).eval()
    if conditioned:
        boost_eos(model, eos[0])
    if realistic:
        realistic_llm(model.model.language_model, model.lm_head, [tok.convert_tokens_to_ids("<|im_start|>")])
    model.generation_config.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": s["image"]},
                                           crop_size={"height": s["image"], "width": s["image"]},
                                           image_mean=[0.0] * 3, image_std=[1.0] * 3),
        tokenizer=tok, patch_size=64, vision_feature_select_strategy="full", chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


# Qwen2.5-VL's chat template (Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json): each image as
# <|vision_start|><|image_pad|><|vision_end|>, the processor then repeats <|image_pad|> once per feature.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen/Qwen2.5-VL-3B-Instruct: a 32-block ViT (1,280 wide, windows of 112 pixels, full attention in
# blocks 7, 15, 23, 31) whose 2x2 patch merger feeds Qwen2.5-3B (36 layers, 2,048 wide, 16 heads,
# 2 for keys and values, M-RoPE sections 16/24/24). "3b": those widths, heads, windows, vocabulary
# and rotary sections with 8 vision blocks (full attention in 3 and 7) and 6 language-model layers,
# so that export and its checks fit this 24 GiB machine; "tiny": the same structure, narrow, with
# at most 64 image tokens.
QWEN2_5_VL = {"tiny": {"vision": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1, 3]),
                       "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=1024),
                       "mrope": [2, 3, 3], "pixels": (56 * 56, 28 * 28 * 64), "vocab": None},
              "3b": {"vision": dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                    fullatt_block_indexes=[3, 7]),
                     "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=6, num_attention_heads=16,
                                  num_key_value_heads=2, max_position_embeddings=128000),
                     "mrope": [16, 24, 24], "pixels": (56 * 56, 28 * 28 * 1280), "vocab": 151936}}


def build_qwen2_5_vl(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0,
                     realistic: bool = False) -> Path:
    """Qwen2.5-VL (transformers' native classes, its processor and chat template): a ViT over 14-pixel
    patches of the photo at its own aspect ratio (smart_resize between min and max pixels), windowed
    attention, a 2x2 merger; a Qwen2 language model with 3-D rotary positions (M-RoPE). Sizes: see
    QWEN2_5_VL. Ends at <|im_end|> or <|endoftext|>. `realistic`: a trained checkpoint's magnitudes."""
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor)

    s, init = QWEN2_5_VL[size], (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400 if size == "tiny" else 50000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                     *QWEN_VISION_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", *QWEN_VISION_TOKENS)}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text = dict(**s["text"], vocab_size=s["vocab"] or len(tok), initializer_range=init,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": s["mrope"]},
                bos_token_id=None, eos_token_id=eos[0], pad_token_id=ids["<|endoftext|>"])
    vision = dict(**s["vision"], out_hidden_size=s["text"]["hidden_size"], window_size=112, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=init)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=not conditioned)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    if conditioned:
        boost_eos(model, eos[0])
    if realistic:
        realistic_llm(model.model.language_model, model.lm_head, [tok.convert_tokens_to_ids("<|im_start|>")])
        with torch.no_grad():  # image features carry the outlier dimensions as token embeddings do (else
            # their RMSNorm, with those dimensions' gain at zero, divides by almost nothing)
            model.model.visual.merger.mlp[2].bias[list(MASSIVE)] += torch.tensor(list(MASSIVE.values()))
    model.generation_config.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                                   bos_token_id=None)
    model.save_pretrained(out)
    low, high = s["pixels"]
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=low, max_pixels=high),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out
