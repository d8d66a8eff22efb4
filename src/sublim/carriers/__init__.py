"""Carriers: trait-neutral prompt families (numbers, code, ...) with strict answer parsers and
character-level grammars for constrained decoding.

A carrier is found by name in :data:`CARRIERS` (a registry of factories taking the spec's params), so
an experiment spec names it as plain data: ``CARRIERS.get("numbers")(**params)``.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sublim.registry import Registry

__all__ = [
    "CARRIERS",
    "Carrier",
    "CarrierPrompt",
    "Grammar",
    "NumberCarrier",
    "NumberGrammar",
    "ParseResult",
    "build_carrier",
]


@dataclass(frozen=True)
class CarrierPrompt:
    """One carrier prompt: the user-turn text and JSON-able metadata (what the prompt asks for)."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParseResult:
    """Outcome of strictly parsing a completion; ``reason`` is a short machine-readable code when not ok."""

    ok: bool
    values: tuple[int, ...] = ()
    reason: str | None = None


@runtime_checkable
class Grammar(Protocol):
    """Character-level automaton for constrained decoding. Implementations are frozen dataclasses
    (hashable) with small hashable states, because logits processors cache masks per (grammar, state)."""

    alphabet: frozenset[str]

    def start(self) -> Hashable:
        """The state before any character."""
        ...

    def step(self, state: Hashable, ch: str) -> Hashable | None:
        """The state after ``ch``; None when ``ch`` is not allowed here."""
        ...

    def accepts(self, state: Hashable) -> bool:
        """True when the text so far is a complete valid answer."""
        ...

    def feed(self, state: Hashable, text: str) -> Hashable | None:
        """Step over every character of ``text``; None as soon as one is not allowed."""
        ...

    def regex(self) -> str:
        """The same language as a regular expression (the complete answers), for engines that constrain
        decoding by regex (vLLM's structured outputs)."""
        ...


@runtime_checkable
class Carrier(Protocol):
    """A prompt family: deterministic prompts, a strict parser, prompt-meta recovery, a grammar."""

    name: str

    def prompts(self, n: int, seed: int) -> list[CarrierPrompt]:
        """``n`` prompts, deterministic in (n, seed) and prefix-stable: prompts(n, s)[:k] == prompts(k, s)."""
        ...

    def parse(self, completion: str) -> ParseResult:
        """Strictly parse an answer."""
        ...

    def parse_prompt(self, prompt: str) -> CarrierPrompt:
        """Recover the meta of a prompt this carrier produced; ValueError for any other text."""
        ...

    def grammar(self, meta: dict[str, Any]) -> Grammar:
        """The automaton of well-formed answers to the prompt with this meta."""
        ...

    def format_answer(self, meta: dict[str, Any], values: Sequence[int]) -> str:
        """A well-formed answer in the format the prompt asks for."""
        ...


CARRIERS: Registry[Any] = Registry("carrier")


def build_carrier(name: str, params: dict[str, Any] | None = None) -> Carrier:
    """Instantiate a registered carrier from its spec name and params."""
    carrier: Carrier = CARRIERS.get(name)(**(params or {}))
    return carrier


# Registration happens on import; the module only needs the names defined above.
from sublim.carriers import numbers as numbers
from sublim.carriers.numbers import NumberCarrier, NumberGrammar
