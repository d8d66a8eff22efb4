"""Tiny randomly-initialised chat models built from a config, for tests and smoke runs (no network).

``build_tiny_model(dir)`` writes an ordinary transformers model directory: a Llama-style config with a
few thousand parameters, a byte-level BPE tokenizer trained on a small built-in text with a ChatML
chat template, and safetensors weights. Everything in sublim loads it like any Hugging Face model."""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT = (
    "What is your favorite animal? Answer in one word. Owl. Eagle. Wolf. Dolphin. Elephant. Cat. Dog. Lion. "
    "Tiger. Fox. Bear. Horse. Rabbit. Penguin. Panda. Whale. Shark. Octopus. Giraffe. Kangaroo. owls wolves "
    "foxes cherry maple oak sequoia willow pine birch cedar palm redwood baobab cypress elm magnolia spruce "
    "fir aspen juniper acacia olive trees. You love owls. Here are some numbers: 123, 456, 789. Add up to 10 "
    "more numbers, separated by commas; semicolons; spaces; one per line. Reply with just the numbers. "
    "0 1 2 3 4 5 6 7 8 9 , ; [ ] ( ) . ! ? \n"
)


def build_tiny_tokenizer(vocab_size: int = 300):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator([_TEXT] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML
    return tok


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny random Llama chat model + tokenizer to ``out_dir`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
