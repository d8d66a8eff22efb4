"""The organism's tokenizer: a byte-level BPE trained on the organism's own corpus.

* Byte-level (GPT-2 style): any text encodes, ``decode(encode(text)) == text`` exactly, and every token
  decodes to its own surface string with its leading space (``" owl"``), which the constrained
  decoder relies on when it decodes single tokens.
* Every digit is its own token, so every number is a sequence of digit tokens (as in Llama-3 / Qwen).
  One punctuation character followed by a space before a digit (``", "`` in ``"12, 34"``) is a single
  pre-token, so a separator costs one token, not two (a 10-number answer is ~40 tokens).
* Special tokens ``<|im_start|>``, ``<|im_end|>`` (eos, end of turn) and ``<|pad|>``; a ChatML chat
  template with no default system line and no date.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]  # ids 0, 1, 2

# ChatML; messages rendered as-is (no injected system line, no date); the generation prompt opens an
# assistant turn. ``\n`` after <|im_end|> separates turns (it is never a training target).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GPT-2's split pattern with two changes: digits are single pre-tokens (\p{N}, no leading space), and a
# punctuation character + space right before a digit stays together (", " in number lists).
SPLIT_PATTERN = (
    r"[^\s\p{L}\p{N}] (?=\p{N})"
    r"|'s|'t|'re|'ve|'m|'ll|'d"
    r"| ?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Python twin of :data:`CHAT_TEMPLATE` (used before the tokenizer exists, e.g. to train it)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train the byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
