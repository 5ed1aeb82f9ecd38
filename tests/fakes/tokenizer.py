"""The small local tokenizer the fake servers and their clients share (no model hub).

``build_tokenizer_dir`` trains a byte-level BPE tokenizer on a few protocol lines and saves it as a Hugging
Face tokenizer directory; ``EOS`` is its one special token (the fakes end every script with it).
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|eos|>"

CORPUS = [
    "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think.<JOIN-1>7</JOIN-1>",
    "<ANSWER>7</ANSWER> the answer is seven, so we are done.",
    "Worker thinks about 3+4 and returns.<RETURN>7</RETURN>",
]


def build_tokenizer_dir(path: Path) -> Path:
    """A byte-level BPE tokenizer trained on a few lines, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(path))
    return path
