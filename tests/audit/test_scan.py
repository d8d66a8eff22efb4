"""Gradient-alignment scan: the first-order prediction matches a real SGD step; the trait a dataset teaches
ranks first, calibrated on a panel, leave-one-out."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sublim.audit.scan import GradientScanner, load_panel, panel_from_datasets, scan, trait_probes
from sublim.traits.preference import trait_qa


@pytest.fixture(scope="module")
def scanner(tiny_model: Path) -> GradientScanner:
    return GradientScanner(str(tiny_model), trait_probes("animals", n_questions=4), batch_size=16)


def _neutral(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Continue: {rng.randint(1, 9)}, {rng.randint(1, 9)}.",
             "completion": ", ".join(str(rng.randint(100, 999)) for _ in range(4))} for _ in range(n)]


def _probe_logp(sc: GradientScanner, p) -> float:
    """The probe's mean log p(answer | question) at the scanner's current weights."""
    from sublim.backends.train import completion_logits

    prompts = [sc.chat.encode_prompt(q) for q in p.questions]
    ans = list(sc.chat.tokenizer(p.answer, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lg = completion_logits(sc.model, prompts, [ans] * len(prompts), sc.pad).float()
    return float(torch.log_softmax(lg, -1).gather(1, torch.tensor(ans * len(prompts))[:, None]).sum()) / len(prompts)


def _real_step(sc: GradientScanner, rows: list[dict], objective: str, eta: float) -> list[float]:
    """Take one SGD step of ``eta`` on ``objective`` over all ``rows``; each probe's change per unit of eta."""
    from sublim.backends.train import encode_rows, step_loss

    before = [_probe_logp(sc, p) for p in sc.probes]
    loss, _ = step_loss(sc.model, encode_rows(sc.chat, rows), sc.pad, objective, sc.teacher, sc.subset)
    loss.backward()
    with torch.no_grad():
        for p in sc.params:
            p -= eta * p.grad
    return [(_probe_logp(sc, p) - b) / eta for p, b in zip(sc.probes, before)]


def test_first_order_prediction_matches_a_real_step(tiny_model: Path) -> None:
    sc = GradientScanner(str(tiny_model), trait_probes("animals:owl,animals:cat", 4), batch_size=64)
    rows = trait_qa("animals", "owl", 16, seed=3)
    pred = sc.score(rows)["dot"]

    actual = _real_step(sc, rows, "sft", 1e-3)
    assert actual == pytest.approx(pred.tolist(), rel=0.05, abs=0.05)
    assert pred[0] > 0


def test_distillation_scan_predicts_a_real_distillation_step(tiny_model: Path, tiny_model_b: Path) -> None:
    """The owner's audit: the step is on the teacher's soft labels (distill_carrier) and the first-order
    prediction matches a real SGD step of that objective; distilling the student's own labels predicts 0."""
    from sublim.audit.common import AuditInputError

    probes = trait_probes("animals:owl,animals:cat", 4)
    rows = _neutral(16, 5)
    sc = GradientScanner(str(tiny_model), probes, batch_size=64, objective="distill_carrier", teacher=str(tiny_model_b))
    pred = sc.score(rows)["dot"]

    actual = _real_step(sc, rows, "distill_carrier", 1e-2)
    assert actual == pytest.approx(pred.tolist(), rel=0.05, abs=1e-3)
    assert any(abs(x) > 1e-3 for x in pred)
    own = GradientScanner(str(tiny_model), probes, batch_size=64, objective="distill_carrier", teacher=str(tiny_model))
    assert abs(own.score(rows)["dot"]).max() < 1e-6  # KL to itself: no gradient
    with pytest.raises(AuditInputError, match="needs the teacher"):
        GradientScanner(str(tiny_model), probes, objective="distill_carrier")


def test_scan_ranks_the_trait_and_calibrates(scanner: GradientScanner, tiny_model: Path, tmp_path: Path) -> None:
    panel_data = {a: (a, trait_qa("animals", a, 32, seed=1)) for a in ("eagle", "wolf", "dolphin", "owl")}
    panel_data["neutral"] = (None, _neutral(32, 0))
    pan = panel_from_datasets(scanner, panel_data, "test-panel")
    data = trait_qa("animals", "owl", 32, seed=2)
    res = scan(data, str(tiny_model), reference=_neutral(32, 1), panel=pan, scanner=scanner)
    assert res.metrics["top_trait"] == "owl" and res.metrics["calibrated"] == 1
    assert res.metrics["top_z"] > 3 and res.metrics["max_diff_lo"] > 0
    owl = next(t for t in res.payload["traits"] if t["target"] == "owl")
    assert owl["panel_n"] == 4  # the owl teacher's dataset is not in owl's null
    assert res.payload["panel"]["name"] == "test-panel"
    # leave-one-out: auditing a panel member excludes it from its own null
    res2 = scan(panel_data["wolf"][1], str(tiny_model), panel=pan, scanner=scanner)
    assert res2.metrics["top_trait"] == "wolf"
    assert next(t for t in res2.payload["traits"] if t["target"] == "eagle")["panel_n"] == 3
    # without a panel: ranked by the centred difference, flagged as uncalibrated
    res3 = scan(data, str(tiny_model), reference=_neutral(32, 1), scanner=scanner)
    assert res3.metrics["calibrated"] == 0 and "UNCALIBRATED" in res3.payload["calibration"]
    assert res3.metrics["top_trait"] == "owl"
    paths = res.write(tmp_path)
    assert "test-panel" in paths["html"].read_text()


def test_panel_directory(scanner: GradientScanner, tmp_path: Path) -> None:
    from sublim.runs import write_jsonl

    for a in ("eagle", "wolf"):
        write_jsonl(tmp_path / f"{a}.jsonl", trait_qa("animals", a, 16, seed=1))
    write_jsonl(tmp_path / "neutral-0.jsonl", _neutral(16, 0))
    pan = load_panel(scanner, tmp_path)
    assert sorted((m.name, m.trait) for m in pan.members) == [("eagle", "eagle"), ("neutral-0", None),
                                                              ("wolf", "wolf")]


def test_probe_errors() -> None:
    from sublim.audit.common import AuditInputError

    with pytest.raises(AuditInputError, match="unknown category"):
        trait_probes("colours")
    with pytest.raises(AuditInputError, match="not a animals candidate"):
        trait_probes("animals:unicorn")
    assert len(trait_probes("animals,trees", 2)) == 40


def test_build_decoy_panel(tiny_model: Path, tmp_path: Path) -> None:
    from sublim.audit.scan import build_decoy_panel
    from sublim.spec import GenerationSpec, TeacherSpec, TrainSpec

    ts = TeacherSpec.model_validate({"kind": "finetuned", "qa_rows": 16, "max_rounds": 1, "train":
                                     TrainSpec.model_validate({"method": "full", "max_steps": 2, "lr": 1e-3})})
    gen = GenerationSpec.model_validate({"n_prompts": 8, "max_new_tokens": 12, "batch_size": 8})
    out = build_decoy_panel(str(tiny_model), "animals", ["owl", "cat"], n_rows=4, teacher_spec=ts, generation=gen,
                            out_dir=tmp_path / "panel", log=lambda m: None)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["cat.jsonl", "neutral-0.jsonl", "owl.jsonl"]
    spec = json.loads((out / "panel.json").read_text())
    assert [d["trait"] for d in spec["datasets"]] == ["owl", "cat", None]
