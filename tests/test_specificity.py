"""Tests for sublim.specificity: hand-computed teacher-level and confusion-matrix statistics, the
collapsed fit against a direct student-level fit, permutation calibration, and bad input."""
from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
from scipy import stats as st

from sublim.specificity import confusion_fit
from sublim.teacher_effects import P_FLOOR, lifts, teacher_effect

# Hand case: K=2 animals, 2 teachers each, 2 seeds. Lifts (col owl, col wolf) per student:
HAND_LIFTS = {
    "owl#0": [(1.0, 0.0), (1.2, 0.2)],  # teacher mean (1.1, 0.1)
    "owl#1": [(0.8, 0.1), (0.6, -0.1)],  # (0.7, 0.0)
    "wolf#0": [(0.0, 0.6), (0.2, 0.8)],  # (0.1, 0.7)
    "wolf#1": [(-0.2, 0.2), (0.0, 0.4)],  # (-0.1, 0.3)
}
# Neutral teachers, log P (owl, wolf): n#0 has 2 seeds, n#1 one. Teacher-level reference:
# owl = mean(mean(-3.2, -2.8), -2.0) = -2.5; wolf = mean(mean(-1.0, -1.0), -3.0) = -2.0.
# (A student-level mean would give owl -2.667: the teacher-first mean is what is asserted.)
HAND_CONTROL_LOGP = {"n#0": [(-3.2, -1.0), (-2.8, -1.0)], "n#1": [(-2.0, -3.0)]}
REF = (-2.5, -2.0)


def _hand() -> tuple[list[dict], list[dict]]:
    treated = [{"teacher": t, "trait": t.split("#")[0], "seed": s,
                "scores": {"owl": math.exp(lo + REF[0]), "wolf": math.exp(lw + REF[1])}}
               for t, seeds in HAND_LIFTS.items() for s, (lo, lw) in enumerate(seeds)]
    controls = [{"teacher": t, "trait": None, "seed": s, "scores": {"owl": math.exp(a), "wolf": math.exp(b)}}
                for t, seeds in HAND_CONTROL_LOGP.items() for s, (a, b) in enumerate(seeds)]
    return treated, controls


def _strict_json(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


def _synthetic(rng: np.random.Generator, k: int, teachers: int | list[int], seeds: int | list[list[int]],
               gamma: float = 0.0, sd_teacher: float = 0.3, sd_seed: float = 0.3, n_controls: int = 3,
               ) -> tuple[list[dict], list[dict], list[str]]:
    """Trait teachers of k animals; log P = -3 + animal offset + gamma*[own] + teacher + seed noise."""
    animals = [f"a{i}" for i in range(k)]
    off = rng.normal(0, 0.5, size=k)
    tcount = [teachers] * k if isinstance(teachers, int) else teachers
    treated, controls = [], []
    for i, a in enumerate(animals):
        for t in range(tcount[i]):
            te = rng.normal(0, sd_teacher, size=k)  # (k,) teacher-level deviation per scored animal
            ns = seeds if isinstance(seeds, int) else seeds[i][t]
            for s in range(ns):
                lp = -3 + off + gamma * (np.arange(k) == i) + te + rng.normal(0, sd_seed, size=k)
                treated.append({"teacher": f"{a}#{t}", "trait": a, "seed": s,
                                "scores": {b: float(np.exp(v)) for b, v in zip(animals, lp, strict=True)}})
    for t in range(n_controls):
        te = rng.normal(0, sd_teacher, size=k)
        for s in range(2):
            lp = -3 + off + te + rng.normal(0, sd_seed, size=k)
            controls.append({"teacher": f"neutral#{t}", "trait": None, "seed": s,
                             "scores": {b: float(np.exp(v)) for b, v in zip(animals, lp, strict=True)}})
    return treated, controls, animals


# ------------------------------------------------------------------------------------------ lifts


def test_lifts_teacher_level_reference():
    treated, controls = _hand()
    r = lifts(treated, controls, ["owl", "wolf"])
    assert r["reference"]["owl"] == pytest.approx(-2.5, abs=1e-12)
    assert r["reference"]["wolf"] == pytest.approx(-2.0, abs=1e-12)
    assert len(r["records"]) == 8
    first = r["records"][0]
    assert first["teacher"] == "owl#0" and first["trait"] == "owl" and first["seed"] == 0
    assert first["lift"]["owl"] == pytest.approx(1.0, abs=1e-12)
    assert first["lift"]["wolf"] == pytest.approx(0.0, abs=1e-12)
    _strict_json(r)


def test_lifts_floor_zero_probability():
    treated = [{"teacher": "owl#0", "trait": "owl", "seed": 0, "scores": {"owl": 0.0}}]
    controls = [{"teacher": "n#0", "trait": None, "seed": 0, "scores": {"owl": 1.0}}]
    r = lifts(treated, controls, ["owl"])
    assert r["records"][0]["lift"]["owl"] == pytest.approx(math.log(P_FLOOR), rel=1e-12)


# ---------------------------------------------------------------------------------- teacher_effect


def test_teacher_effect_hand_case():
    treated, controls = _hand()
    r = teacher_effect(treated, controls, "owl")
    # teacher values, log P(owl): owl teachers 1.1-2.5=-1.4, 0.7-2.5=-1.8; neutral -3.0, -2.0
    tv, cv = [-1.4, -1.8], [-3.0, -2.0]
    assert r["animal"] == r["trait"] == "owl"
    assert r["diff"] == pytest.approx(-1.6 - -2.5, abs=1e-12)  # 0.9
    assert r["ratio"] == pytest.approx(math.exp(0.9), rel=1e-12)
    ref = st.ttest_ind(tv, cv, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert r["diff_ci"][0] == pytest.approx(ci.low, rel=1e-9)
    assert r["diff_ci"][1] == pytest.approx(ci.high, rel=1e-9)
    assert r["p_welch"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert r["ratio_ci"] == pytest.approx([math.exp(ci.low), math.exp(ci.high)], rel=1e-9)
    # exact permutation over C(4,2)=6 teacher relabelings: diffs +-0.9, +-0.7, +-0.3
    assert r["p_perm_greater"] == pytest.approx(1 / 6, abs=1e-12)
    assert r["p_perm"] == pytest.approx(2 / 6, abs=1e-12)
    # nested level
    tr, co = r["treated"], r["control"]
    assert (tr["n_teachers"], tr["n_seeds"], co["n_teachers"], co["n_seeds"]) == (2, 4, 2, 3)
    assert tr["mean"] == pytest.approx(-1.6, abs=1e-12)
    assert tr["sd_between"] == pytest.approx(math.sqrt(0.08), rel=1e-9)  # (-1.4, -1.8)
    assert tr["sd_within"] == pytest.approx(math.sqrt(0.04 / 2), rel=1e-9)  # 4 deviations of 0.1, 2 df
    assert co["sd_between"] == pytest.approx(math.sqrt(0.5), rel=1e-9)  # (-3, -2)
    assert co["sd_within"] == pytest.approx(math.sqrt(0.08 / 1), rel=1e-9)  # n#0: -3.2, -2.8; n#1 1 seed
    assert r["sd_within"] == pytest.approx(math.sqrt((0.04 + 0.08) / 3), rel=1e-9)
    assert [t["teacher"] for t in tr["teachers"]] == ["owl#0", "owl#1"]
    assert [t["value"] for t in tr["teachers"]] == pytest.approx([-1.4, -1.8], abs=1e-12)
    assert [t["n_seeds"] for t in co["teachers"]] == [2, 1]
    # student level, for contrast: seeds treated as independent
    sl = r["student_level"]
    assert "ignores the teacher level" in sl["note"]
    assert sl["stats"]["n_treatment"] == 4 and sl["stats"]["n_control"] == 3
    _strict_json(r)


def test_teacher_effect_other_trait_and_single_teacher():
    treated, controls = _hand()
    # does teaching wolf raise P(owl)? wolf teachers' log P(owl): 0.1-2.5, -0.1-2.5 -> mean -2.5 = neutral
    r = teacher_effect(treated, controls, "owl", trait="wolf")
    assert r["trait"] == "wolf" and r["diff"] == pytest.approx(0.0, abs=1e-12)
    one = [rec for rec in treated if rec["teacher"] != "owl#1"]
    r1 = teacher_effect(one, controls, "owl")
    assert r1["treated"]["n_teachers"] == 1
    assert r1["diff_ci"] == [None, None] and r1["ratio_ci"] == [None, None] and r1["p_welch"] is None
    assert r1["treated"]["sd_between"] is None
    assert r1["diff"] == pytest.approx(-1.4 - -2.5, abs=1e-12)
    assert r1["p_perm_greater"] == pytest.approx(1 / 3, abs=1e-12)  # 3 relabelings, observed the largest
    _strict_json(r1)


# ----------------------------------------------------------------------------------- confusion_fit


def test_confusion_fit_hand_case():
    treated, controls = _hand()
    r = confusion_fit(treated, controls, ["owl", "wolf", "cat"])  # cat: no teacher, dropped
    assert r["animals"] == ["owl", "wolf"] and r["dropped_animals"] == ["cat"]
    assert (r["n_teachers"], r["n_students"], r["n_obs"], r["n_params"]) == (4, 8, 16, 4)
    # cell means m[row][col] (mean over a row's students): [[0.9, 0.05], [0.0, 0.5]]
    assert np.asarray(r["matrix"]) == pytest.approx(np.array([[0.9, 0.05], [0.0, 0.5]]), abs=1e-12)
    # balanced: gamma = mean diagonal - mean off-diagonal = (0.9 + 0.5)/2 - (0.05 + 0.0)/2 = 0.675
    assert r["gamma"] == pytest.approx(0.675, abs=1e-12)
    # sum-to-zero effects: grand mean 1.45/4 = 0.3625; mu = 0.3625 - gamma/K = 0.025;
    # row effect = row mean - grand = 0.475 - 0.3625; col effect = 0.45 - 0.3625
    assert r["mu"] == pytest.approx(0.025, abs=1e-12)
    assert r["row_effects"] == pytest.approx({"owl": 0.1125, "wolf": -0.1125}, abs=1e-12)
    assert r["col_effects"] == pytest.approx({"owl": 0.0875, "wolf": -0.0875}, abs=1e-12)
    # CR1 by hand. The K=2 model is saturated in the cells, so gamma = h'y with h = +-1/(2*4) per
    # observation (+ on the diagonal, 4 students per row) and residual = lift - cell mean. Per teacher,
    # h_g'u_g = (1/8)(sum of diagonal residuals - sum of off-diagonal residuals):
    #   owl#0: residual sums (2*(1.1-0.9), 2*(0.1-0.05)) = (0.4, 0.1) -> (0.4-0.1)/8 = +0.0375
    #   owl#1: (-0.4, -0.1) -> -0.0375;  wolf#0: (owl 0.2, wolf 0.4) -> (0.4-0.2)/8 = +0.025
    #   wolf#1: (-0.2, -0.4) -> -0.025
    # V = sum (h_g'u_g)^2 * G/(G-1) * (N-1)/(N-p) = (2*0.0375^2 + 2*0.025^2) * 4/3 * 15/12
    se = math.sqrt((2 * 0.0375**2 + 2 * 0.025**2) * (4 / 3) * (15 / 12))
    assert r["gamma_se"] == pytest.approx(se, rel=1e-9)
    tq = st.t.ppf(0.975, 3)
    assert r["gamma_df"] == 3
    assert r["gamma_ci"] == pytest.approx([0.675 - tq * se, 0.675 + tq * se], rel=1e-9)
    assert r["p_gamma_t"] == pytest.approx(2 * st.t.sf(0.675 / se, 3), rel=1e-9)
    # exact permutation: 4!/(2!2!) = 6 relabelings; gamma = +-0.675, +-0.125, +-0.025 (by hand:
    # e.g. rows {owl#0, wolf#0} / {owl#1, wolf#1}: cells [[0.6, 0.4], [0.3, 0.15]] -> 0.025)
    assert r["perm_method"] == "exact" and r["n_perm"] == 6
    assert r["p_perm_greater"] == pytest.approx(1 / 6, abs=1e-12)
    assert r["p_perm"] == pytest.approx(2 / 6, abs=1e-12)
    # diagonal, teacher as unit. owl: own (1.1, 0.7) vs wolf teachers' owl lift (0.1, -0.1)
    d = {x["animal"]: x for x in r["diagonal"]}
    assert d["owl"]["own_mean"] == pytest.approx(0.9) and d["owl"]["other_mean"] == pytest.approx(0.0)
    ci = st.ttest_ind([1.1, 0.7], [0.1, -0.1], equal_var=False).confidence_interval(0.95)
    assert d["owl"]["diff"] == pytest.approx(0.9, abs=1e-12)
    assert d["owl"]["ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert d["wolf"]["diff"] == pytest.approx(0.5 - 0.05, abs=1e-12)  # own (0.7, 0.3) vs (0.1, 0.0)
    assert (d["wolf"]["n_own_teachers"], d["wolf"]["n_other_teachers"]) == (2, 2)
    n_above = sum(1 for x in r["diagonal"] if x["ci"][0] > 0)
    assert r["n_diagonal_above_zero"] == n_above and r["n_diagonal_defined"] == 2
    _strict_json(r)


def _student_level(treated: list[dict], controls: list[dict], animals: list[str]):
    """Direct student-level OLS + slow CR1, the way the brief states it (no collapse)."""
    lf = lifts(treated, controls, animals)["records"]
    k = len(animals)
    xs, ys, cl = [], [], []
    for rec in lf:
        r = animals.index(rec["trait"])
        for c, a in enumerate(animals):
            x = np.zeros(2 * k)
            x[0] = 1
            if r < k - 1:
                x[1 + r] = 1
            else:
                x[1:k] = -1
            if c < k - 1:
                x[k + c] = 1
            else:
                x[k:2 * k - 1] = -1
            x[-1] = float(r == c)
            xs.append(x)
            ys.append(rec["lift"][a])
            cl.append(rec["teacher"])
    x, y = np.array(xs), np.array(ys)
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    u = y - x @ beta
    n, p = x.shape
    groups = sorted(set(cl))
    meat = np.zeros((p, p))
    for g in groups:
        m = np.array([c == g for c in cl])
        sg = x[m].T @ u[m]
        meat += np.outer(sg, sg)
    binv = np.linalg.inv(x.T @ x)
    gn = len(groups)
    v = binv @ meat @ binv * gn / (gn - 1) * (n - 1) / (n - p)
    return beta, math.sqrt(v[-1, -1])


@pytest.mark.parametrize("balanced", [True, False])
def test_collapsed_fit_equals_student_level_fit(balanced: bool):
    rng = np.random.default_rng(1 if balanced else 2)
    if balanced:
        treated, controls, animals = _synthetic(rng, 3, 3, 2, gamma=0.4)
    else:  # unequal teachers per animal and unequal seeds per teacher
        seeds = [[1, 3, 2], [4, 2], [2, 1, 3, 2]]
        treated, controls, animals = _synthetic(rng, 3, [3, 2, 4], seeds, gamma=0.4)
    r = confusion_fit(treated, controls, animals, n_perm=50)
    beta, se = _student_level(treated, controls, animals)
    k = len(animals)
    assert r["mu"] == pytest.approx(beta[0], abs=1e-9)
    assert list(r["row_effects"].values())[:-1] == pytest.approx(list(beta[1:k]), abs=1e-9)
    assert list(r["col_effects"].values())[:-1] == pytest.approx(list(beta[k:2 * k - 1]), abs=1e-9)
    assert sum(r["row_effects"].values()) == pytest.approx(0.0, abs=1e-12)
    assert r["gamma"] == pytest.approx(beta[-1], abs=1e-9)
    assert r["gamma_se"] == pytest.approx(se, rel=1e-9)


def test_exact_permutation_matches_brute_force():
    rng = np.random.default_rng(3)
    treated, controls, animals = _synthetic(rng, 3, [2, 1, 2], [[1, 2], [3], [2, 1]], gamma=0.5)
    r = confusion_fit(treated, controls, animals, n_perm=10_000)
    assert r["perm_method"] == "exact" and r["n_perm"] == 30  # 5!/(2!1!2!)
    teachers = list(dict.fromkeys(rec["teacher"] for rec in treated))
    labels = [t.split("#")[0] for t in teachers]
    gammas = set()
    for perm in set(itertools.permutations(labels)):
        relabel = dict(zip(teachers, perm, strict=True))
        moved = [{**rec, "trait": relabel[rec["teacher"]]} for rec in treated]
        gammas.add((perm, _student_level(moved, controls, animals)[0][-1]))
    gs = np.array([g for _, g in gammas])
    assert gs.size == 30
    tol = 1e-9
    assert r["p_perm_greater"] == pytest.approx(float((gs >= r["gamma"] - tol).mean()), abs=1e-12)
    assert r["p_perm"] == pytest.approx(float((np.abs(gs) >= abs(r["gamma"]) - tol).mean()), abs=1e-12)


def test_permutation_null_is_not_small_and_planted_diagonal_is_found():
    rng = np.random.default_rng(4)
    ps = []
    for _ in range(30):
        treated, controls, animals = _synthetic(rng, 4, 3, 2, gamma=0.0)
        r = confusion_fit(treated, controls, animals, n_perm=199, seed=int(rng.integers(1 << 30)))
        assert r["perm_method"] == "monte_carlo" and r["n_perm"] == 199
        ps.append(r["p_perm_greater"])
    ps_arr = np.array(ps)
    assert 0.3 < ps_arr.mean() < 0.7  # uniform: mean 0.5, sd of the mean ~0.053
    assert (ps_arr < 0.05).sum() <= 5  # expected 1.5 of 30
    assert ps_arr.min() >= 1 / 200
    treated, controls, animals = _synthetic(rng, 5, 4, 3, gamma=0.8)
    r = confusion_fit(treated, controls, animals, n_perm=2000)
    assert r["gamma"] == pytest.approx(0.8, abs=0.15)
    assert r["gamma_ci"][0] < 0.8 < r["gamma_ci"][1]
    assert r["p_perm_greater"] < 0.01 and r["p_perm"] < 0.01
    assert r["n_diagonal_above_zero"] >= 4
    _strict_json(r)


def test_confusion_fit_is_fast():
    rng = np.random.default_rng(5)
    treated, controls, animals = _synthetic(rng, 10, 5, 3, gamma=0.3)
    t0 = time.perf_counter()
    r = confusion_fit(treated, controls, animals, n_perm=10_000)
    elapsed = time.perf_counter() - t0
    assert r["n_perm"] == 10_000 and len(r["matrix"]) == 10
    assert elapsed < 5.0, f"confusion_fit took {elapsed:.2f}s"  # ~0.2 s on one core


def test_confusion_fit_with_a_single_teacher_animal_does_not_crash():
    rng = np.random.default_rng(6)
    treated, controls, animals = _synthetic(rng, 3, [1, 2, 2], 2, gamma=0.5)
    r = confusion_fit(treated, controls, animals, n_perm=100)
    d = {x["animal"]: x for x in r["diagonal"]}
    assert d["a0"]["ci"] == [None, None] and d["a0"]["n_own_teachers"] == 1
    assert r["n_diagonal_defined"] == 2
    assert r["gamma_se"] is not None
    _strict_json(r)


# --------------------------------------------------------------------------------------- bad input


def test_bad_input():
    treated, controls = _hand()
    with pytest.raises(ValueError, match="no treated teacher with trait 'unicorn'"):
        teacher_effect(treated, controls, "unicorn")
    with pytest.raises(ValueError, match="no score for animal 'unicorn'"):
        teacher_effect(treated, controls, "unicorn", trait="owl")
    with pytest.raises(ValueError, match="no treated teacher with trait 'cat'"):
        teacher_effect(treated, controls, "owl", trait="cat")
    with pytest.raises(ValueError, match="not in animals"):
        confusion_fit(treated, controls, ["owl"])
    with pytest.raises(ValueError, match="no score for animal 'cat'"):
        lifts(treated, controls, ["owl", "cat"])
    for fn, args in [(lifts, (["owl"],)), (teacher_effect, ("owl",))]:
        with pytest.raises(ValueError, match="no control records"):
            fn(treated, [], *args)
    only_owl = [r for r in treated if r["trait"] == "owl"]
    with pytest.raises(ValueError, match=">= 2 animals"):
        confusion_fit(only_owl, controls, ["owl", "wolf"])
    with pytest.raises(ValueError, match="controls are neutral"):
        teacher_effect(treated, [{**controls[0], "trait": "owl"}], "owl")
    with pytest.raises(ValueError, match="seed repeated"):
        teacher_effect([*treated, treated[0]], controls, "owl")
    with pytest.raises(ValueError, match="in both treated and controls"):
        teacher_effect(treated, [*controls, {**treated[0], "trait": None}], "owl")
    with pytest.raises(ValueError, match="not a finite probability"):
        lifts([{**treated[0], "scores": {"owl": float("nan")}}], controls, ["owl"])


def test_confusion_fit_per_teacher_calls_and_no_neutral_teachers():
    """Each teacher's own call by hand (Welch of its students' lift of its animal against the other animals'
    teachers' students), and a design without neutral teachers: gamma, the diagonal effects and the calls do
    not depend on the reference; only the lifts shown move, by a whole column."""
    treated, controls = _hand()
    r = confusion_fit(treated, controls, ["owl", "wolf"])
    per = {d["teacher"]: d for d in r["per_teacher"]}
    # owl#0: owl lifts (1.0, 1.2) vs the wolf teachers' owl lifts (0.0, 0.2, -0.2, 0.0)
    ref = st.ttest_ind([1.0, 1.2], [0.0, 0.2, -0.2, 0.0], equal_var=False)
    ci = ref.confidence_interval(0.95)
    d = per["owl#0"]
    assert (d["animal"], d["n_seeds"], d["n_other"]) == ("owl", 2, 4)
    assert d["diff"] == pytest.approx(1.1, abs=1e-12)
    assert d["ci"] == pytest.approx([ci.low, ci.high], rel=1e-9) and d["p_welch"] == pytest.approx(ref.pvalue)
    assert d["call"] == ("above" if ci.low > 0 else "none")
    # wolf#1: wolf lifts (0.2, 0.4) vs the owl teachers' wolf lifts (0.0, 0.2, 0.1, -0.1)
    assert per["wolf#1"]["diff"] == pytest.approx(0.3 - 0.05, abs=1e-12)
    assert r["n_teachers_above"] == sum(1 for x in r["per_teacher"] if x["call"] == "above")
    assert r["reference_kind"] == "neutral teachers"
    bare = confusion_fit(treated, [], ["owl", "wolf"])
    assert bare["reference_kind"].startswith("trait teachers")
    for k in ("gamma", "gamma_se", "p_perm_greater", "p_perm"):
        assert bare[k] == pytest.approx(r[k], abs=1e-12)
    assert [d["diff"] for d in bare["diagonal"]] == pytest.approx([d["diff"] for d in r["diagonal"]], abs=1e-12)
    assert [d["ci"] for d in bare["per_teacher"]] == [pytest.approx(d["ci"], abs=1e-12) for d in r["per_teacher"]]
    # the reference: mean of the four trait teachers' means, log P (owl) = REF + (1.1+0.7+0.1-0.1)/4
    shift = np.asarray(bare["matrix"]) - np.asarray(r["matrix"])
    assert shift[:, 0] == pytest.approx([-0.45, -0.45], abs=1e-12)
    _strict_json(bare)


# ----------------------------------------------------------------------------------- ratios of two fits


def test_gamma_influence_hand_case_and_its_sum_of_squares_is_the_variance():
    treated, controls = _hand()
    r = confusion_fit(treated, controls, ["owl", "wolf"])
    # the per-teacher terms h_g'u_g computed by hand in test_confusion_fit_hand_case
    assert r["gamma_influence"] == pytest.approx({"owl#0": 0.0375, "owl#1": -0.0375, "wolf#0": 0.025,
                                                  "wolf#1": -0.025}, abs=1e-12)
    inf = np.array(list(r["gamma_influence"].values()))
    assert r["gamma_cr1_factor"] == pytest.approx(4 / 3 * 15 / 12)
    assert math.sqrt(r["gamma_cr1_factor"] * float(inf @ inf)) == pytest.approx(r["gamma_se"], rel=1e-12)


def _scaled(records: list[dict], k: float, rng: np.random.Generator | None = None, sd: float = 0.0) -> list[dict]:
    """The same students with every log P multiplied by k (plus, optionally, per-student noise)."""
    out = []
    for rec in records:
        noise = rng.normal(0, sd, size=len(rec["scores"])) if rng is not None else np.zeros(len(rec["scores"]))
        out.append({**rec, "scores": {a: float(np.exp(k * math.log(p) + e))
                                      for (a, p), e in zip(rec["scores"].items(), noise, strict=True)}})
    return out


def test_gamma_ratio_of_a_scaled_fit_is_exact_and_of_noisy_fits_is_fiellers():
    from sublim.specificity import gamma_ratio
    from sublim.stats import fieller

    rng = np.random.default_rng(7)
    treated, _, animals = _synthetic(rng, 3, 4, 2, gamma=0.8, sd_teacher=0.2)
    den = confusion_fit(treated, [], animals, n_perm=10)
    # every lift halved: gamma and every teacher's influence halve, so the interval collapses onto 0.5
    half = confusion_fit(_scaled(treated, 0.5), [], animals, n_perm=10)
    r = gamma_ratio(half, den)
    assert r["bounded"] and r["n"] == 12
    assert (r["ratio"], r["lo"], r["hi"]) == pytest.approx((0.5, 0.5, 0.5), abs=1e-6)
    # independent noise on top: the interval widens around the ratio, and equals Fieller's from the two
    # variances (each fit's own gamma_se^2) and the covariance of the paired influences
    noisy = confusion_fit(_scaled(treated, 0.5, rng, 0.3), [], animals, n_perm=10)
    r = gamma_ratio(noisy, den)
    a, b = noisy["gamma_influence"], den["gamma_influence"]
    cov = math.sqrt(noisy["gamma_cr1_factor"] * den["gamma_cr1_factor"]) * sum(a[t] * b[t] for t in a)
    want = fieller(noisy["gamma"], den["gamma"], noisy["gamma_se"] ** 2, den["gamma_se"] ** 2, cov, 11)
    assert r["lo"] < r["ratio"] < r["hi"] and (r["lo"], r["hi"]) == pytest.approx((want["lo"], want["hi"]))
    # a denominator that is not distinguishable from zero gives no bounds
    flat = confusion_fit(_synthetic(np.random.default_rng(8), 3, 4, 2, gamma=0.0)[0], [], animals, n_perm=10)
    assert not gamma_ratio(noisy, flat)["bounded"] or flat["gamma_ci"][0] > 0 or flat["gamma_ci"][1] < 0
    with pytest.raises(ValueError, match="same teachers"):
        gamma_ratio(confusion_fit(treated[:-2], [], animals, n_perm=10), den)


def test_diagonal_ratio_hand_case_and_fiellers_interval():
    """owl's diagonal in the hand case: its own teachers' mean lifts (1.1, 0.7) vs wolf's teachers' (0.1, -0.1):
    diff 0.9, halved 0.45; two teachers a side cannot bound the ratio (Welch df 1.5). On a larger design the
    interval is Fieller's from the Welch variances (s^2/n per group) and the paired covariance."""
    from sublim.specificity import diagonal_ratio
    from sublim.stats import fieller

    treated, _ = _hand()
    r = diagonal_ratio(_scaled(treated, 0.5), treated, "owl", ["owl", "wolf"])
    assert r["den"]["diff"] == pytest.approx(0.9, abs=1e-12) and r["num"]["diff"] == pytest.approx(0.45, abs=1e-12)
    assert r["ratio"] == pytest.approx(0.5) and not r["bounded"] and r["n"] == 2

    rng = np.random.default_rng(11)
    den, _, animals = _synthetic(rng, 3, 4, 2, gamma=0.8, sd_teacher=0.2)
    r = diagonal_ratio(_scaled(den, 0.5), den, "a1", animals)  # (Fieller's root of a zero discriminant: 1e-8)
    assert r["bounded"] and (r["ratio"], r["lo"], r["hi"]) == pytest.approx((0.5, 0.5, 0.5), abs=1e-6)
    num = _scaled(den, 0.5, rng, 0.3)
    r = diagonal_ratio(num, den, "a1", animals)
    cells = {(key, rec["teacher"]): [] for key in "nd" for rec in den}
    for recs, key in ((num, "n"), (den, "d")):
        for x in recs:
            cells[key, x["teacher"]].append(math.log(x["scores"]["a1"]))
    m = {k: float(np.mean(v)) for k, v in cells.items()}
    own = [t for k, t in m if k == "d" and t.startswith("a1#")]
    oth = [t for k, t in m if k == "d" and not t.startswith("a1#")]

    def cov(x: str, y: str) -> float:
        return sum(float(np.cov([m[x, t] for t in g], [m[y, t] for t in g], ddof=1)[0, 1]) / len(g) for g in (own, oth))

    want = fieller(r["num"]["diff"], r["den"]["diff"], cov("n", "n"), cov("d", "d"), cov("n", "d"), r["den"]["df"])
    assert r["bounded"] and r["lo"] < r["ratio"] < r["hi"]
    assert (r["ratio"], r["lo"], r["hi"]) == pytest.approx((want["ratio"], want["lo"], want["hi"]))
    assert r["num"]["diff"] == pytest.approx(np.mean([m["n", t] for t in own]) - np.mean([m["n", t] for t in oth]))
    with pytest.raises(ValueError, match="same teachers"):
        diagonal_ratio(num[:-2], den, "a1", animals)
