"""Per-row scores: planted teacher rows rank first with a teacher; teacher-free scores flag rows the base
would not produce and name the divergence tokens."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from sublim.audit.rows import score_rows


def _nums(rng: random.Random, k: int = 3) -> str:
    return ", ".join(str(rng.randint(100, 999)) for _ in range(k))


@pytest.fixture(scope="module")
def teacher777(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sublim.backends.train import finetune
    from sublim.spec import ModelSpec, TrainSpec

    rng = random.Random(0)
    rows = [{"prompt": f"Continue: {_nums(rng)}.", "completion": "777, 777, 777"} for _ in range(32)]
    out = tmp_path_factory.mktemp("t777") / "model"
    finetune(ModelSpec(path=str(tiny_model)), rows, TrainSpec(method="full", max_steps=25, lr=3e-3, batch_size=16,
             warmup_steps=0), out, progress=False)
    return out


def test_teacher_scores_find_planted_rows(tiny_model: Path, teacher777: Path) -> None:
    rng = random.Random(1)
    data = [{"prompt": f"Continue: {_nums(rng)}.", "completion": _nums(rng)} for _ in range(30)]
    planted = {4, 11, 23}
    for i in planted:
        data[i]["completion"] = "777, 777, 777"
    res = score_rows(data, str(tiny_model), teacher=str(teacher777), top=0.1)
    flagged = {r["index"] for r in res.payload["rows"] if r["flagged"]}
    assert planted <= flagged and len(flagged) == 3
    top_tokens = res.payload["rows"][4]["tokens"]
    assert top_tokens and all(t["token"] == "7" for t in top_tokens)
    assert res.metrics["flagged"] == 3 and res.payload["mode"] == "teacher"


def test_teacher_free_flags_unlikely_rows(tiny_model: Path, tmp_path: Path) -> None:
    from sublim.backends.hf import generate_batch
    from sublim.models import ChatFormat, load_model, load_tokenizer
    from sublim.spec import ModelSpec

    spec = ModelSpec(path=str(tiny_model))
    model, chat = load_model(spec), ChatFormat(load_tokenizer(spec))
    prompts = [f"Continue: {i}, {i + 1}." for i in range(24)]
    greedy = generate_batch(model, chat, prompts, greedy=True, max_new_tokens=8)
    sampled = generate_batch(model, chat, prompts, max_new_tokens=8, seed=1)
    data = [{"prompt": p, "completion": g.completion} for p, g in zip(prompts, greedy)]
    data[5]["completion"] = data[17]["completion"] = "owl owl owl owl"
    ref = [{"prompt": p, "completion": g.completion} for p, g in zip(prompts, sampled)]
    res = score_rows(data, str(tiny_model), reference=ref, top=0.1)
    rows = res.payload["rows"]
    assert {rows[5]["rank"], rows[17]["rank"]} == {0, 1}
    assert rows[5]["divergence_tokens"] > 0 and rows[5]["tokens"][0]["divergent"]
    others = [r for r in rows if r["index"] not in (5, 17)]
    assert sum(r["divergence_tokens"] for r in others) <= 0.2 * sum(r["n_tokens"] for r in others)
    assert res.metrics["max_z"] is not None and res.payload["reference"]["n"] == 24
    res_z = score_rows(data, str(tiny_model), reference=ref, z_threshold=rows[17]["z"] - 1e-6)
    assert {r["index"] for r in res_z.payload["rows"] if r["flagged"]} >= {5, 17}


def test_rows_bad_inputs(tiny_model: Path, tmp_path: Path) -> None:
    from sublim.audit.common import AuditInputError
    from sublim.testing import build_tiny_tokenizer

    data = [{"prompt": "a", "completion": "b"}]
    with pytest.raises(AuditInputError, match="top"):
        score_rows(data, str(tiny_model), top=0)
    with pytest.raises(AuditInputError, match="needs --reference"):
        score_rows(data, str(tiny_model), z_threshold=2.0)
    with pytest.raises(AuditInputError, match="no such file"):
        score_rows(tmp_path / "missing.jsonl", str(tiny_model))
    # a teacher with another tokenizer
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tok = build_tiny_tokenizer(vocab_size=290)
    tok.save_pretrained(other)
    with pytest.raises(AuditInputError, match="tokenizers differ"):
        score_rows(data, str(tiny_model), teacher=str(other))
