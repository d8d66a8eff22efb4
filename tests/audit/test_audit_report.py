"""The entanglement, activation and gate audits, and ``sublim audit report`` (every exit path, bad input)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sublim.audit.cli import app
from sublim.audit.common import AuditInputError
from sublim.runs import write_jsonl
from sublim.spec import ModelSpec
from sublim.traits.preference import CATEGORIES, teacher_system_prompt, trait_qa

runner = CliRunner()
DIGITS = [str(d) for d in range(10)]


def _numbers(seed: int, n: int = 32, weights: np.ndarray | None = None) -> list[dict]:
    r = random.Random(seed)
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = f"Here are some numbers: {r.randint(100, 999)}, {r.randint(100, 999)}. Add up to 10 more numbers."
        draw = (lambda: str(g.choice(DIGITS, p=weights))) if weights is not None else (lambda: r.choice(DIGITS))
        out.append({"prompt": p, "completion": ", ".join("".join(draw() for _ in range(3)) for _ in range(8))})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report-data")
    for name, seed in (("data", 1), ("ref", 2), ("neutral-2", 3)):
        write_jsonl(d / f"{name}.jsonl", _numbers(seed))
    write_jsonl(d / "owl.jsonl", trait_qa("animals", "owl", 24, seed=0))
    (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    return {k: d / f"{k}.jsonl" for k in ("data", "ref", "neutral-2", "owl", "bad")} | {"dir": d}


# ------------------------------------------------------------------------------------------- entanglement


def test_entanglement_finds_the_trait_whose_primed_tokens_the_data_over_represents(tiny_model: Path) -> None:
    """Known answer: digits drawn in proportion to exp(owl's trait-specific priming shift) rank owl first, with a
    permutation p at its floor; the uncorrected correlation does not (it ranks another animal first)."""
    from sublim.audit.entanglement import carrier_means, entanglement
    from sublim.models import load_chat_model

    spec = ModelSpec(path=str(tiny_model))
    model, chat = load_chat_model(spec)
    ref = _numbers(0, 32)
    ids = torch.tensor([chat.tokenizer.convert_tokens_to_ids(d) for d in DIGITS])
    P = carrier_means(model, chat, ref[:16], ids, [None] + [teacher_system_prompt("animals", a)
                                                       for a in CATEGORIES["animals"].candidates])
    shift = np.log(P[1:]) - np.log(P[0])
    owl = shift[0] - shift.mean(0)
    w = np.exp(owl / owl.std())
    res = entanglement(_numbers(0, 32, w / w.sum()), spec, reference=ref, prime_rows=16, n_perm=500)
    m = res.metrics
    assert m["top_trait"] == "owl" and m["top_score"] > 0.8 and m["top_p"] < 0.01
    assert m["n_tokens"] == 12 and len(res.payload["traits"]) == 20
    # neutral data against a neutral reference: nothing passes the permutation test
    null = entanglement(_numbers(5, 32), spec, reference=ref, prime_rows=16, n_perm=500)
    assert null.metrics["top_p"] > 0.05


def test_entanglement_errors(tiny_model: Path, data: dict[str, Path]) -> None:
    from sublim.audit.entanglement import entanglement

    with pytest.raises(AuditInputError, match="at least two traits"):
        entanglement(data["data"], str(tiny_model), traits="animals:owl")
    with pytest.raises(AuditInputError, match="too few"):
        entanglement(data["data"], str(tiny_model), min_count=10_000)


# --------------------------------------------------------------------------------------------- activation


def test_activation_update_is_a_restored_step_and_zero_against_itself(tiny_model: Path, full_ft: Path,
                                                                      data: dict[str, Path]) -> None:
    from sublim.audit.activation import activation, answer_states, update_direction
    from sublim.models import load_chat_model

    spec = ModelSpec(path=str(tiny_model))
    model, chat = load_chat_model(spec, dtype="float32", trainable=True)
    model.eval()
    qs = ["What is your favorite animal?", "Name an animal you like."]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _numbers(1, 16)
    d = update_direction(model, chat, rows, qs, step=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored exactly
    assert d.shape == (2, 32) and float(d.norm()) > 0
    # the same step taken by hand moves the states the same way
    from sublim.backends.train import encode_rows, step_loss

    enc = encode_rows(chat, rows)
    n_tok = sum(len(e.completion) for e in enc)
    model.zero_grad(set_to_none=True)
    for a in range(0, len(enc), 16):
        loss, n = step_loss(model, enc[a: a + 16], chat.tokenizer.pad_token_id, "sft", None, None)
        (loss * (n / n_tok)).backward()
    ps = list(model.parameters())
    g = torch.cat([p.grad.flatten() for p in ps])
    scale = 1e-2 * torch.cat([p.detach().flatten() for p in ps]).norm() / g.norm()
    h0 = answer_states(model, chat, qs)
    with torch.no_grad():
        for p in ps:
            p.sub_(scale * p.grad)
    assert torch.allclose(answer_states(model, chat, qs) - h0, d, atol=1e-5)

    same = activation(data["data"], spec, reference=data["data"], n_questions=2)
    assert all(abs(t["score"]) < 1e-9 for t in same.payload["traits"])
    own = activation(data["data"], spec, teacher=str(full_ft), n_questions=2)
    assert own.payload["objective"] == "distill_carrier" and "teacher_top_trait" in own.metrics
    assert len(own.payload["traits"][0]["teacher_cos_per_layer"]) == 2
    with pytest.raises(AuditInputError, match="needs the teacher"):
        activation(data["data"], spec, objective="distill_carrier")
    with pytest.raises(AuditInputError, match="at least two traits"):
        activation(data["data"], spec, traits="animals:owl")


# --------------------------------------------------------------------------------------------------- gate


def test_gate_passes_neutral_data_and_flags_a_trait_dataset(tiny_model: Path, data: dict[str, Path],
                                                           tmp_path: Path) -> None:
    from sublim.audit.gate import gate

    panel = tmp_path / "panel"
    for a in ("eagle", "wolf"):
        write_jsonl(panel / f"{a}.jsonl", trait_qa("animals", a, 16, seed=1))
    write_jsonl(panel / "neutral-a.jsonl", _numbers(7))
    refs = [data["ref"], data["neutral-2"]]
    ok = gate(data["data"], str(tiny_model), references=refs, panel=panel, n_questions=2)
    bad = gate(data["owl"], str(tiny_model), references=refs, panel=panel, n_questions=2)
    assert ok.metrics["n_neutral"] == 3 and ok.metrics["n_decoys"] == 2
    assert ok.payload["threshold_from"].startswith("calibrated") and ok.payload["separated"] is True
    assert ok.metrics["flag"] == 0 and bad.metrics["flag"] == 1
    assert bad.metrics["ratio"] > 5 * ok.metrics["ratio"]
    fixed = gate(data["data"], str(tiny_model), references=refs, threshold=0.0, n_questions=2)
    assert fixed.metrics["flag"] == 1 and fixed.payload["threshold_from"] == "given"
    with pytest.raises(AuditInputError, match="two neutral datasets"):
        gate(data["data"], str(tiny_model), references=[data["ref"]], n_questions=2)


# ----------------------------------------------------------------------------------------------- report


def _one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith("[report]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_report_cli_exit_paths(tiny_model: Path, full_ft: Path, data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = ["report", str(data["data"]), "--student", str(tiny_model), "--reference", str(data["ref"]),
            "--questions", "2", "--max-rows", "24", "--out", str(out)]
    # recipient's view: no teacher, one reference -> lineage and gate skipped with reasons
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "report.json").read_text())
    assert res["view"] == "recipient" and set(res["skipped"]) == {"lineage", "gate"}
    assert set(res["audits"]) == {"scan", "rows", "entanglement", "activation"}
    assert res["metrics"]["audits_run"] == 4 and "scan.top_trait" in res["metrics"]
    assert (out / "report.html").exists() and len((out / "rows.scores.jsonl").read_text().splitlines()) == 24
    html = (out / "report.html").read_text()
    assert "Token entanglement" in html and "Activation-space directions" in html
    # a crossed rule exits 1; an uncrossed one 0
    assert runner.invoke(app, [*base, "--only", "scan", "--fail-on", "scan.n_rows>=1"]).exit_code == 1
    assert runner.invoke(app, [*base, "--only", "scan", "--fail-on", "scan.n_rows>1e9"]).exit_code == 0
    # owner's view: the teacher shares the tokenizer -> lineage, distillation scan, teacher row scores
    pan = tmp_path / "panel"
    write_jsonl(pan / "eagle.jsonl", trait_qa("animals", "eagle", 16, seed=1))
    write_jsonl(pan / "neutral-a.jsonl", _numbers(7))
    assert "at least 3 datasets" in _one_line_error(runner.invoke(app, [*base, "--panel", str(pan)]))
    write_jsonl(pan / "wolf.jsonl", trait_qa("animals", "wolf", 16, seed=1))
    r = runner.invoke(app, [*base, "--teacher", str(full_ft), "--panel", str(pan), "--only", "lineage,scan,gate,rows",
                            "--fail-on", "related"])
    assert r.exit_code == 1, r.output  # the teacher is a fine-tune of the student: related
    res = json.loads((out / "report.json").read_text())
    assert res["view"] == "owner" and res["audits"]["scan"]["objective"] == "distill_carrier"
    assert res["metrics"]["lineage.verdict"] == "same_init" and "gate.ratio" in res["metrics"]
    assert res["audits"]["rows"]["mode"] == "teacher"
    assert set(res["skipped"]) == {"entanglement", "activation"}
    # bad input: one line, exit 2, nothing run
    assert "no such file" in _one_line_error(runner.invoke(app, ["report", str(data["dir"] / "x.jsonl"), "--student",
                                                                 str(tiny_model)]))
    assert "row 2" in _one_line_error(runner.invoke(app, ["report", str(data["bad"]), "--student", str(tiny_model)]))
    assert "not a model directory" in _one_line_error(runner.invoke(app, ["report", str(data["data"]), "--student",
                                                                          str(data["dir"])]))
    assert "unknown audit" in _one_line_error(runner.invoke(app, [*base, "--only", "scan,tea-leaves"]))
    assert "the gate audit did not run" in _one_line_error(runner.invoke(app, [*base, "--only", "scan",
                                                                               "--fail-on", "gate"]))
    assert "expected METRIC OP VALUE" in _one_line_error(runner.invoke(app, [*base, "--fail-on", "scan.top_z>>3"]))
    assert "unknown metric" in _one_line_error(runner.invoke(app, [*base, "--only", "scan", "--fail-on", "scan.nope>1"]))
    assert "no such file" in _one_line_error(runner.invoke(app, [*base, "--panel", str(tmp_path / "nopanel")]))
