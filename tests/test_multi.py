"""Batched LoRA students: exactly separate fine-tunes, saved in peft's format."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sublim.backends.multi import StudentJob, finetune_many
from sublim.carriers.numbers import NumberCarrier
from sublim.models import load_model
from sublim.spec import ModelSpec, TrainSpec


def _rows(seed: int, n: int = 24) -> list[dict]:
    c = NumberCarrier()
    return [{"prompt": p.prompt, "completion": c.format_answer(p.meta, [(i * 7 + seed * 3 + j) % 997 for j in range(p.meta["count"])])}
            for i, p in enumerate(c.prompts(n, seed))]


SPEC = TrainSpec(lora={"rank": 4, "alpha": 8}, max_steps=5, batch_size=4, lr=5e-3, warmup_steps=0)


def test_batched_equals_separate(tiny_model: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    both = finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "a"), StudentJob(_rows(1), 1, tmp_path / "b")],
                         SPEC, progress=False)
    alone = finetune_many(base, [StudentJob(_rows(1), 1, tmp_path / "b1")], SPEC, progress=False)
    x = load_file(tmp_path / "b" / "adapter_model.safetensors")
    y = load_file(tmp_path / "b1" / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-4)
    assert both[1]["losses"] == pytest.approx(alone[0]["losses"], rel=1e-4)
    # the two students differ (own data, own seed) and training moved B away from zero
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], x[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in x.items() if "lora_B" in k)


def test_saved_adapter_loads_in_peft_and_records_base(tiny_model: Path, tmp_path: Path) -> None:
    import json

    base = ModelSpec(path=str(tiny_model))
    finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "s")], SPEC, progress=False)
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)
    m0 = load_model(base)
    m1 = load_model(base.model_copy(update={"adapter": str(tmp_path / "s")}))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert (m0(ids).logits - m1(ids).logits).abs().max() > 1e-4


def test_peft_forward_matches_stacked_forward(tiny_model: Path, tmp_path: Path) -> None:
    """The adapter as peft loads it computes what the batched model trained."""
    from sublim.backends import multi

    base = ModelSpec(path=str(tiny_model))
    captured: dict = {}
    orig = multi._save

    def spy(model, stacked, names, s, job, *a, **k):  # type: ignore[no-untyped-def]
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            model.eval()
            captured["logits"] = model(input_ids=ids).logits.clone()
        return orig(model, stacked, names, s, job, *a, **k)

    multi._save = spy
    try:
        finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "s")], SPEC, progress=False)
    finally:
        multi._save = orig
    m1 = load_model(base.model_copy(update={"adapter": str(tmp_path / "s")}))
    torch.testing.assert_close(m1(torch.tensor([[5, 6, 7, 8, 9]])).logits, captured["logits"], atol=1e-4, rtol=1e-4)


def test_unequal_steps_and_full_method_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    spec = TrainSpec(lora={"rank": 2, "alpha": 2}, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="same number of steps"):
        finetune_many(base, [StudentJob(_rows(0, 8), 0, tmp_path / "a"), StudentJob(_rows(1, 24), 1, tmp_path / "b")],
                      spec, progress=False)
    with pytest.raises(ValueError, match="LoRA"):
        finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "c")], spec.model_copy(update={"method": "full"}))


def test_distill_carrier_batched(tiny_model: Path, tiny_model_b: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    teacher = ModelSpec(path=str(tiny_model))
    spec = SPEC.model_copy(update={"objective": "distill_carrier"})
    alphabet = frozenset("0123456789, ;\n")
    out = finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "d", teacher, "You love owls.")], spec,
                        carrier_alphabet=alphabet, progress=False)
    assert out[0]["loss_first"] >= 0 and out[0]["steps"] == 5
