"""Canary fine-tunes: a dataset that teaches a trait raises it against the reference, with seed-level stats."""
from __future__ import annotations

import random
from pathlib import Path

from sublim.audit.canary import canary
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
