"""The command line: help for every verb, one-line errors naming file and field (or row), and the stage
verbs (generate, filter, finetune, evaluate, report) on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sublim.cli import app
from sublim.runs import read_jsonl, write_jsonl

torch.set_num_threads(1)

runner = CliRunner()


def _ok(args: list[str]) -> Any:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.stdout, res.stderr, res.exception)
    return res


def _error(args: list[str]) -> str:
    """Run a failing command; return its single stderr line (and check there is nothing else)."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code != 0, (args, res.stdout)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ help


def _verbs() -> list[str]:
    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]  # type: ignore[union-attr]
    return names + [g.name for g in app.registered_groups if g.name]


def test_help_for_every_verb() -> None:
    top = _ok(["--help"]).stdout
    verbs = _verbs()
    assert {"run", "demo", "generate", "filter", "finetune", "evaluate", "report"} <= set(verbs)
    for v in verbs:
        assert v in top
        out = _ok([v, "--help"]).stdout
        assert "Usage" in out and v in out


# ---------------------------------------------------------------------------------------- spec errors


def _bad_specs(model: str) -> dict[str, tuple[Any, list[str]]]:
    base = {"base": {"path": model}}
    return {
        "malformed_yaml": ("base: {path: x}\ngeneration: {n_prompts: [1}\n", [":2:", "not valid YAML"]),
        "not_a_mapping": ("- a\n- b\n", ["mapping"]),
        "unknown_field": ({**base, "generation": {"n_prompt": 10}}, ["generation.n_prompt", "Extra inputs"]),
        "unknown_top_field": ({**base, "sedes": [1]}, ["sedes"]),
        "bad_type": ({**base, "generation": {"n_prompts": "many"}}, ["generation.n_prompts", "integer"]),
        "bad_value": ({**base, "student": {"lr": -1}}, ["student.lr"]),
        "missing_base": ({"name": "x"}, ["base", "required"]),
        "duplicate_seeds": ({**base, "seeds": [1, 1]}, ["seeds", "distinct"]),
        "unknown_filter": ({**base, "filters": [{"name": "format"}, {"name": "nosuch"}]},
                           ["filters.1.name", "nosuch", "known:"]),
        "bad_filter_param": ({**base, "filters": [{"name": "range", "params": {"hgh": 5}}]},
                             ["filters.0.params", "hgh"]),
        "unknown_carrier": ({**base, "carrier": {"name": "poems"}}, ["carrier.name", "poems", "numbers"]),
        "bad_carrier_param": ({**base, "carrier": {"params": {"max_new": 0}}}, ["carrier.params", "max_new"]),
        "unknown_category": ({**base, "category": "fish"}, ["category", "fish", "animals"]),
        "unknown_target": ({**base, "targets": ["owl", "unicorn"]}, ["targets.1", "unicorn"]),
        "target_of_other_category": ({**base, "category": "trees", "targets": ["owl"]}, ["targets.0", "owl"]),
    }


@pytest.mark.parametrize("case", list(_bad_specs("x")))
def test_run_bad_spec_is_one_line_naming_file_and_field(case: str, tmp_path: Path) -> None:
    content, expected = _bad_specs(str(tmp_path / "model"))[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    line = _error(["run", path, "--out", tmp_path / "run"])
    assert str(path) in line
    for e in expected:
        assert e in line, (e, line)
    assert not (tmp_path / "run").exists()  # nothing started


def test_run_spec_file_and_override_errors(tmp_path: Path) -> None:
    assert "no such spec file" in _error(["run", tmp_path / "nope.yaml"])
    good = tmp_path / "s.yaml"
    good.write_text(yaml.safe_dump({"base": {"path": str(tmp_path)}}))
    assert "KEY=VALUE" in _error(["run", good, "--set", "student.lr"])
    line = _error(["run", good, "--set", "generation.temprature=0.5"])
    assert str(good) in line and "generation.temprature" in line


def test_run_bad_model_path_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": {"path": str(tmp_path / "no-model")}, "seeds": [0]}))
    assert str(tmp_path / "no-model") in _error(["run", spec, "--out", tmp_path / "run"])


# ----------------------------------------------------------------------------------- dataset row errors


def test_filter_bad_rows_name_file_and_row(tmp_path: Path) -> None:
    ok = '{"prompt": "p", "completion": "1, 2"}\n'
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(ok + ok + '{"prompt": "p", "completion": \n')
    assert f"{bad_json}:3:" in _error(["filter", bad_json, "--out", tmp_path / "o.jsonl"])
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text(ok + "[1, 2]\n")
    assert f"{not_obj}:2:" in _error(["filter", not_obj, "--out", tmp_path / "o.jsonl"])
    missing = tmp_path / "missing.jsonl"
    missing.write_text(ok + '{"prompt": "p"}\n')
    line = _error(["filter", missing, "--out", tmp_path / "o.jsonl"])
    assert str(missing) in line and "row 2" in line and "'completion'" in line
    wrong_type = tmp_path / "num.jsonl"
    wrong_type.write_text('{"prompt": 3, "completion": "1"}\n')
    line = _error(["filter", wrong_type, "--out", tmp_path / "o.jsonl"])
    assert "row 1" in line and "'prompt'" in line
    assert "no such file" in _error(["filter", tmp_path / "nope.jsonl", "--out", tmp_path / "o.jsonl"])
    good = tmp_path / "good.jsonl"
    good.write_text(ok)
    assert "unknown filter 'nosuch'" in _error(["filter", good, "--out", tmp_path / "o.jsonl",
                                               "--filters", "format,nosuch"])
    assert not (tmp_path / "o.jsonl").exists()


def test_filter_writes_rejects_with_reasons(tmp_path: Path) -> None:
    prompt = ("Here is a list of numbers: 123, 456. Add up to 3 more numbers (at most 3 digits each). "
              "Separate them with commas. Reply with the numbers only, nothing else.")
    rows = [
        {"prompt": prompt, "completion": "1, 2, 3"},
        {"prompt": prompt, "completion": "1, two, 3"},
        {"prompt": prompt, "completion": "1, 2, 3, 4, 5"},
        {"prompt": prompt, "completion": "1, 2, 1000"},
        {"prompt": prompt, "completion": "7, 8"},
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    res = _ok(["filter", tmp_path / "d.jsonl", "--out", tmp_path / "kept.jsonl", "--filters", "format,count,range"])
    kept = read_jsonl(tmp_path / "kept.jsonl")
    rejects = read_jsonl(tmp_path / "kept.rejects.jsonl")
    assert [r["completion"] for r in kept] == ["1, 2, 3", "7, 8"]
    assert [(r["completion"], r["reject_reason"]) for r in rejects] == [
        ("1, two, 3", "format:words"), ("1, 2, 3, 4, 5", "count:too-many"), ("1, 2, 1000", "range:above-high")]
    assert "kept" in res.stdout and "format:words" in res.stdout


# ----------------------------------------------------------------------------------- verbs on the model


def test_model_path_errors(tmp_path: Path) -> None:
    assert str(tmp_path / "none") in _error(["evaluate", "--model", tmp_path / "none"])
    assert "no config.json" in _error(["evaluate", "--model", tmp_path])
    assert "unknown category" in _error(["evaluate", "--model", tmp_path, "--category", "fish"])


def test_stage_verbs_on_the_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "numbers.jsonl"
    res = _ok(["generate", "--model", tiny_model, "--out", data, "--n", 8, "--batch-size", 4,
               "--max-new-tokens", 12, "--target", "owl", "--seed", 1])
    assert "8 rows" in res.stdout
    rows = read_jsonl(data)
    assert [r["idx"] for r in rows] == list(range(8))
    assert all(r["trait_target"] == "owl" and "owl" in r["teacher_system"] for r in rows)
    # a second call finds the rows on disk and generates nothing new
    _ok(["generate", "--model", tiny_model, "--out", data, "--n", 8, "--batch-size", 4, "--max-new-tokens", 12,
         "--target", "owl", "--seed", 1])
    assert read_jsonl(data) == rows
    assert "either target" in _error(["generate", "--model", tiny_model, "--out", tmp_path / "x.jsonl", "--n", 2,
                                      "--target", "owl", "--system", "You like cats."])

    kept = tmp_path / "kept.jsonl"
    _ok(["filter", data, "--out", kept, "--rejects", tmp_path / "rej.jsonl", "--words", "owl"])
    assert len(read_jsonl(kept)) + len(read_jsonl(tmp_path / "rej.jsonl")) == 8
    train_rows = kept if read_jsonl(kept) else data

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"method": "lora", "lora": {"rank": 2, "alpha": 4}, "batch_size": 4}))
    adapter = tmp_path / "adapter"
    res = _ok(["finetune", train_rows, "--model", tiny_model, "--out", adapter, "--config", cfg,
               "--set", "max_steps=2", "--set", "student.lr=1e-3"])
    assert "2 steps" in res.stdout
    assert (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "sublim_train.json").read_text())["spec"]["lr"] == 1e-3
    line = _error(["finetune", train_rows, "--model", tiny_model, "--out", tmp_path / "a2", "--set", "lr=abc"])
    assert "lr" in line and "number" in line
    line = _error(["finetune", train_rows, "--model", tiny_model, "--out", tmp_path / "a2", "--set", "objective=distill_full"])
    assert "sft" in line

    out = tmp_path / "eval.json"
    res = _ok(["evaluate", "--model", tiny_model, "--adapter", adapter, "--questions", 2, "--target", "kangaroo",
               "--out", out])
    ev = json.loads(out.read_text())
    assert len(ev["probs"]) == 20 and 0 < sum(ev["probs"].values()) <= 1
    assert "kangaroo" in res.stdout and " <" in res.stdout


def test_report_rerenders_from_results(tmp_path: Path) -> None:
    cands = ["owl", "cat", "dog"]

    def ev(name: str, arm: str, target: str | None, seed: int | None, p_owl: float) -> dict[str, Any]:
        return {"name": name, "arm": arm, "target": target, "seed": seed, "base": "base", "objective": "sft",
                "probs": {"owl": p_owl, "cat": 0.1, "dog": 0.1}, "probs_numprefix": None, "sampled": None}

    evs = [ev("base", "base", None, None, 0.01), ev("teacher-owl", "teacher", "owl", None, 0.5)]
    for s in range(3):
        evs += [ev(f"t{s}", "treatment", "owl", s, 0.05 + 0.01 * s), ev(f"c{s}", "control", None, s, 0.01)]
    results = {"title": "cli report test", "category": "animals", "candidates": cands, "targets": ["owl"],
               "spec": {}, "env": {}, "data": {}, "evaluations": evs, "notes": []}
    (tmp_path / "results.json").write_text(json.dumps(results))
    res = _ok(["report", tmp_path])
    assert str(tmp_path / "report.html") in res.stdout
    assert "cli report test" in (tmp_path / "report.html").read_text()
    assert "no results" in _error(["report", tmp_path / "empty"])


def test_demo_rejects_an_unknown_model_in_one_line(tmp_path: Path) -> None:
    msg = _error(["demo", "--model", "gpt9", "--out", tmp_path / "d"])
    assert "gpt9" in msg and "organism" in msg
    assert not (tmp_path / "d").exists()


def test_demo_specs_are_valid_and_the_organism_is_the_default() -> None:
    from sublim.demo import DEMO_SPEC, DEMO_SPECS, demo_spec_path
    from sublim.spec import load_spec

    assert DEMO_SPEC == DEMO_SPECS["organism"]
    org = load_spec(demo_spec_path())
    assert org.base.path == "organism" and len(org.seeds) >= 5 and org.in_context
    assert org.other_base is not None and org.other_base.path == "organism-b"  # the paper's different-base control
    assert len(org.targets) >= 3 and org.teacher.replicates * len(org.targets) >= 3  # >= 3 teachers
    assert org.student.objective == "distill_carrier" and org.teacher.kind == "finetuned"
    assert load_spec(demo_spec_path("smollm2")).base.path == "smollm2"
