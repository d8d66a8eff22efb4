"""Seed-level statistics for trait-transfer experiments.

The unit of replication is the student fine-tune *seed*: every function here takes one number per
seed (e.g. P(owl) of one student, already averaged over the question battery), never pooled eval
samples, because pooling samples across seeds overstates confidence. The only exception is
:func:`wilson`, which is for a single run's proportion of sampled answers.

Non-finite inputs (NaN, inf) are dropped. Scalar helpers return ``nan`` when a quantity is
undefined; the dict-returning :func:`mean_ci` and :func:`compare` return plain Python floats with
``None`` in place of ``nan`` so their output is strict-JSON serialisable.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats as _st

__all__ = [
    "bootstrap_diff_ci",
    "compare",
    "fieller",
    "fieller_ratio",
    "hedges_g",
    "mean_ci",
    "permutation_test",
    "seeds_needed",
    "welch",
    "wilson",
]

EXACT_PERMUTATION_LIMIT = 100_000

Values = Sequence[float] | np.ndarray  # one finite value per seed; NaN / inf / None are dropped


def _clean(values: Values) -> np.ndarray:
    """1-d float array of the finite values (NaN / inf / None dropped)."""
    arr = np.ravel(np.asarray(values, dtype=float))  # None -> nan
    return arr[np.isfinite(arr)]


def _f(x: Any) -> float | None:
    """A plain float, or None when ``x`` is None or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def mean_ci(values: Values, conf: float = 0.95) -> dict[str, Any]:
    """Mean with a Student-t interval across seeds: ``{"mean","sd","n","lo","hi"}``.

    ``sd`` uses ddof=1. With n=1 the spread is unknown, so ``sd``, ``lo`` and ``hi`` are None;
    with n=0 everything but ``n`` is None. Zero variance gives ``lo == hi == mean``.
    """
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "lo": None, "hi": None}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "sd": None, "n": 1, "lo": None, "hi": None}
    sd = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + conf / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "lo": mean - half, "hi": mean + half}


def fieller_ratio(num: Values, den: Values, conf: float = 0.95) -> dict[str, Any]:
    """Ratio of two means of *paired* values (one pair per unit, e.g. per teacher: the mitigated and the
    unmitigated effect) with Fieller's interval on t(n-1): ``{"ratio","lo","hi","n","bounded"}``.

    The interval is exact under normality and stays honest when the denominator's mean is near zero: when
    the denominator is not significantly non-zero (g >= 1) the interval is unbounded (``lo``/``hi`` None,
    ``bounded`` False) rather than a misleading finite range."""
    a = np.asarray(num, dtype=float)
    b = np.asarray(den, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"fieller_ratio needs paired values, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n == 0:
        return {"ratio": None, "lo": None, "hi": None, "n": 0, "bounded": False}
    if n < 2:
        return fieller(float(a.mean()), float(b.mean()), None, None, None, None, conf, n=n)
    return fieller(float(a.mean()), float(b.mean()), float(a.var(ddof=1)) / n, float(b.var(ddof=1)) / n,
                   float(np.cov(a, b, ddof=1)[0, 1]) / n, n - 1, conf, n=n)


def fieller(ma: float, mb: float, saa: float | None, sbb: float | None, sab: float | None, df: float | None,
            conf: float = 0.95, n: int | None = None) -> dict[str, Any]:
    """Fieller's interval for ``ma / mb`` from the two estimates, their variances ``saa``, ``sbb`` and
    covariance ``sab`` (of the estimates, not of the units), on t(``df``): the set of ratios R with
    ``(ma - R mb)^2 <= t^2 (saa - 2 R sab + R^2 sbb)``. Unbounded (``lo``/``hi`` None, ``bounded`` False)
    when ``mb`` is not significantly non-zero; only the ratio when the variances are unknown (None)."""
    out: dict[str, Any] = {"ratio": None, "lo": None, "hi": None, "n": n, "bounded": False}
    if mb == 0 or not (math.isfinite(ma) and math.isfinite(mb)):
        return out
    out["ratio"] = ma / mb
    if saa is None or sbb is None or sab is None or df is None or not df > 0:
        return out
    t2 = float(_st.t.ppf(0.5 + conf / 2, df)) ** 2
    if t2 * sbb / mb ** 2 >= 1:
        return out
    c = ma * mb - t2 * sab
    disc = c * c - (mb * mb - t2 * sbb) * (ma * ma - t2 * saa)
    den_ = mb * mb - t2 * sbb
    root = math.sqrt(max(disc, 0.0))
    out.update(lo=(c - root) / den_, hi=(c + root) / den_, bounded=True)
    return out


def wilson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (one run's sampled answers).

    Not for pooling samples across seeds. ``n == 0`` returns the uninformative (0.0, 1.0).
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    z = float(_st.norm.ppf(0.5 + conf / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_diff_ci(
    t: Values, c: Values, conf: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of mean(t) - mean(c), resampling seeds within each arm.

    Returns (nan, nan) when an arm is empty. With few seeds (n < ~8 per arm) the percentile
    bootstrap is too narrow; prefer the Welch interval there and read this as a cross-check.
    """
    tx, cx = _clean(t), _clean(c)
    if tx.size == 0 or cx.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    bt = tx[rng.integers(0, tx.size, size=(n_boot, tx.size))].mean(axis=1)  # (n_boot,)
    bc = cx[rng.integers(0, cx.size, size=(n_boot, cx.size))].mean(axis=1)  # (n_boot,)
    diffs = bt - bc
    alpha = 1 - conf
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def permutation_test(
    t: Values,
    c: Values,
    n_perm: int = 20_000,
    seed: int = 0,
    alternative: Literal["two-sided", "greater"] = "two-sided",
) -> float:
    """Permutation p-value for the difference in means, permuting seed labels between arms.

    Exact enumeration of all C(n_t + n_c, n_t) relabelings when that is <= 100,000 (p = share of
    relabelings at least as extreme, the observed one included); otherwise a seeded Monte Carlo
    estimate ``(k + 1) / (n_perm + 1)``. ``"greater"`` tests mean(t) > mean(c). nan if an arm is empty.
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    tx, cx = _clean(t), _clean(c)
    nt, nc = tx.size, cx.size
    if nt == 0 or nc == 0:
        return math.nan
    pooled = np.concatenate([tx, cx])
    total = float(pooled.sum())
    obs = float(tx.mean() - cx.mean())
    tol = 1e-9 * max(1.0, float(np.abs(pooled).max()))

    def extreme(diffs: np.ndarray) -> np.ndarray:
        if alternative == "greater":
            return diffs >= obs - tol
        return np.abs(diffs) >= abs(obs) - tol

    n_comb = math.comb(nt + nc, nt)
    if n_comb <= EXACT_PERMUTATION_LIMIT:
        idx = np.fromiter(
            itertools.chain.from_iterable(itertools.combinations(range(nt + nc), nt)),
            dtype=np.int64, count=n_comb * nt,
        ).reshape(n_comb, nt)  # (n_comb, nt): which pooled values are labelled treatment
        st = pooled[idx].sum(axis=1)
        diffs = st / nt - (total - st) / nc
        return float(extreme(diffs).sum() / n_comb)
    rng = np.random.default_rng(seed)
    k = 0
    chunk = 5_000
    done = 0
    while done < n_perm:
        m = min(chunk, n_perm - done)
        perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)  # (m, nt+nc)
        st = perm[:, :nt].sum(axis=1)
        diffs = st / nt - (total - st) / nc
        k += int(extreme(diffs).sum())
        done += m
    return (k + 1) / (n_perm + 1)


def hedges_g(t: Values, c: Values) -> float:
    """Standardised mean difference with Hedges' small-sample correction J = 1 - 3 / (4 df - 1).

    nan when undefined: fewer than 3 seeds in total, or zero pooled SD with a non-zero difference
    (0.0 when both the SD and the difference are zero).
    """
    tx, cx = _clean(t), _clean(c)
    nt, nc = tx.size, cx.size
    df = nt + nc - 2
    if nt == 0 or nc == 0 or df < 1:
        return math.nan
    ss = (tx.var(ddof=1) * (nt - 1) if nt > 1 else 0.0) + (cx.var(ddof=1) * (nc - 1) if nc > 1 else 0.0)
    sp = math.sqrt(ss / df)
    diff = float(tx.mean() - cx.mean())
    if sp == 0.0:
        return 0.0 if diff == 0.0 else math.nan
    j = 1 - 3 / (4 * df - 1)
    return float(j * diff / sp)


def _power(n1: int, d: float, alpha: float, ratio: float) -> float:
    n2 = max(2, math.ceil(ratio * n1))
    df = n1 + n2 - 2
    ncp = d * math.sqrt(n1 * n2 / (n1 + n2))
    tc = float(_st.t.ppf(1 - alpha / 2, df))
    return float(_st.nct.sf(tc, df, ncp) + _st.nct.cdf(-tc, df, ncp))


def seeds_needed(d: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0) -> int | None:
    """Seeds per arm for a two-sided two-sample t-test to detect standardised effect ``d`` with
    the given power (noncentral t). Returns the treatment-arm n; the control arm needs
    ``ceil(ratio * n)``. None when d is 0 or not finite. d=0.8 -> 26.
    """
    if d is None or not math.isfinite(d) or d == 0:
        return None
    if not (0 < alpha < 1 and 0 < power < 1 and ratio > 0):
        raise ValueError("seeds_needed: need 0 < alpha < 1, 0 < power < 1, ratio > 0")
    d = abs(float(d))
    lo, hi = 2, 2
    while _power(hi, d, alpha, ratio) < power:
        lo, hi = hi, hi * 2
        if hi > 10**9:
            return None
    if _power(lo, d, alpha, ratio) >= power:
        return lo
    while hi - lo > 1:  # invariant: power(lo) < target <= power(hi)
        mid = (lo + hi) // 2
        if _power(mid, d, alpha, ratio) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def welch(t: Values, c: Values, conf: float = 0.95) -> dict[str, Any]:
    """Welch t-interval and two-sided p for mean(t) - mean(c): ``{"diff","lo","hi","p","df"}``.

    Needs >= 2 finite seeds per arm (else lo/hi/p are None). If both arms have zero variance the
    interval collapses to the difference and p is 1.0 when the means are equal, None otherwise.
    """
    tx, cx = _clean(t), _clean(c)
    nt, nc = tx.size, cx.size
    diff = float(tx.mean() - cx.mean()) if nt and nc else None
    out: dict[str, Any] = {"diff": diff, "lo": None, "hi": None, "p": None, "df": None}
    if nt < 2 or nc < 2 or diff is None:
        return out
    vt, vc = tx.var(ddof=1) / nt, cx.var(ddof=1) / nc
    se2 = float(vt + vc)
    if se2 == 0.0:
        out.update(lo=diff, hi=diff, p=1.0 if diff == 0.0 else None)
        return out
    df = se2**2 / (vt**2 / (nt - 1) + vc**2 / (nc - 1))
    se = math.sqrt(se2)
    half = float(_st.t.ppf(0.5 + conf / 2, df)) * se
    p = float(2 * _st.t.sf(abs(diff) / se, df))
    out.update(lo=diff - half, hi=diff + half, p=p, df=float(df))
    return out


def compare(
    t: Values, c: Values, conf: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Everything the report states about treatment seeds ``t`` vs control seeds ``c``.

    Keys: treatment, control (:func:`mean_ci`), diff, diff_t_ci (Welch), p_welch, diff_boot_ci,
    p_perm (two-sided), p_perm_greater, hedges_g, ratio (mean t / mean c), log_ratio_ci (Welch
    interval of mean log t - mean log c, only when all values > 0), geo_ratio and geo_ratio_ci
    (the same on the ratio scale: ratio of geometric means), seeds_needed_80pct (per arm, from the
    observed g: a rough planning number, itself noisy), n_treatment, n_control, conf.
    All values are plain floats/ints/lists or None.
    """
    tx, cx = _clean(t), _clean(c)
    nt, nc = int(tx.size), int(cx.size)
    w = welch(tx, cx, conf)
    both = nt > 0 and nc > 0
    boot = bootstrap_diff_ci(tx, cx, conf, n_boot, seed) if both else (math.nan, math.nan)
    g = hedges_g(tx, cx)
    mt = float(tx.mean()) if nt else math.nan
    mc = float(cx.mean()) if nc else math.nan
    ratio = mt / mc if both and mc != 0 else math.nan
    log_ci: list[float | None] = [None, None]
    geo: float | None = None
    geo_ci: list[float | None] = [None, None]
    if both and (tx > 0).all() and (cx > 0).all():
        lw = welch(np.log(tx), np.log(cx), conf)
        geo = _f(math.exp(lw["diff"]))
        if lw["lo"] is not None:
            log_ci = [_f(lw["lo"]), _f(lw["hi"])]
            geo_ci = [_f(math.exp(lw["lo"])), _f(math.exp(lw["hi"]))]
    return {
        "treatment": mean_ci(tx, conf),
        "control": mean_ci(cx, conf),
        "diff": _f(w["diff"]),
        "diff_t_ci": [_f(w["lo"]), _f(w["hi"])],
        "p_welch": _f(w["p"]),
        "diff_boot_ci": [_f(boot[0]), _f(boot[1])],
        "p_perm": _f(permutation_test(tx, cx, seed=seed)) if both else None,
        "p_perm_greater": _f(permutation_test(tx, cx, seed=seed, alternative="greater")) if both else None,
        "hedges_g": _f(g),
        "ratio": _f(ratio),
        "log_ratio_ci": log_ci,
        "geo_ratio": geo,
        "geo_ratio_ci": geo_ci,
        "seeds_needed_80pct": seeds_needed(g) if math.isfinite(g) else None,
        "n_treatment": nt,
        "n_control": nc,
        "conf": float(conf),
    }
