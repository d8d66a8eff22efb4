"""Specificity for a teacher-replicated, multi-trait design: the confusion-matrix fit (:func:`confusion_fit`).

"Specific" means a teacher's students gain *its* animal more than the other teachers' students do: the diagonal
lift ``gamma`` of the confusion matrix, not one trait's ratio. The teacher is the unit (every interval is across
teachers, errors are clustered by teacher, the permutation test relabels teachers); records and the teacher-level
effect of one trait are :mod:`sublim.teacher_effects`.

All returned dicts are strict JSON: plain floats / ints / lists / dicts, None where undefined.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

from sublim.stats import welch
from sublim.teacher_effects import Record, _check_disjoint, _f, _reference, _Teacher, _teachers

__all__ = ["confusion_fit", "diagonal_ratio", "gamma_ratio"]


# ------------------------------------------------------------------------------ confusion matrix


def _cell_design(k: int) -> np.ndarray:
    """Design of the K x K cells (row-major, cell = r * K + c) with sum-to-zero effects coding:
    [1, row effects 0..K-2, column effects 0..K-2, diagonal]; the last level is minus the sum. (K^2, 2K)"""
    x = np.zeros((k * k, 2 * k))
    for r in range(k):
        for c in range(k):
            i = r * k + c
            x[i, 0] = 1.0
            if r < k - 1:
                x[i, 1 + r] = 1.0
            else:
                x[i, 1:k] = -1.0
            if c < k - 1:
                x[i, k + c] = 1.0
            else:
                x[i, k:2 * k - 1] = -1.0
            x[i, 2 * k - 1] = float(r == c)
    return x


def _fit_gamma(rows: np.ndarray, n: np.ndarray, y: np.ndarray, xc: np.ndarray, k: int) -> np.ndarray:
    """Student-level OLS coefficients for a batch of row assignments, from teacher means only.

    Every student of teacher g has the same design row in column c, so the student-level normal
    equations reduce exactly to cell sums: X'X = sum_cells W_r x x', X'y = sum_cells S_rc x with
    W_r = seeds of teachers in row r and S_rc = sum over those teachers of n_g * ybar_gc.
    rows (B, G) int, n (G,) seeds, y (G, K) teacher-mean lifts -> (B, 2K) coefficients.
    """
    b, g = rows.shape
    onehot = np.zeros((b, k, g))  # (B, K, G): 1 where teacher g is in row r
    np.put_along_axis(onehot, rows[:, None, :], 1.0, axis=1)
    w_row = onehot @ n  # (B, K)
    s = onehot @ (n[:, None] * y)  # (B, K, K)
    xx = np.einsum("ci,cj->cij", xc, xc).reshape(k * k, -1)  # (K^2, p^2)
    w_cell = np.repeat(w_row, k, axis=1)  # (B, K^2): cell r*K+c has weight W_r
    p = xc.shape[1]
    xtx = (w_cell @ xx).reshape(b, p, p)  # (B, p, p)
    xty = s.reshape(b, k * k) @ xc  # (B, p)
    return np.asarray(np.linalg.solve(xtx, xty[:, :, None])[:, :, 0])


def _assignments(rows: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """Every distinct relabeling of teachers to rows with the observed number of teachers per row."""
    counts = np.bincount(rows, minlength=k)
    g = rows.size

    def rec(free: tuple[int, ...], r: int, cur: np.ndarray) -> Iterator[np.ndarray]:
        if r == k:
            yield cur.copy()
            return
        for combo in itertools.combinations(free, int(counts[r])):
            cur[list(combo)] = r
            rest = tuple(i for i in free if i not in combo)
            yield from rec(rest, r + 1, cur)

    yield from rec(tuple(range(g)), 0, np.zeros(g, dtype=np.int64))


def _per_teacher_diagonal(tt: Sequence[_Teacher], rows: np.ndarray, ref: np.ndarray, animals: Sequence[str],
                          conf: float) -> list[dict[str, Any]]:
    """Each trait teacher's own specificity call: its students' lift of its own animal against the lift of
    that animal in every student of the other animals' teachers (Welch across students; a claim about this
    teacher against these other teachers, not about the population)."""
    out = []
    for g, t in enumerate(tt):
        r = int(rows[g])
        own = t.logp[:, r] - ref[r]
        other = np.concatenate([u.logp[:, r] for h, u in enumerate(tt) if int(rows[h]) != r]) - ref[r]
        w = welch(own, other, conf)
        lo, hi = _f(w["lo"]), _f(w["hi"])
        call = "undetermined" if lo is None or hi is None else "above" if lo > 0 else "below" if hi < 0 else "none"
        out.append({"teacher": t.id, "animal": animals[r], "n_seeds": int(own.size), "n_other": int(other.size),
                    "diff": _f(w["diff"]), "ci": [lo, hi], "p_welch": _f(w["p"]), "call": call})
    return out


def confusion_fit(
    treated: Sequence[Record], controls: Sequence[Record], animals: Sequence[str], conf: float = 0.95,
    n_perm: int = 10_000, seed: int = 0,
) -> dict[str, Any]:
    """The confusion-matrix test of specificity (rain-1's subliminal-learning scaling design).

    Rows: the animals in ``animals`` that have trait teachers (K >= 2, in ``animals`` order); columns:
    the same animals. Every treated student is scored on every column; observation = its lift
    (see :func:`lifts`). OLS ``lift = mu + row_r + col_c + gamma * [r == c]`` (sum-to-zero effects)
    with teacher-clustered CR1 errors, ``V = B^-1 M B^-1 * G/(G-1) * (N-1)/(N-p)``, and a t interval
    for gamma on G-1 df. Permutation test: trait labels shuffled among trait teachers (a teacher's
    students move together, teachers per animal kept), gamma refit; exact enumeration when there are
    at most ``n_perm`` distinct relabelings, else ``(k+1)/(n_perm+1)`` from ``n_perm`` seeded draws.

    Keys: ``animals`` (row = column labels), ``dropped_animals`` (in ``animals``, no trait teacher),
    ``n_teachers``, ``n_teachers_per_animal``, ``n_students``, ``n_obs``, ``n_params``, ``conf``,
    ``reference`` ({animal: mean neutral log P}), ``matrix`` (K x K mean lifts, row = teacher's animal,
    col = scored animal, mean over teachers of teacher means), ``gamma``, ``gamma_se``, ``gamma_ci``,
    ``gamma_df``, ``p_gamma_t`` (two-sided, cluster t), ``gamma_influence`` ({teacher: its term of the
    estimate's error}: ``gamma_se``^2 = ``gamma_cr1_factor`` x their sum of squares; summed products across two
    fits of the same teachers give the fits' covariance, :func:`gamma_ratio`), ``mu``, ``row_effects``, ``col_effects``
    ({animal: float}), ``p_perm_greater``, ``p_perm`` (two-sided, |gamma|), ``perm_method`` ("exact" |
    "monte_carlo"), ``n_perm`` (relabelings used), ``diagonal`` (per animal a: {"animal",
    "own_mean", "other_mean", "diff", "ci", "p_welch", "n_own_teachers", "n_other_teachers"}: the
    teacher-mean lift of a for a's teachers vs the other animals' teachers, Welch across teachers),
    ``n_diagonal_above_zero`` (intervals with lower end > 0), ``n_diagonal_defined``, ``per_teacher`` (each
    trait teacher's own call: {"teacher", "animal", "n_seeds", "n_other", "diff", "ci", "p_welch", "call"},
    its students' lift of its animal vs the other animals' teachers' students, Welch across students),
    ``n_teachers_above``, ``reference_kind``. ``controls`` may be empty (a design without neutral teachers):
    the reference is then the trait teachers' mean, which moves every lift of a column alike and nothing else.
    """
    animals = list(animals)
    if len(set(animals)) != len(animals):
        raise ValueError(f"animals repeated: {animals}")
    traits = {r.get("trait") for r in treated}
    unknown = sorted(str(t) for t in traits if t is not None and t not in animals)
    if unknown:
        raise ValueError(f"treated traits not in animals: {unknown}")
    rows_animals = [a for a in animals if a in traits]
    k = len(rows_animals)
    if k < 2:
        raise ValueError(f"confusion_fit needs trait teachers of >= 2 animals, got {rows_animals}")
    tt = _teachers(treated, rows_animals, "treated")
    ct = _teachers(controls, rows_animals, "control") if controls else []
    _check_disjoint(tt, ct)
    # without neutral teachers the reference is the trait teachers' own mean: gamma, the diagonal effects and
    # the per-teacher calls do not depend on the reference (it shifts whole columns), only the lifts shown do
    ref = _reference(ct) if ct else _reference(tt)  # (K,)
    g = len(tt)
    rows = np.array([rows_animals.index(str(t.trait)) for t in tt], dtype=np.int64)  # (G,)
    n = np.array([t.logp.shape[0] for t in tt], dtype=float)  # (G,) seeds per teacher
    y = np.array([t.mean for t in tt]) - ref  # (G, K) teacher-mean lifts
    xc = _cell_design(k)  # (K^2, p)
    p = xc.shape[1]
    n_obs = int(n.sum()) * k

    beta = _fit_gamma(rows[None, :], n, y, xc, k)[0]  # (p,)
    gamma = float(beta[-1])
    # CR1: teacher g's score X_g'u_g = sum_c x_{r_g c} * n_g * (ybar_gc - fitted_{r_g c})
    fitted = (xc @ beta).reshape(k, k)  # (K, K)
    xg = xc.reshape(k, k, p)[rows]  # (G, K, p): design rows of teacher g's cells
    scores = np.einsum("gcp,gc->gp", xg, n[:, None] * (y - fitted[rows]))  # (G, p)
    bread = np.einsum("gcp,gcq,g->pq", xg, xg, n)  # (p, p) = X'X at student level
    se: float | None = None
    ci: list[float | None] = [None, None]
    p_t: float | None = None
    influence: dict[str, float] | None = None
    factor: float | None = None
    if g >= 2 and n_obs > p:
        binv = np.linalg.inv(bread)
        factor = (g / (g - 1)) * ((n_obs - 1) / (n_obs - p))
        # gamma - E gamma = sum over teachers of (B^-1 X_g'u_g)[-1]: each teacher's share of the estimate's error
        influence = {t.id: float(v) for t, v in zip(tt, (scores @ binv)[:, -1], strict=True)}
        v = binv @ (scores.T @ scores) @ binv * factor
        se = _f(math.sqrt(max(float(v[-1, -1]), 0.0)))
        if se is not None:
            half = float(_st.t.ppf(0.5 + conf / 2, g - 1)) * se
            ci = [_f(gamma - half), _f(gamma + half)]
            p_t = _f(2 * _st.t.sf(abs(gamma) / se, g - 1)) if se > 0 else (1.0 if gamma == 0 else None)

    # permutation test over teacher labels
    counts = np.bincount(rows, minlength=k)
    n_distinct = math.factorial(g) // math.prod(math.factorial(int(c)) for c in counts)
    tol = 1e-9 * max(1.0, abs(gamma))
    ge = two = 0
    if n_distinct <= n_perm:
        method, used = "exact", n_distinct
        perms = np.array(list(_assignments(rows, k)))  # (n_distinct, G)
        chunks: Iterator[np.ndarray] = iter(np.array_split(perms, max(1, math.ceil(len(perms) / 2000))))
    else:
        method, used = "monte_carlo", int(n_perm)
        rng = np.random.default_rng(seed)
        sizes = [min(2000, n_perm - i) for i in range(0, n_perm, 2000)]
        chunks = (rng.permuted(np.broadcast_to(rows, (m, g)), axis=1) for m in sizes)
    for chunk in chunks:
        gp = _fit_gamma(chunk, n, y, xc, k)[:, -1]  # (B,)
        ge += int((gp >= gamma - tol).sum())
        two += int((np.abs(gp) >= abs(gamma) - tol).sum())
    if method == "exact":
        p_greater, p_two = ge / used, two / used
    else:
        p_greater, p_two = (ge + 1) / (used + 1), (two + 1) / (used + 1)

    # K x K matrix of mean lifts and per-animal diagonal effects, teacher as the unit
    matrix = np.array([y[rows == r].mean(axis=0) for r in range(k)])  # (K, K)
    diagonal: list[dict[str, Any]] = []
    for r, a in enumerate(rows_animals):
        own, other = y[rows == r, r], y[rows != r, r]  # teacher-mean lifts of a
        w = welch(own, other, conf)
        diagonal.append({
            "animal": a, "own_mean": float(own.mean()), "other_mean": float(other.mean()),
            "diff": _f(w["diff"]), "ci": [_f(w["lo"]), _f(w["hi"])], "p_welch": _f(w["p"]),
            "n_own_teachers": int(own.size), "n_other_teachers": int(other.size),
        })
    per_teacher = _per_teacher_diagonal(tt, rows, ref, rows_animals, conf)
    row_eff = np.append(beta[1:k], -beta[1:k].sum())  # (K,)
    col_eff = np.append(beta[k:2 * k - 1], -beta[k:2 * k - 1].sum())  # (K,)
    return {
        "animals": rows_animals,
        "dropped_animals": [a for a in animals if a not in rows_animals],
        "n_teachers": g,
        "n_teachers_per_animal": {a: int(c) for a, c in zip(rows_animals, counts, strict=True)},
        "n_students": int(n.sum()),
        "n_obs": n_obs,
        "n_params": p,
        "conf": float(conf),
        "reference": {a: float(v) for a, v in zip(rows_animals, ref, strict=True)},
        "matrix": [[float(v) for v in row] for row in matrix],
        "gamma": gamma,
        "gamma_se": se,
        "gamma_ci": ci,
        "gamma_df": g - 1,
        "p_gamma_t": p_t,
        "gamma_influence": influence,
        "gamma_cr1_factor": factor,
        "mu": float(beta[0]),
        "row_effects": {a: float(v) for a, v in zip(rows_animals, row_eff, strict=True)},
        "col_effects": {a: float(v) for a, v in zip(rows_animals, col_eff, strict=True)},
        "p_perm_greater": float(p_greater),
        "p_perm": float(p_two),
        "perm_method": method,
        "n_perm": used,
        "diagonal": diagonal,
        "per_teacher": per_teacher,
        "n_teachers_above": sum(1 for d in per_teacher if d["call"] == "above"),
        "reference_kind": "neutral teachers" if ct else "trait teachers (no neutral teachers)",
        "n_diagonal_above_zero": sum(1 for d in diagonal if d["ci"][0] is not None and d["ci"][0] > 0),
        "n_diagonal_defined": sum(1 for d in diagonal if d["ci"][0] is not None),
    }


# ------------------------------------------------------------------------------ ratios of two fits


def gamma_ratio(num: dict[str, Any], den: dict[str, Any], conf: float = 0.95) -> dict[str, Any]:
    """gamma of fit ``num`` over gamma of fit ``den`` (two :func:`confusion_fit` results on the *same*
    teachers, e.g. a defence's students and the unmitigated ones) with Fieller's interval from the
    teacher-clustered CR1 variances and covariance: each teacher's influence on each gamma, paired by teacher,
    on G - 1 df. ``{"ratio","lo","hi","n","bounded"}``; unbounded when the denominator's gamma is not
    distinguishable from zero."""
    from sublim.stats import fieller

    a, b = num.get("gamma_influence"), den.get("gamma_influence")
    if num.get("gamma") is None or den.get("gamma") is None:
        return {"ratio": None, "lo": None, "hi": None, "n": 0, "bounded": False}
    if not a or not b or set(a) != set(b):
        if a and b:
            raise ValueError(f"gamma_ratio needs fits of the same teachers: {sorted(set(a) ^ set(b))} in one only")
        return fieller(float(num["gamma"]), float(den["gamma"]), None, None, None, None, conf, n=len(a or b or {}))
    ids = sorted(a)
    ia, ib = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    fa, fb = float(num["gamma_cr1_factor"]), float(den["gamma_cr1_factor"])
    return fieller(float(num["gamma"]), float(den["gamma"]), fa * float(ia @ ia), fb * float(ib @ ib),
                   math.sqrt(fa * fb) * float(ia @ ib), len(ids) - 1, conf, n=len(ids))


def diagonal_ratio(num: Sequence[Record], den: Sequence[Record], animal: str, animals: Sequence[str],
                   conf: float = 0.95) -> dict[str, Any]:
    """One animal's diagonal effect (the teacher-mean log P of ``animal`` for its own teachers' students minus
    that for the other animals' teachers' students, as in :func:`confusion_fit`'s ``diagonal``) in records
    ``num`` over the same in ``den``, the same teachers in both. Fieller's interval from the Welch variances of
    the two differences and their covariance (each teacher paired with itself, own and other teachers apart),
    on the Welch-Satterthwaite df of the denominator. Also returns both differences with Welch intervals:
    ``{"ratio","lo","hi","n","bounded","num","den"}``."""
    from sublim.stats import fieller

    animals = list(animals)
    j = animals.index(animal)

    def cells(recs: Sequence[Record]) -> dict[str, tuple[bool, float]]:
        return {t.id: (t.trait == animal, float(t.mean[j])) for t in _teachers(recs, animals, "treated")}

    cn, cd = cells(num), cells(den)
    if set(cn) != set(cd):
        raise ValueError(f"diagonal_ratio needs the same teachers: {sorted(set(cn) ^ set(cd))} in one only")
    own = [i for i in sorted(cn) if cn[i][0]]
    other = [i for i in sorted(cn) if not cn[i][0]]
    res: dict[str, Any] = {"ratio": None, "lo": None, "hi": None, "n": len(own), "bounded": False}

    def diff(c: dict[str, tuple[bool, float]]) -> dict[str, Any]:
        return welch([c[i][1] for i in own], [c[i][1] for i in other], conf)

    wn, wd = diff(cn), diff(cd)
    res["num"], res["den"] = wn, wd
    if not own or not other or wn["diff"] is None or wd["diff"] is None:
        return res
    if len(own) < 2 or len(other) < 2:
        return {**fieller(wn["diff"], wd["diff"], None, None, None, None, conf, n=len(own)), "num": wn, "den": wd}
    var = {}
    for k, (x, y) in {"nn": (cn, cn), "dd": (cd, cd), "nd": (cn, cd)}.items():
        var[k] = sum(float(np.cov([x[i][1] for i in g], [y[i][1] for i in g], ddof=1)[0, 1]) / len(g)
                     for g in (own, other))
    return {**fieller(wn["diff"], wd["diff"], var["nn"], var["dd"], var["nd"], wd["df"], conf, n=len(own)),
            "num": wn, "den": wd}
