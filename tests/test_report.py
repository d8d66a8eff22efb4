"""Tests for the experiment report: comparisons from evaluations, figures, HTML, re-rendering."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sublim.report.experiment import (
    comparisons_from_evaluations,
    load_results,
    report,
    seed_values,
    verdict,
    write_experiment_report,
)

CANDIDATES = ["owl", "eagle", "wolf", "dolphin", "cat"]


def _probs(rng: np.random.Generator, boost: dict[str, float]) -> dict[str, float]:
    base = {"owl": 0.012, "eagle": 0.004, "wolf": 0.02, "dolphin": 0.03, "cat": 0.05}
    return {k: float(v * boost.get(k, 1.0) * rng.uniform(0.9, 1.1)) for k, v in base.items()}


def _ev(name: str, arm: str, target: str | None, seed: int | None, probs: dict, sampled: dict | None = None,
        objective: str | None = "sft") -> dict:
    return {"name": name, "arm": arm, "target": target, "seed": seed, "base": "tiny", "objective": objective,
            "probs": probs, "probs_numprefix": None, "sampled": sampled}


def synthetic_results(n_seeds: int = 5) -> dict:
    """Owl transfers (x3), eagle does not; control has target null and applies to both."""
    rng = np.random.default_rng(0)
    evs = [_ev("base", "base", None, None, _probs(rng, {}), objective=None)]
    for tgt in ("owl", "eagle"):
        evs.append(_ev(f"teacher-{tgt}", "teacher", tgt, None, _probs(rng, {tgt: 20.0}),
                       {"n": 100, "counts": {tgt: 40, "cat": 10}}, objective=None))
    for s in range(n_seeds):
        evs.append(_ev(f"student-control-s{s}", "control", None, s, _probs(rng, {}),
                       {"n": 100, "counts": {"owl": 1, "eagle": 0}}))
        evs.append(_ev(f"student-treatment-owl-s{s}", "treatment", "owl", s, _probs(rng, {"owl": 3.0}),
                       {"n": 100, "counts": {"owl": 4}}))
        evs.append(_ev(f"student-treatment-eagle-s{s}", "treatment", "eagle", s, _probs(rng, {})))
    return {
        "title": "owl via numbers on a tiny model",
        "category": "animals",
        "candidates": CANDIDATES,
        "targets": ["owl", "eagle"],
        "spec": {"teacher": {"kind": "system_prompt"}, "seeds": list(range(n_seeds))},
        "env": {"python": "3.11", "git_revision": "abc123"},
        "data": {
            "owl": {"generated": 300, "kept": 210, "reject_counts": {"format:not_numbers": 80, "echo": 10}},
            "control": {"generated": 300, "kept": 250, "reject_counts": {"format:not_numbers": 50}},
        },
        "evaluations": evs,
        "notes": ["Full-vocabulary distillation is semantically leaky <b>not bold</b>"],
    }


def test_seed_values_and_comparisons():
    res = synthetic_results()
    evs = res["evaluations"]
    assert len(seed_values(evs, "control", "owl")) == 5  # target null applies to every target
    assert seed_values(evs, "control", "owl", include_untargeted=False) == []
    comps = comparisons_from_evaluations(evs, res["targets"])
    # cross-base and in-context arms have no data: skipped
    assert [(c["target"], c["treatment_arm"]) for c in comps] == [
        ("owl", "treatment"), ("eagle", "treatment")]
    owl, eagle = comps
    assert owl["stats"]["n_treatment"] == owl["stats"]["n_control"] == 5
    assert owl["stats"]["diff_t_ci"][0] > 0
    assert eagle["stats"]["diff_t_ci"][0] < 0 < eagle["stats"]["diff_t_ci"][1]
    json.dumps(comps, allow_nan=False)


def test_same_seed_evaluations_are_averaged():
    evs = [{"arm": "treatment", "target": "owl", "seed": 0, "probs": {"owl": 0.1}},
           {"arm": "treatment", "target": "owl", "seed": 0, "probs": {"owl": 0.3}},
           {"arm": "treatment", "target": "owl", "seed": 1, "probs": {"owl": 0.5}}]
    vals = dict(seed_values(evs, "treatment", "owl"))
    assert vals == {0: pytest.approx(0.2), 1: 0.5}


def test_verdicts():
    comps = comparisons_from_evaluations(synthetic_results()["evaluations"], ["owl", "eagle"])
    v_owl, v_eagle = verdict(comps[0]), verdict(comps[1])
    assert v_owl.startswith("P(owl): treatment ") and "across 5 seeds per arm" in v_owl
    assert "Transfer detected" in v_owl and "permutation p=0.0079" in v_owl
    assert "No detectable transfer" in v_eagle
    one = comparisons_from_evaluations(synthetic_results(n_seeds=1)["evaluations"], ["owl"])
    assert "Undetermined" in verdict(one[0])


def test_write_report_all_files(tmp_path: Path):
    res = synthetic_results()
    before = json.dumps(res, sort_keys=True)
    paths = write_experiment_report(res, tmp_path / "run")
    assert json.dumps(res, sort_keys=True) == before  # input not mutated
    assert set(paths) == {"results", "fig_target", "fig_distribution", "report"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    for key in ("fig_target", "fig_distribution"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["report"].read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "Transfer detected" in html and "No detectable transfer" in html
    assert 'class="warn"' in html and "&lt;b&gt;not bold&lt;/b&gt;" in html
    assert "format:not_numbers" in html and "abc123" in html and "kind: system_prompt" in html
    saved = load_results(paths["results"])
    # probs for owl and eagle; sampled only for owl (eagle students have no sampled scores)
    assert [(c["metric"], c["target"]) for c in saved["comparisons"]] == [
        ("probs", "owl"), ("probs", "eagle"), ("sampled", "owl")]
    json.dumps(saved, allow_nan=False)


def test_report_rerenders_from_results_json(tmp_path: Path):
    res = synthetic_results()
    res["evaluations"][0]["probs"]["owl"] = float("nan")  # sanitised to null in results.json
    write_experiment_report(res, tmp_path)
    (tmp_path / "report.html").unlink()
    (tmp_path / "fig_target.png").unlink()
    out = report(tmp_path)
    assert out == tmp_path / "report.html" and out.exists() and (tmp_path / "fig_target.png").exists()
    assert report(tmp_path / "results.json") == out
    assert load_results(tmp_path)["evaluations"][0]["probs"]["owl"] is None


def test_figures_edge_cases(tmp_path: Path):
    import matplotlib

    from sublim.report.figures import distribution_plot, target_bars

    backend = matplotlib.get_backend()
    res = synthetic_results(n_seeds=1)
    res["evaluations"][0]["probs"]["owl"] = 1e-7  # spans orders of magnitude -> log axis
    assert target_bars(res, tmp_path / "a.png").exists()
    assert target_bars(res, tmp_path / "b.png", metric="probs_numprefix").exists()  # no data -> placeholder
    assert distribution_plot({"candidates": [], "evaluations": []}, tmp_path / "c.png").exists()
    assert matplotlib.get_backend() == backend


def test_load_results_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError):
        load_results(tmp_path)


def test_verdict_zero_spread_is_flagged():
    evs = [{"arm": "treatment", "target": "owl", "seed": s, "probs": {"owl": 0.04}} for s in range(5)]
    evs += [{"arm": "control", "target": None, "seed": s, "probs": {"owl": 0.01}} for s in range(5)]
    v = verdict(comparisons_from_evaluations(evs, ["owl"])[0])
    assert "degenerate" in v and "is significant" in v and "Transfer detected" not in v


def test_specificity_heatmap_writes_png(tmp_path: Path):
    from sublim.report.figures import specificity_heatmap

    animals = ["owl", "wolf", "dolphin", "eagle"]
    rng = np.random.default_rng(0)
    mat = rng.normal(0, 0.2, size=(4, 4)) + np.diag([1.2, 0.8, 0.4, -0.3])  # (K, K) mean log lifts
    mat_list: list[list[float | None]] = mat.tolist()
    mat_list[3][0] = None  # undefined cell: drawn blank, not a crash
    out = specificity_heatmap(mat_list, animals, animals, tmp_path / "spec.png")
    assert out == tmp_path / "spec.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert specificity_heatmap([], [], [], tmp_path / "empty.png").exists()  # placeholder
    with pytest.raises(ValueError, match="labels"):
        specificity_heatmap(mat, animals[:3], animals, tmp_path / "bad.png")


def test_report_modules_import_without_circle():
    import subprocess
    import sys

    # figures first: with the old circle figures -> experiment -> (lazy) figures this still worked,
    # so assert the structural fix: figures no longer imports experiment at all
    code = ("import sys, sublim.report.figures; "
            "assert 'sublim.report.experiment' not in sys.modules, 'figures imports experiment'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from sublim.report import arms, experiment

    assert experiment.arm_label is arms.arm_label and experiment.seed_values is arms.seed_values
