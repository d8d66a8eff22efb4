"""Evaluations -> teacher-level claims and the verdict text (sublim.analysis), on synthetic evaluations."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from sublim.analysis import records, teacher_level, verdict_text

ANIMALS = ["owl", "eagle", "wolf"]


def _evals(targets: list[str], reps: int, seeds: int, lift: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Students whose P(own animal) is exp(lift) times the neutral students', with seed and teacher noise."""
    evs: list[dict[str, Any]] = []
    for arm, ctrl in (("treatment", "control"),):
        for t in [*targets, None]:
            for r in range(reps):
                tnoise = rng.normal(0, 0.02)
                for s in range(seeds):
                    probs = {a: 0.04 * math.exp(rng.normal(0, 0.02) + tnoise + (lift if a == t else 0.0))
                             for a in ANIMALS}
                    evs.append({"arm": arm if t else ctrl, "target": t, "seed": s, "teacher": f"{t or 'neutral'}#{r}",
                                "probs": probs})
    return evs


def test_records_average_repeats_and_name_teachers_of_old_results() -> None:
    evs = [{"arm": "treatment", "target": "owl", "seed": 0, "probs": {"owl": 0.1}},
           {"arm": "treatment", "target": "owl", "seed": 0, "probs": {"owl": 0.3}},
           {"arm": "control", "target": None, "seed": 0, "probs": {"owl": 0.05}}]
    (r,) = records(evs, "treatment")
    assert r["teacher"] == "owl#0" and abs(r["scores"]["owl"] - 0.2) < 1e-12
    assert records(evs, "control")[0]["teacher"] == "neutral#0"


def test_replicated_specific_transfer_is_called_at_the_teacher_level() -> None:
    tl = teacher_level(_evals(ANIMALS, 3, 2, 0.5, np.random.default_rng(0)), ANIMALS, n_perm=2000)
    arm = tl["arms"]["same_base"]
    assert arm["error"] is None and abs(arm["confusion"]["gamma"] - 0.5) < 0.1
    assert all(e["treated"]["n_teachers"] == 3 for e in arm["effects"].values())
    assert all(x["call"] == "above" for e in arm["effects"].values() for x in e["per_teacher"])
    (text,) = verdict_text(tl)
    assert text.startswith("same base: specificity gamma +0.")
    assert "specific transfer" in text and "no specific" not in text
    assert "owl: transfer across 3 teachers" in text and "3 of 3 teachers individually above" in text


def test_a_null_is_reported_as_a_null() -> None:
    tl = teacher_level(_evals(ANIMALS, 3, 2, 0.0, np.random.default_rng(1)), ANIMALS, n_perm=2000)
    (text,) = verdict_text(tl)
    assert "no specific transfer shown at p < 0.001" in text


def test_one_teacher_is_one_draw() -> None:
    tl = teacher_level(_evals(["owl"], 1, 3, 0.5, np.random.default_rng(2)), ["owl"])
    arm = tl["arms"]["same_base"]
    assert arm["confusion"] is None and arm["effects"]["owl"]["diff_ci"] == [None, None]
    (text,) = verdict_text(tl)
    assert "one teacher is one draw" in text and "students are above the control" in text
    assert "no population claim" in text


def test_an_arm_without_controls_is_skipped() -> None:
    evs = [e for e in _evals(["owl"], 2, 2, 0.5, np.random.default_rng(3)) if e["arm"] == "treatment"]
    assert teacher_level(evs, ["owl"])["arms"] == {}


def test_a_confusion_design_without_neutral_teachers() -> None:
    """One teacher per animal, no neutral teachers: the other animals' teachers are the controls; the verdict
    gives each teacher's own call and says how small a p three teachers can give."""
    evs = [e for e in _evals(ANIMALS, 1, 5, 0.5, np.random.default_rng(3)) if e["target"] is not None]
    tl = teacher_level(evs, ANIMALS)
    arm = tl["arms"]["same_base"]
    assert arm["effects"] == {} and arm["confusion"]["reference_kind"].startswith("trait teachers")
    assert arm["confusion"]["n_teachers_above"] == 3
    (text,) = verdict_text(tl)
    assert "one teacher per animal" in text and "the smallest p 3 teachers can give: 0.167" in text
    assert "each teacher against the other animals' teachers" in text and "3 of 3 above" in text
    if arm["confusion"]["p_perm_greater"] <= 1 / 6 + 1e-12:
        assert "largest of all 6 relabelings" in text and "needs more teachers" in text
    null = teacher_level([e for e in _evals(ANIMALS, 1, 5, 0.0, np.random.default_rng(4)) if e["target"]],
                         ANIMALS)
    assert null["arms"]["same_base"]["confusion"]["n_teachers_above"] <= 1
