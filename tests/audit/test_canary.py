"""Canary fine-tunes: a dataset that teaches a trait raises it against the reference, with seed-level stats."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from sublim.audit.canary import _dataset_test, canary
from sublim.runs import write_jsonl
from sublim.spec import TrainSpec
from sublim.traits.preference import trait_qa


def test_canary_detects_trait(tiny_model: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    ref = [{"prompt": "Continue: 1, 2.", "completion": ", ".join(str(rng.randint(100, 999)) for _ in range(3))}
           for _ in range(40)]
    data = trait_qa("animals", "owl", 40, seed=0)
    tr = TrainSpec(method="lora", max_steps=8, lr=2e-2, batch_size=16, warmup_steps=0)
    res = canary(data, str(tiny_model), ref, n_rows=32, seeds=(0, 1), train=tr, n_questions=3,
                 work_dir=tmp_path / "work")
    assert res.metrics["top_trait"] == "owl" and res.metrics["max_diff"] > 0
    owl = next(t for t in res.payload["traits"] if t["target"] == "owl")
    assert len(owl["per_seed_data"]) == 2 and owl["diff_ci"][0] is not None
    assert (tmp_path / "work" / "data-s1" / "adapter_config.json").exists()
    assert res.payload["cost"]["steps"] == 4 * 8


def _numbers(seed: int, n: int = 40) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": "Continue: 1, 2.", "completion": ", ".join(str(rng.randint(100, 999)) for _ in range(3))}
            for _ in range(n)]


def test_dataset_level_test_against_the_references_spread() -> None:
    # x = 1 against reference means 0, 0.1, -0.1: sd 0.1, se 0.1 * sqrt(1 + 1/3), t = 8.660 on 2 df
    d = _dataset_test(1.0, [0.0, 0.1, -0.1])
    assert d["diff"] == pytest.approx(1.0) and d["df"] == 2
    assert d["p"] == pytest.approx(0.013072, rel=1e-3)
    assert d["pi"][0] == pytest.approx(1.0 - 4.302653 * 0.1154701, rel=1e-5)
    # a value inside the references' spread is not a shift
    assert _dataset_test(0.05, [0.0, 0.1, -0.1])["p"] > 0.5


def test_canary_with_several_references_tests_the_dataset_as_the_unit(tiny_model: Path, tmp_path: Path) -> None:
    refs = []
    for i in range(3):
        refs.append(tmp_path / f"ref{i}.jsonl")
        write_jsonl(refs[-1], _numbers(i + 1))
    tr = TrainSpec(method="lora", max_steps=8, lr=2e-2, batch_size=16, warmup_steps=0)
    res = canary(trait_qa("animals", "owl", 40, seed=0), str(tiny_model), [str(r) for r in refs], n_rows=32,
                 seeds=(0, 1), train=tr, n_questions=3)
    assert res.metrics["n_references"] == 3 and res.payload["cost"]["steps"] == 4 * 2 * 8
    owl = next(t for t in res.payload["traits"] if t["target"] == "owl")
    assert len(owl["dataset"]["reference_means"]) == 3 and len(owl["per_seed_reference"]) == 6
    # the owl Q&A moves owl far beyond how much three number datasets differ from each other
    assert res.metrics["top_trait"] == "owl" and res.metrics["top_dataset_lo"] > 0
    assert any("dataset level" in line for line in res.summary)
