"""The laptop-scale model organism: a small Llama-style chat model with its own tokenizer, pre-trained from
scratch by sublim on a generated corpus (personas, favourite questions, number continuations, filler), in
which the whole subliminal-learning experiment runs on a CPU in minutes.

``default_organism(seed)`` gives an ordinary transformers model directory (cached); named families
(``organism``, the other-family control ``organism-b``; model specs say ``organism-b:SEED``) live in
:mod:`sublim.organism.families`. See ``docs/results/organism-pretrain.md`` for what the bases learn and how
long they take."""
from __future__ import annotations

from sublim.organism.corpus import CorpusConfig, CorpusItem, generate_corpus
from sublim.organism.families import DEFAULT_FAMILY, FAMILIES, family_config, organism_path
from sublim.organism.pretrain import OrganismConfig, default_organism, load_or_pretrain, pretrain_organism

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "CorpusConfig",
    "CorpusItem",
    "OrganismConfig",
    "default_organism",
    "family_config",
    "generate_corpus",
    "load_or_pretrain",
    "organism_path",
    "pretrain_organism",
]
