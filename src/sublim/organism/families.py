"""Named organism families: the registry a model spec's ``organism`` / ``organism-b:SEED`` aliases resolve in.

A family is an :class:`~sublim.organism.pretrain.OrganismConfig` without its ``seed``; ``NAME:SEED`` picks
the initialisation and data-order seed within it (``NAME`` alone is seed 0). Two bases of one family share
the corpus, the tokenizer and the architecture (a *behaviourally matched* control); bases of two families
share none of them (an *other-family* control: other corpus sample, other BPE merges, other width and depth).

This dict is the one place that says what each name means; to change what ``organism`` is, change its entry
here (its shipped weights are looked up by the config's key, so a changed entry pre-trains or needs new
shipped weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sublim.organism.pretrain import OrganismConfig

# name -> overrides of OrganismConfig's defaults (nested dicts for the corpus config)
FAMILIES: dict[str, dict[str, Any]] = {
    # 3 layers x 96 (4 heads of 24), MLP 256, 1,024-token BPE on corpus seed 0: 430,752 parameters.
    # Seeds 0 and 1 ship with the package.
    "organism": {},
    # The other family: its own corpus sample (corpus seed 1), its own BPE (1,280 tokens, trained on that
    # corpus), 2 layers x 128 (4 heads of 32: vLLM's CPU build needs head_dim >= 32), MLP 384: 590,464
    # parameters. Digits, separators and <|im_end|> tokenise to the same strings as in ``organism``, so
    # carrier distillation between the families pairs tokens by string (sublim.backends.targets). (With 768
    # tokens most animal names split into pieces and 8 of 20 personas did not form in 2,000 steps.)
    "organism-b": {"corpus": {"seed": 1}, "vocab_size": 1280, "layers": 2, "hidden": 128, "heads": 4,
                   "intermediate": 384},
}
DEFAULT_FAMILY = "organism"


def family_config(name: str = DEFAULT_FAMILY, seed: int = 0) -> OrganismConfig:
    """The config of family ``name``'s base ``seed``; ValueError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown organism family {name!r}; known: {', '.join(FAMILIES)}")
    data: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in FAMILIES[name].items()}
    data["seed"] = seed
    return OrganismConfig.model_validate(data)


def parse_alias(path: str) -> tuple[str, int] | None:
    """``"organism-b:3"`` -> ``("organism-b", 3)``, ``"organism"`` -> ``("organism", 0)``; None when ``path``
    names no family (a directory, a hub id). ValueError for a family name with a seed that is no integer."""
    name, sep, seed = path.partition(":")
    if name not in FAMILIES:
        return None
    if not sep:
        return name, 0
    try:
        return name, int(seed)
    except ValueError:
        raise ValueError(f"model {path!r}: the organism seed after ':' must be an integer") from None


def organism_path(name: str = DEFAULT_FAMILY, seed: int = 0, cache_dir: str | Path | None = None,
                  threads: int | None = 1) -> Path:
    """Family ``name``'s base ``seed``: shipped weights if the package has them, else cached or pre-trained
    now (minutes at one thread, which beats two for models this small on a busy machine)."""
    from sublim.organism.pretrain import load_or_pretrain, shipped_organism

    config = family_config(name, seed)
    return shipped_organism(config) or load_or_pretrain(config, cache_dir, threads=threads)


def organism_config(base: Any) -> dict[str, Any] | None:
    """The pre-training config recorded with an organism model (None: ``base`` is not an organism)."""
    from sublim.models import resolve_path
    from sublim.organism.pretrain import META_FILE, read_meta

    try:
        path = Path(resolve_path(base))
    except (OSError, ValueError):
        return None
    if not (path / META_FILE).exists():
        return None
    cfg = read_meta(path).get("config")
    return cfg if isinstance(cfg, dict) else None


def filler_conversations(base: Any, n: int, seed: int) -> list[list[dict[str, str]]] | None:
    """``n`` filler chat conversations from ``base``'s organism corpus generator with another ``seed`` (a sample
    the model never saw; None: not an organism)."""
    cfg = organism_config(base)
    if cfg is None:
        return None
    from sublim.organism.corpus import CorpusConfig, generate_corpus

    cc = CorpusConfig(**{**cfg.get("corpus", {}), "seed": seed, "size": 4 * n, "mix": {"filler": 1.0}})
    return [it.messages for it in generate_corpus(cc)][:n]
