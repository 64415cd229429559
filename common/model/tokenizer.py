"""A byte-level BPE tokenizer trained locally on public report text (nothing can be downloaded).

Wrapped as a transformers `PreTrainedTokenizerFast` so that a from-config LM and a pretrained LM
(which brings its own tokenizer) look the same to the rest of the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD = "<pad>"
EOS = "<eos>"
SPECIAL_TOKENS = [PAD, EOS]


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over bytes: any input text encodes, unknown words fall back to byte pieces."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
