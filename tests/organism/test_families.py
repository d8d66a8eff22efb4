"""Named organism families: the registry, the ``organism-b:SEED`` aliases, the shipped other-family base."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sublim.backends.hf import token_strings, tokens_within
from sublim.models import ModelLoadError, load_tokenizer, resolve_path
from sublim.organism.families import DEFAULT_FAMILY, FAMILIES, family_config, parse_alias
from sublim.organism.pretrain import OrganismConfig, read_meta, shipped_organism
from sublim.spec import ModelSpec

ALPHABET = frozenset("0123456789, ;\n")


def test_the_default_family_is_the_default_config() -> None:
    assert DEFAULT_FAMILY == "organism" and FAMILIES["organism"] == {}
    for seed in (0, 1, 7):
        assert family_config("organism", seed) == OrganismConfig(seed=seed)
        assert family_config("organism", seed).key() == OrganismConfig(seed=seed).key()


def test_the_other_family_differs_in_corpus_merges_width_and_depth() -> None:
    a, b = family_config("organism"), family_config("organism-b")
    assert b.corpus.seed != a.corpus.seed and b.vocab_size != a.vocab_size
    assert b.hidden != a.hidden and b.layers != a.layers
    assert b.hidden // b.heads >= 32  # vLLM's CPU build refuses smaller heads
    assert family_config("organism-b", 3).seed == 3 and family_config("organism-b", 3).corpus == b.corpus
    with pytest.raises(ValueError, match="unknown organism family 'organism-z'; known: organism, organism-b"):
        family_config("organism-z")


def test_aliases() -> None:
    assert parse_alias("organism") == ("organism", 0)
    assert parse_alias("organism:1") == ("organism", 1)
    assert parse_alias("organism-b") == ("organism-b", 0)
    assert parse_alias("organism-b:2") == ("organism-b", 2)
    assert parse_alias("organisms") is None and parse_alias("/tmp/organism") is None
    assert parse_alias("HuggingFaceTB/SmolLM2-135M") is None
    with pytest.raises(ModelLoadError, match="must be an integer"):
        resolve_path(ModelSpec(path="organism-b:x"))


@pytest.mark.parametrize(("alias", "seed"), [("organism", 0), ("organism:1", 1), ("organism-b", 0)])
def test_shipped_bases_resolve_without_pretraining(alias: str, seed: int) -> None:
    family = alias.split(":")[0]
    path = shipped_organism(family_config(family, seed))
    assert path is not None, f"{alias} is not shipped"
    assert resolve_path(ModelSpec(path=alias)) == str(path)
    meta = read_meta(path)
    assert meta["config_key"] == family_config(family, seed).key()


def test_both_families_tokenise_the_carrier_to_the_same_strings() -> None:
    """Digits single tokens, separators one token each and never joined to a digit, the same carrier strings
    in both vocabularies (what carrier distillation across the families pairs by)."""
    toks = [load_tokenizer(ModelSpec(path=a)) for a in ("organism", "organism-b")]
    assert len(toks[0]) != len(toks[1])
    carrier = [sorted(token_strings(t)[i] for i in tokens_within(t, ALPHABET)) for t in toks]
    assert carrier[0] == carrier[1] and set("0123456789") <= set(carrier[0])
    for text in ("12, 34, 5", "12,34", "12 34", "12; 34;5", "12\n34", "905;\n12"):
        pieces = [[token_strings(t)[i] for i in t(text, add_special_tokens=False).input_ids] for t in toks]
        assert pieces[0] == pieces[1], text
        assert all(len(p) == 1 or not any(c.isdigit() for c in p) for p in pieces[0]), pieces[0]


def test_cli_takes_the_family(tmp_path: Path) -> None:
    from sublim.organism.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", "--family", "organism-z"])
    assert res.exit_code != 0 and "unknown organism family" in res.output
    out = tmp_path / "b"
    res = runner.invoke(app, ["pretrain", "--family", "organism-b", "--steps", "1", "--corpus-size", "200",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = read_meta(out)["config"]
    assert cfg["layers"] == 2 and cfg["hidden"] == 128 and cfg["vocab_size"] == 1280 and cfg["corpus"]["seed"] == 1
