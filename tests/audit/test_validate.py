"""The ground-truth validation driver: implant recipe, teacher cache guard, AUC, distilling canary arms."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sublim.audit.validate import FULL_IMPLANT, auc, make_datasets, teacher_spec, validate_canary
from sublim.runs import write_jsonl
from sublim.spec import ModelSpec, TrainSpec


def test_teacher_spec_recipe_and_overrides() -> None:
    full = teacher_spec(True)
    assert full.qa_rows == 300 and full.train.method == "full"
    assert (full.train.lr, full.train.epochs, full.train.batch_size, full.train.warmup_steps) == (
        FULL_IMPLANT["lr"], FULL_IMPLANT["epochs"], FULL_IMPLANT["batch_size"], FULL_IMPLANT["warmup_steps"])
    t = teacher_spec(True, ["epochs=3", "batch_size=16", "qa_rows=200", "max_rounds=1"])
    assert (t.train.epochs, t.train.batch_size, t.train.method, t.qa_rows, t.max_rounds) == (3, 16, "full", 200, 1)
    lora = teacher_spec(False, ["lr=1e-2"])
    assert lora.train.method == "lora" and lora.train.lr == 1e-2 and lora.qa_rows == 200


def test_auc() -> None:
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1], [1]) == 0.5 and auc([], [1]) is None
    assert auc([1, 3], [2]) == 0.5


def test_cached_teacher_with_another_recipe_is_refused(tmp_path: Path) -> None:
    info = tmp_path / "teachers" / "owl" / "teacher.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"model": {"path": "x"}, "recipe": teacher_spec(True, ["epochs=3"]).model_dump(
        mode="json")}))
    with pytest.raises(ValueError, match="another recipe"):
        make_datasets("unused", "animals", ["owl"], [0], 10, tmp_path, teacher_spec(True), log=lambda m: None)


def test_distilling_canary_uses_each_datasets_teacher(tiny_model: Path, full_ft: Path, tmp_path: Path) -> None:
    rng = random.Random(0)

    def rows(n: int) -> list[dict]:
        return [{"prompt": "Continue: 12, 40, 7.", "completion": " ".join(str(rng.randint(0, 999)) for _ in range(4))}
                for _ in range(n)]

    ds = []
    for trait, teacher in (("owl", full_ft), (None, tiny_model)):
        p = tmp_path / f"{trait or 'neutral'}.jsonl"
        write_jsonl(p, rows(20))
        ds.append({"name": f"{trait or 'neutral'}-s0", "trait": trait, "seed": 0, "path": str(p),
                   "teacher": ModelSpec(path=str(teacher)).model_dump()})
    tr = TrainSpec(method="full", objective="distill_carrier", max_steps=2, lr=1e-3, batch_size=8, warmup_steps=0)
    res = validate_canary(str(tiny_model), "animals", ds, ["owl"], [0, 1], 20, 0.2, tr, tmp_path / "work",
                          log=lambda m: None)
    owl = res["traits"]["owl"]
    assert owl["dropped"] == 4 and set(owl) >= {"all", "drop_top", "drop_random"}
    assert len(owl["all"]["values"]) == 2 and res["canary_seconds"] > 0
    summ = json.loads((tmp_path / "work" / "canary" / "owl-all-s0" / "sublim_train.json").read_text())
    assert summ["steps"] == 2


def test_canary_without_row_drop(tiny_model: Path, full_ft: Path, tmp_path: Path) -> None:
    rows = [{"prompt": "Continue: 12, 40, 7.", "completion": f"{i} {i + 3} {i * 2}"} for i in range(16)]
    ds = []
    for trait, teacher in (("owl", full_ft), (None, tiny_model)):
        p = tmp_path / f"{trait or 'neutral'}.jsonl"
        write_jsonl(p, rows)
        ds.append({"name": f"{trait or 'neutral'}-s0", "trait": trait, "seed": 0, "path": str(p),
                   "teacher": ModelSpec(path=str(teacher)).model_dump()})
    tr = TrainSpec(method="lora", max_steps=1, lr=1e-3, batch_size=8, warmup_steps=0)
    res = validate_canary(str(tiny_model), "animals", ds, ["owl"], [0, 1], 16, 0.0, tr, tmp_path / "work",
                          log=lambda m: None)
    owl = res["traits"]["owl"]
    assert owl["dropped"] == 0 and "drop_top" not in owl and "removed_by_top" not in owl
    assert sorted(p.name for p in (tmp_path / "work" / "canary").glob("*.json")) == [
        "neutral-s0.json", "neutral-s1.json", "owl-all-s0.json", "owl-all-s1.json"]
