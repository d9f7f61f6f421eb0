"""The captioner's tokenizer: byte-level BPE trained in memory on the target sentences.

Byte-level BPE decodes any token sequence back to exact text, and the runtime
reads the saved `tokenizer.json` with the `tokenizers` library alone.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_tokenizer(sentences, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"pad_id": tok.token_to_id(PAD), "bos_id": tok.token_to_id(BOS), "eos_id": tok.token_to_id(EOS)}
