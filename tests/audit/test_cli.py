"""Audit CLIs: reports written, --fail-on exit codes (0 pass, 1 crossed, 2 bad input), one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sublim.audit.cli import app
from sublim.audit.common import AuditInputError, check_thresholds, parse_fail_on
from sublim.runs import write_jsonl
from sublim.traits.preference import trait_qa

runner = CliRunner()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-data")
    write_jsonl(d / "owl.jsonl", trait_qa("animals", "owl", 24, seed=0))
    write_jsonl(d / "ref.jsonl", [{"prompt": f"Continue: {i}.", "completion": f"{i * 37 % 900 + 100}, {i + 200}"}
                                  for i in range(24)])
    (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    (d / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    return {"owl": d / "owl.jsonl", "ref": d / "ref.jsonl", "bad": d / "bad.jsonl", "broken": d / "broken.jsonl",
            "dir": d}


def _one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_fail_on_grammar() -> None:
    t = parse_fail_on(["top_z>=3", "verdict==same_init,n<2"])
    assert [str(x) for x in t] == ["top_z>=3.0", "verdict==same_init", "n<2.0"]
    assert check_thresholds({"top_z": 3.5, "verdict": "same_init", "n": 5}, t)[0]["rule"] == "top_z>=3.0"
    assert len(check_thresholds({"top_z": 1.0, "verdict": "same_init", "n": 1}, t)) == 2
    assert check_thresholds({"top_z": None, "verdict": "x", "n": 5}, t) == []
    with pytest.raises(AuditInputError, match="expected METRIC OP VALUE"):
        parse_fail_on("top_z")
    with pytest.raises(AuditInputError, match="unknown metric"):
        check_thresholds({"a": 1}, parse_fail_on("b>1"))


def test_lineage_cli(tiny_model: Path, tiny_model_b: Path, full_ft: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "rep")]
    r = runner.invoke(app, ["lineage", str(tiny_model), str(full_ft), *out])
    assert r.exit_code == 0, r.output
    assert "same_init" in r.output and (tmp_path / "rep" / "lineage.html").exists()
    assert runner.invoke(app, ["lineage", str(tiny_model), str(full_ft), "--fail-on", "same_init", *out]).exit_code == 1
    assert runner.invoke(app, ["lineage", str(tiny_model), str(tiny_model_b), "--fail-on", "related",
                               *out]).exit_code == 0
    assert "no such model directory" in _one_line_error(runner.invoke(app, ["lineage", str(tiny_model),
                                                                            str(tmp_path / "nope"), *out]))
    (tmp_path / "empty").mkdir()
    assert "not a model directory" in _one_line_error(runner.invoke(app, ["lineage", str(tiny_model),
                                                                          str(tmp_path / "empty"), *out]))
    assert "unknown metric" in _one_line_error(runner.invoke(app, ["lineage", str(tiny_model), str(full_ft),
                                                                   "--fail-on", "bogus>1", *out]))


def test_scan_cli(tiny_model: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    base = ["scan", str(datasets["owl"]), "--student", str(tiny_model), "--reference", str(datasets["ref"]),
            "--questions", "3", "--out", str(tmp_path)]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "scan.json").read_text())
    assert res["metrics"]["top_trait"] == "owl" and (tmp_path / "scan.html").exists()
    assert runner.invoke(app, [*base, "--fail-on", "max_diff_lo>0"]).exit_code == 1
    assert runner.invoke(app, [*base, "--fail-on", "top_trait==owl"]).exit_code == 1
    assert runner.invoke(app, [*base, "--fail-on", "diff.owl>1e9"]).exit_code == 0
    assert "no such file" in _one_line_error(runner.invoke(app, ["scan", str(datasets["dir"] / "x.jsonl"),
                                                                 "--student", str(tiny_model)]))
    msg = _one_line_error(runner.invoke(app, ["scan", str(datasets["bad"]), "--student", str(tiny_model)]))
    assert "row 2" in msg and "completion" in msg
    assert "broken.jsonl:2" in _one_line_error(runner.invoke(app, ["scan", str(datasets["broken"]), "--student",
                                                                   str(tiny_model)]))
    assert "not a model directory" in _one_line_error(runner.invoke(app, ["scan", str(datasets["owl"]), "--student",
                                                                          str(datasets["dir"])]))
    assert "unknown category" in _one_line_error(runner.invoke(app, [*base, "--traits", "colours"]))


def test_rows_cli(tiny_model: Path, full_ft: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    base = ["rows", str(datasets["ref"]), "--student", str(tiny_model), "--teacher", str(full_ft),
            "--top", "0.1", "--out", str(tmp_path)]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "rows.scores.jsonl").read_text().splitlines()
    assert len(lines) == 24 and sum(json.loads(x)["flagged"] for x in lines) == 3
    assert runner.invoke(app, [*base, "--fail-on", "flagged>=1"]).exit_code == 1
    assert "needs --reference" in _one_line_error(runner.invoke(app, [*base, "--z-threshold", "3"]))
    assert "not a model directory" in _one_line_error(runner.invoke(
        app, ["rows", str(datasets["ref"]), "--student", str(tiny_model), "--teacher", str(datasets["dir"])]))


def test_canary_cli(tiny_model: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    base = ["canary", str(datasets["owl"]), "--student", str(tiny_model), "--reference", str(datasets["ref"]),
            "--rows", "16", "--seeds", "0,1", "--questions", "2", "--set", "max_steps=4", "--set", "lr=2e-2",
            "--set", "warmup_steps=0", "--out", str(tmp_path)]
    r = runner.invoke(app, [*base, "--fail-on", "max_diff>0"])
    assert r.exit_code == 1, r.output
    assert json.loads((tmp_path / "canary.json").read_text())["metrics"]["seeds"] == 2
    assert "at least 2 seeds" in _one_line_error(runner.invoke(app, [*base[:-2], "--seeds", "0"]))
    assert "integers" in _one_line_error(runner.invoke(app, [*base[:-2], "--seeds", "a,b"]))
    assert "canary train config" in _one_line_error(runner.invoke(app, [*base, "--set", "lr=-1"]))
    two = [*base[:-2], "--reference", str(datasets["owl"]), "--out", str(tmp_path / "two")]
    assert runner.invoke(app, two).exit_code == 0
    assert json.loads((tmp_path / "two" / "canary.json").read_text())["metrics"]["n_references"] == 2


def test_scan_cli_with_panel(tiny_model: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    panel = tmp_path / "panel"
    for a in ("eagle", "wolf", "cat"):
        write_jsonl(panel / f"{a}.jsonl", trait_qa("animals", a, 16, seed=1))
    write_jsonl(panel / "neutral.jsonl", [json.loads(x) for x in datasets["ref"].read_text().splitlines()])
    r = runner.invoke(app, ["scan", str(datasets["owl"]), "--student", str(tiny_model), "--panel", str(panel),
                            "--questions", "3", "--out", str(tmp_path), "--fail-on", "top_z>=3"])
    assert r.exit_code == 1, r.output
    res = json.loads((tmp_path / "scan.json").read_text())
    assert res["metrics"]["calibrated"] == 1 and res["metrics"]["top_trait"] == "owl"
    assert res["panel"]["name"].startswith("panel") and len(res["panel"]["members"]) == 4
    small = tmp_path / "small"
    for a in ("eagle", "wolf"):
        write_jsonl(small / f"{a}.jsonl", trait_qa("animals", a, 4, seed=1))
    assert "needs at least 3" in _one_line_error(runner.invoke(
        app, ["scan", str(datasets["owl"]), "--student", str(tiny_model), "--panel", str(small)]))
    assert "bad.jsonl: row 2" in _one_line_error(runner.invoke(
        app, ["scan", str(datasets["owl"]), "--student", str(tiny_model), "--panel", str(datasets["dir"])]))
