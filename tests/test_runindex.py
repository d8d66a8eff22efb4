"""The run registry: a failed run is recorded as failed, the CLI lists / shows / compares / indexes, bad queries
are one-line errors, and a registry that cannot be written never stops a run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sublim import runindex
from sublim.analysis import teacher_level
from sublim.cli import app

runner = CliRunner()


def _evals(lift: float) -> list[dict]:
    """Evaluations of two owl and two neutral teachers, 2 seeds each (what an experiment records)."""
    out = []
    for r in range(2):
        for s in range(2):
            jitter = 0.002 * (r - s)
            out.append({"arm": "treatment", "target": "owl", "teacher": f"owl#{r}", "seed": s,
                        "probs": {"owl": 0.04 * lift + jitter, "cat": 0.05}})
            out.append({"arm": "control", "target": None, "teacher": f"neutral#{r}", "seed": s,
                        "probs": {"owl": 0.04 + jitter, "cat": 0.05}})
    return out


def _results_dir(root: Path, name: str, lift: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    res = {"spec": {"name": name}, "seconds": 12.5, "teacher_level": teacher_level(_evals(lift), ["owl"])}
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_failed_run_is_recorded_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tiny_model: Path) -> None:
    from sublim.pipeline import run
    from sublim.spec import ExperimentSpec

    db = tmp_path / "runs.sqlite"
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(db))
    spec = ExperimentSpec.model_validate({"name": "broken", "base": {"path": str(tmp_path / "no-such-model")},
                                          "targets": ["owl"]})
    with pytest.raises(Exception, match="no-such-model"):
        run(spec, tmp_path / "run", log=lambda m: None)
    r = runindex.get_run(str(tmp_path / "run"), path=db)
    assert r["status"] == "failed" and "no-such-model" in r["error"] and r["finished"] is not None


def test_cli_ls_show_compare_index(tmp_path: Path) -> None:
    db = str(tmp_path / "runs.sqlite")
    _results_dir(tmp_path / "runs", "strong-owl", 2.0)
    _results_dir(tmp_path / "runs", "null-owl", 1.0)
    r = runner.invoke(app, ["runs", "index", str(tmp_path / "runs"), "--db", db])
    assert r.exit_code == 0 and "indexed 2 runs" in r.output
    r = runner.invoke(app, ["runs", "ls", "--db", db, "--json"])
    rows = [json.loads(x) for x in r.output.splitlines()]
    assert {x["name"] for x in rows} == {"strong-owl", "null-owl"} and all(x["status"] == "done" for x in rows)
    strong = next(x for x in rows if x["name"] == "strong-owl")
    assert strong["metrics"]["same_base.owl.ratio"] == pytest.approx(2.0, rel=0.05)
    assert "strong-owl" in runner.invoke(app, ["runs", "ls", "--db", db, "--name", "strong"]).output
    show = runner.invoke(app, ["runs", "show", "strong", "--db", db])
    assert show.exit_code == 0 and "same_base.owl.ratio" in show.output
    cmp = runner.invoke(app, ["runs", "compare", "strong-owl", "null-owl", "--db", db])
    assert cmp.exit_code == 0 and "same_base.owl.p" in cmp.output.splitlines()[-2] + cmp.output
    # one-line errors, exit 2
    for args, msg in ((["runs", "show", "nothing-like-it", "--db", db], "no run"),
                      (["runs", "show", "", "--db", db], "matches 2 runs"),
                      (["runs", "ls", "--status", "sleeping", "--db", db], "expected one of"),
                      (["runs", "compare", "strong-owl", "--db", db], "at least two"),
                      (["runs", "index", str(tmp_path / "absent"), "--db", db], "no such directory")):
        r = runner.invoke(app, args)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and msg in lines[0], (args, r.output)
    junk = tmp_path / "junk.sqlite"
    junk.write_text("this is not a database\n" * 50)
    r = runner.invoke(app, ["runs", "ls", "--db", str(junk)])
    assert r.exit_code == 2 and r.output.startswith("error: run registry")


def test_an_unwritable_registry_does_not_stop_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dir-not-db").mkdir()
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(tmp_path / "dir-not-db"))
    assert runindex.start(tmp_path / "run", "x", "abc") is False
    assert runindex.finish(tmp_path / "run", results={}) is False
    assert "run registry not updated" in capsys.readouterr().err


def test_a_failing_tracker_warns_and_never_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from sublim import runindex, trackers

    monkeypatch.setenv("SUBLIM_RUNS_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setenv("SUBLIM_TRACKERS", "nope")
    run = tmp_path / "r"
    run.mkdir()
    runindex.start(run, "r", "h")
    runindex.finish(run, results={"seconds": 1.0})
    trackers.on_finish(str(run))
    assert "warning: tracker nope not updated: unknown tracker 'nope'" in capsys.readouterr().err
