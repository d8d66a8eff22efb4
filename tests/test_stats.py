"""Tests for sublim.stats: hand-computed values, determinism, edge cases, JSON-safety."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as st

from sublim.stats import (
    bootstrap_diff_ci,
    compare,
    hedges_g,
    mean_ci,
    permutation_test,
    seeds_needed,
    welch,
    wilson,
)


def _strict_json(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


def test_mean_ci_hand_computed():
    r = mean_ci([1, 2, 3, 4, 5])
    sd = math.sqrt(2.5)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4}
    assert r["n"] == 5
    assert r["mean"] == pytest.approx(3.0)
    assert r["sd"] == pytest.approx(sd)
    assert r["lo"] == pytest.approx(3 - half, rel=1e-9)
    assert r["hi"] == pytest.approx(3 + half, rel=1e-9)
    r90 = mean_ci([1, 2, 3, 4, 5], conf=0.90)
    assert r90["hi"] - r90["lo"] < r["hi"] - r["lo"]


def test_mean_ci_edge_cases():
    assert mean_ci([0.2]) == {"mean": 0.2, "sd": None, "n": 1, "lo": None, "hi": None}
    assert mean_ci([]) == {"mean": None, "sd": None, "n": 0, "lo": None, "hi": None}
    z = mean_ci([0.5, 0.5, 0.5])
    assert z["lo"] == z["hi"] == z["mean"] == 0.5 and z["sd"] == 0.0
    nan = mean_ci([1.0, float("nan"), 3.0, None])  # type: ignore[list-item]
    assert nan["n"] == 2 and nan["mean"] == 2.0
    for r in (z, nan, mean_ci([1.0])):
        _strict_json(r)
        assert all(not isinstance(v, np.generic) for v in r.values())


def test_wilson_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_permutation_exact_by_hand():
    # t={3,4}, c={1,2}: the 6 relabelings give diffs -2,-1,0,0,1,2 -> |d|>=2 in 2/6, d>=2 in 1/6
    assert permutation_test([3, 4], [1, 2]) == pytest.approx(1 / 3)
    assert permutation_test([3, 4], [1, 2], alternative="greater") == pytest.approx(1 / 6)
    # fully separated 3 vs 3: C(6,3)=20 relabelings
    assert permutation_test([5, 6, 7], [1, 2, 3], alternative="greater") == pytest.approx(1 / 20)
    assert permutation_test([5, 6, 7], [1, 2, 3]) == pytest.approx(2 / 20)
    # 5 vs 5 separated: 2 / C(10,5)
    assert permutation_test([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(2 / 252)
    assert permutation_test([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError):
        permutation_test([1], [2], alternative="less")  # type: ignore[arg-type]


def test_permutation_monte_carlo_seeded():
    t, c = list(range(10, 22)), list(range(12))  # C(24,12) > 100000 -> Monte Carlo
    assert permutation_test(t, c, n_perm=999, seed=3) == pytest.approx(1 / 1000)  # (0 + 1) / (999 + 1)
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 1, 12), rng.normal(0, 1, 12)
    p1 = permutation_test(a, b, n_perm=4000, seed=7)
    assert p1 == permutation_test(a, b, n_perm=4000, seed=7)
    assert p1 == pytest.approx(st.ttest_ind(a, b).pvalue, abs=0.08)


def test_bootstrap_deterministic_and_covers():
    t, c = [0.3, 0.5, 0.4, 0.6, 0.45], [0.1, 0.2, 0.15, 0.25, 0.2]
    a = bootstrap_diff_ci(t, c, seed=5)
    assert a == bootstrap_diff_ci(t, c, seed=5)
    assert a != bootstrap_diff_ci(t, c, seed=6)
    assert a[0] < np.mean(t) - np.mean(c) < a[1]
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(150):
        lo, hi = bootstrap_diff_ci(rng.normal(1.0, 1, 25), rng.normal(0.0, 1, 25), n_boot=2000, seed=i)
        hits += lo <= 1.0 <= hi
    assert 0.85 <= hits / 150 <= 0.99


def test_hedges_g_hand_computed():
    # diff 1, pooled sd sqrt(2), J = 1 - 3/(4*2-1) = 4/7
    assert hedges_g([2, 4], [1, 3]) == pytest.approx((4 / 7) / math.sqrt(2))
    assert hedges_g([1, 1, 1], [1, 1, 1]) == 0.0
    assert math.isnan(hedges_g([2, 2], [1, 1]))
    assert math.isnan(hedges_g([1], [2]))


def test_seeds_needed_known_and_monotone():
    assert seeds_needed(0.8) == 26
    assert seeds_needed(0.5) == 64
    assert seeds_needed(-0.8) == 26
    ns = [seeds_needed(d) for d in (0.2, 0.5, 0.8, 1.2, 2.0)]
    assert all(a is not None and b is not None and a > b for a, b in itertools.pairwise(ns))
    assert seeds_needed(0.8, power=0.9) > 26
    assert seeds_needed(0.0) is None and seeds_needed(float("nan")) is None


def test_welch_matches_scipy():
    t, c = [0.3, 0.5, 0.4, 0.6], [0.1, 0.2, 0.15, 0.25, 0.2, 0.22]
    w = welch(t, c)
    ref = st.ttest_ind(t, c, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (w["lo"], w["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_compare_separated_vs_identical():
    t = [0.030, 0.034, 0.029, 0.033, 0.031]
    c = [0.012, 0.011, 0.013, 0.010, 0.012]
    r = compare(t, c)
    _strict_json(r)
    assert r["n_treatment"] == r["n_control"] == 5
    assert r["diff"] == pytest.approx(np.mean(t) - np.mean(c))
    assert r["diff_t_ci"][0] > 0 and r["diff_boot_ci"][0] > 0
    assert r["p_welch"] < 1e-4
    assert r["p_perm"] == pytest.approx(2 / 252) and r["p_perm_greater"] == pytest.approx(1 / 252)
    assert r["hedges_g"] > 3 and r["ratio"] == pytest.approx(np.mean(t) / np.mean(c))
    lo, hi = r["geo_ratio_ci"]
    assert 1 < lo < r["geo_ratio"] < hi
    assert r["log_ratio_ci"] == pytest.approx([math.log(lo), math.log(hi)])
    assert isinstance(r["seeds_needed_80pct"], int) and r["seeds_needed_80pct"] <= 5

    same = compare(c, c)
    assert same["diff"] == 0.0 and same["p_perm"] == 1.0 and same["p_welch"] == pytest.approx(1.0)
    assert same["diff_t_ci"][0] < 0 < same["diff_t_ci"][1]
    assert same["seeds_needed_80pct"] is None


@pytest.mark.parametrize(
    "t,c",
    [
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # zero variance, equal
        ([2.0, 2.0], [1.0, 1.0]),  # zero variance, different
        ([0.3], [0.1]),  # n = 1
        ([0.3], [0.1, 0.2, 0.15]),  # n = 1 in one arm
        ([0.3, float("nan"), 0.4], [0.1, float("inf"), 0.2]),  # non-finite dropped
        ([], [0.1, 0.2]),  # empty arm
        ([0.0, 0.1, 0.2], [0.1, 0.0, 0.3]),  # zeros: no log-ratio
    ],
)
def test_compare_edge_cases_json_safe(t, c):
    r = compare(t, c, n_boot=500)
    s = _strict_json(r)
    assert "NaN" not in s and "Infinity" not in s
    assert r["n_treatment"] == sum(math.isfinite(x) for x in t)


def test_compare_edge_semantics():
    r = compare([2.0, 2.0], [1.0, 1.0])
    assert r["diff_t_ci"] == [1.0, 1.0] and r["p_welch"] is None and r["hedges_g"] is None
    one = compare([0.3], [0.1])
    assert one["diff_t_ci"] == [None, None] and one["p_perm"] == 1.0
    z = compare([0.0, 0.1, 0.2], [0.1, 0.0, 0.3])
    assert z["log_ratio_ci"] == [None, None] and z["geo_ratio"] is None
