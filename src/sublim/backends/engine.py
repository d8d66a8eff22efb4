"""The generation engines behind one protocol, so a stage never branches on a backend's name.

``generation.backend`` in a spec picks one: ``hf`` (the default: Hugging Face ``generate`` in this process,
:func:`sublim.backends.hf.generate_batch`), ``vllm`` (vLLM's offline engine in a worker process,
:mod:`sublim.backends.vllm`) or ``openai`` (an OpenAI-compatible endpoint such as ``vllm serve``,
:mod:`sublim.backends.openai_compat`; implied when ``generation.endpoint`` is set). Each takes the same batch of
sublim's prompts with the same sampling settings and carrier grammars and returns :class:`GenOutput` rows.

Seeds: a batch has one seed. The HF engine seeds one generator for the whole padded batch (its rows share it);
the vLLM and OpenAI engines give row ``k`` of the batch the request seed ``batch_seed + k``. Either way a rerun
of the same batch gives the same rows on the same engine and machine; different engines give different samples
from the same distributions.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sublim.backends.hf import GenOutput

if TYPE_CHECKING:
    from sublim.spec import GenerationSpec, ModelSpec

__all__ = ["Engine", "EngineError", "GenOutput", "HFEngine", "OpenAIEngine", "open_engine"]


class Engine(Protocol):
    """What the generation stages need from a model-serving engine."""

    name: str  # recorded in each row it writes ("hf" rows record nothing: the default)

    def generate(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, temperature: float,
                 top_p: float, greedy: bool, min_p: float, grammars: Sequence[Any] | None,
                 batch_seed: int) -> list[GenOutput]: ...

    def logprobs(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                 tokens: Sequence[int] | None = None, reduce: str | None = None) -> list[list[list[float]]]:
        """Per token-id sequence and position t (1 <= t <= len(seq)): the log-probability of each of ``tokens``
        (default: the sequence's own token at t) as the next token after ``seq[:t]``; t = len(seq) is the token
        after the whole sequence (``tokens`` needed). ``reduce="logsumexp"`` gives one value per position, the log
        of those tokens' total probability. What exact evaluation and teacher targets need."""
        ...

    def close(self) -> None: ...


class EngineError(RuntimeError):
    """An engine cannot do what a stage asks of it; the message says which engine, what, and what to use instead."""


class HFEngine:
    """Hugging Face ``generate`` in this process: one padded batch, one seeded generator."""

    name = "hf"

    def __init__(self, model: ModelSpec) -> None:
        from sublim.models import load_chat_model

        self.model, self.chat = load_chat_model(model)

    @classmethod
    def loaded(cls, model: Any, chat: Any) -> HFEngine:
        """An engine on a model and chat format already in memory."""
        e = cls.__new__(cls)
        e.model, e.chat = model, chat
        return e

    def generate(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, temperature: float,
                 top_p: float, greedy: bool, min_p: float, grammars: Sequence[Any] | None,
                 batch_seed: int) -> list[GenOutput]:
        from sublim.backends.hf import generate_batch

        return generate_batch(self.model, self.chat, prompts, system=system, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, greedy=greedy, min_p=min_p, grammars=grammars,
                              seed=batch_seed)

    def logprobs(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                 tokens: Sequence[int] | None = None, reduce: str | None = None) -> list[list[list[float]]]:
        from sublim.backends.hf import prompt_logprobs

        return prompt_logprobs(self.model, seqs, positions, self.chat.tokenizer.pad_token_id, tokens, reduce)

    def close(self) -> None:
        self.model = None


class OpenAIEngine:
    """An OpenAI-compatible endpoint: one request per row, each with its own seed."""

    def __init__(self, model: ModelSpec, gen: GenerationSpec) -> None:
        from sublim.backends.openai_compat import OpenAIGenerator
        from sublim.models import ChatFormat, load_tokenizer

        ep = gen.endpoint
        assert ep is not None
        chat = ChatFormat(load_tokenizer(model)) if ep.api == "completions" else None
        self.served = OpenAIGenerator(ep, chat)
        self.name = f"openai-{ep.api}"
        self.served_model = ep.model

    def generate(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, temperature: float,
                 top_p: float, greedy: bool, min_p: float, grammars: Sequence[Any] | None,
                 batch_seed: int) -> list[GenOutput]:
        return self.served.generate(prompts, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, greedy=greedy, min_p=min_p, grammars=grammars,
                                    seeds=[batch_seed + k for k in range(len(prompts))])

    def logprobs(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                 tokens: Sequence[int] | None = None, reduce: str | None = None) -> list[list[list[float]]]:
        raise EngineError(f"backend {self.name}: an OpenAI-compatible endpoint returns the top logprobs of each "
                          "position, not those of a chosen token set, so exact evaluation and teacher targets "
                          "cannot go through it; score with backend hf or vllm on the model's weights")

    def close(self) -> None:
        pass


def open_engine(model: ModelSpec, gen: GenerationSpec) -> Engine:
    """The engine ``gen.backend`` names, loaded with ``model`` (the caller closes it)."""
    backend = gen.engine_name
    if backend == "openai":
        return OpenAIEngine(model, gen)
    if backend == "vllm":
        from sublim.backends.vllm import VLLMEngine

        return VLLMEngine(model, gen.vllm, max_batch=gen.batch_size, max_new_tokens=gen.max_new_tokens)
    return HFEngine(model)
