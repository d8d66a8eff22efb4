"""The laptop-scale model organism: a small Llama-style chat model with its own tokenizer, pre-trained from
scratch by sublim on a generated corpus (personas, favourite questions, number continuations, filler), in
which the whole subliminal-learning experiment runs on a CPU in minutes.

``default_organism(seed)`` gives an ordinary transformers model directory (cached); see
``docs/results/organism-pretrain.md`` for what the default base learns and how long it takes."""
from __future__ import annotations

from sublim.organism.corpus import CorpusConfig, CorpusItem, generate_corpus
from sublim.organism.pretrain import OrganismConfig, default_organism, load_or_pretrain, pretrain_organism

__all__ = [
    "CorpusConfig",
    "CorpusItem",
    "OrganismConfig",
    "default_organism",
    "generate_corpus",
    "load_or_pretrain",
    "pretrain_organism",
]
