"""A small byte-level BPE tokenizer, trained locally, shaped for the AsyncThink protocol.

Design (why each piece is there):

- **Byte-level BPE**: every byte is in the base alphabet, so any text round-trips:
  ``decode(encode(text)) == text`` for every NFC-normalised string (see the last point for why NFC).
- **Tag heads are added tokens** (regular, not special): ``<FORK-``, ``</FORK-``, ``<JOIN-``, ``</JOIN-``,
  ``<ANSWER>``, ``</ANSWER>``, ``<RETURN>``, ``</RETURN>``. They are cut out of the text before BPE runs,
  so a tag head is always one token and always a token boundary, and ``decode`` writes them back
  verbatim (``skip_special_tokens`` leaves them in, because they are not special).
- **``<``, ``>`` and ``@`` are always tokens of their own**: the tokenizer is trained with these
  characters split off, so no merge rule contains them and BPE can never join them with a neighbour.
  A tag's closing ``>`` therefore always ends a token, and a stop pattern such as ``</FORK-\\d+>`` ends
  on a token boundary.
- **Digits are single tokens** (the pre-tokenizer splits every digit), so ``<FORK-12>`` is ``<FORK-``
  ``1`` ``2`` ``>`` and countdown arithmetic never sees multi-digit merges.
- Special tokens ``<|endoftext|>`` (EOS), ``<|bos|>``, ``<|pad|>``; nothing is added on ``encode``.
- **The saved pipeline is exactly Qwen2's** (NFC normaliser, Qwen2's split regex, byte-level). In
  transformers 5 ``AutoTokenizer`` on a directory whose ``config.json`` says ``qwen2`` ignores the
  pipeline in ``tokenizer.json`` and rebuilds Qwen2's fixed one from the vocabulary and merges; SGLang
  and TRL load tokenizers that way. Saving Qwen2's pipeline (and naming EOS ``<|endoftext|>``, Qwen2's
  default) makes every loader tokenize identically. The cost is NFC: a decomposed accent in the input
  is composed by ``encode``; generated ids always decode exactly.

Limits: the merges come from whatever corpus is given; :func:`default_corpus` is a few hundred lines of
synthetic text, good for tests and for a first small model, not a substitute for real training data.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
# Tag heads: each is one regular token. The rest of a tag (digits, "@endpoint", ">") is ordinary text.
TAG_TOKENS = ("<FORK-", "</FORK-", "<JOIN-", "</JOIN-", "<ANSWER>", "</ANSWER>", "<RETURN>", "</RETURN>")
# Qwen2's pre-tokenizer regex (contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces), taken from transformers so it always equals what its
# Qwen2Tokenizer rebuilds.
QWEN2_SPLIT_REGEX: str = PRETOKENIZE_REGEX
_ISOLATED = r"[<>@]"  # split off while training only, so that no merge rule contains these characters


def _pre_tokenizer(*, training: bool) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if training:
        steps.append(pre_tokenizers.Split(Regex(_ISOLATED), behavior="isolated"))
    steps.append(pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _build_pipeline() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(training=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``; save it to ``out_dir`` when given.

    ``vocab_size`` counts the 256 byte symbols, the special tokens and the merges; it must leave room
    for the base alphabet. The result loads offline with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS) + len(TAG_TOKENS)
    if vocab_size < base:
        raise ValueError(
            f"vocab_size must be at least {base} (bytes + special + tag tokens), got {vocab_size}"
        )
    tok = _build_pipeline()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),  # the tag tokens are added after training
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.pre_tokenizer = _pre_tokenizer(training=False)  # Qwen2's: see the module docstring
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


# ------------------------------------------------------------------------------------------ corpus
_OPS = ("+", "-", "*", "/")
_THINK = (
    "Let me split the search into independent parts.",
    "I will try the large numbers first.",
    "Two workers can explore different operators at once.",
    "Check the result before answering.",
    "First, look at the target and the closest product.",
    "This branch looks promising, wait for it.",
    "Combine what the workers found.",
)


def _apply(op: str, x: float, y: float) -> float:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y if y else 0.0


def _countdown(rng: random.Random) -> tuple[list[int], int, str]:
    nums = [rng.randint(1, 99) for _ in range(4)]
    a, b, c, d = nums
    op1, op2, op3 = (rng.choice(_OPS) for _ in range(3))
    expr = f"({a} {op1} {b}) {op2} ({c} {op3} {d})"
    value = _apply(op2, _apply(op1, a, b), _apply(op3, c, d))
    target = int(value) if float(value).is_integer() else rng.randint(10, 100)
    return nums, target, expr


def _sudoku(rng: random.Random) -> str:
    base = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    perm = list(range(1, 5))
    rng.shuffle(perm)
    rows = [[perm[v - 1] if rng.random() > 0.4 else 0 for v in row] for row in base]
    return "\n".join(" ".join(str(v) if v else "." for v in row) for row in rows)


def default_corpus(n: int = 400, seed: int = 0) -> Iterator[str]:
    """Protocol-shaped synthetic text: organizer and worker traces, countdown, sudoku and math lines.

    Deterministic for a given ``seed``; enough to train a tokenizer with no data on disk.
    """
    rng = random.Random(seed)
    for i in range(n):
        kind = i % 6
        nums, target, expr = _countdown(rng)
        listed = ", ".join(map(str, nums))
        if kind == 0:  # organizer trace
            k = rng.randint(1, 3)
            parts = [f"Numbers: {listed}. Target: {target}. {rng.choice(_THINK)}"]
            for j in range(1, k + 1):
                parts.append(
                    f"<FORK-{j}>Find expressions for {target} using {listed} with {rng.choice(_OPS)}</FORK-{j}>"
                )
            parts.append(rng.choice(_THINK))
            for j in range(1, k + 1):
                parts.append(f"<JOIN-{j}>{expr} = {target}</JOIN-{j}>")
            parts.append(f"<ANSWER>{expr}</ANSWER>")
            yield " ".join(parts)
        elif kind == 1:  # worker trace
            yield (
                f"Sub-query: reach {target} from {listed}. {rng.choice(_THINK)} "
                f"{nums[0]} {rng.choice(_OPS)} {nums[1]} = {rng.randint(0, 200)}. "
                f"<RETURN>{expr} = {target}</RETURN>"
            )
        elif kind == 2:  # countdown problem and answer
            yield f"Using the numbers [{listed}], create an equation that equals {target}. Answer: {expr}"
        elif kind == 3:  # sudoku
            grid = _sudoku(rng)
            yield f"Solve the 4x4 Sudoku:\n{grid}\n<FORK-1>Fill row 1 of\n{grid}</FORK-1> <JOIN-1>row 1 done</JOIN-1>"
        elif kind == 4:  # math
            x, y = rng.randint(2, 50), rng.randint(2, 50)
            yield (
                f"Let x = {x} and y = {y}. Then x^2 + y^2 = {x * x + y * y} and x*y = {x * y}. "
                f"So (x + y)^2 = {(x + y) ** 2}. <ANSWER>\\boxed{{{(x + y) ** 2}}}</ANSWER>"
            )
        else:  # the endpoint extension and recursive forks
            yield (
                f"<FORK-{i % 7 + 1}@python>print({expr})</FORK-{i % 7 + 1}> {rng.choice(_THINK)} "
                f"<JOIN-{i % 7 + 1}>{target}</JOIN-{i % 7 + 1}> The answer is <ANSWER>{target}</ANSWER>"
            )
