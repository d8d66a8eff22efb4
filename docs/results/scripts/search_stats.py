"""The teacher-level log-lift statistics that ``search.py`` prints and appends to its results table (the
project's own fit, ``sublim.specificity.confusion_fit``, is what ``confusion_table.py`` reports)."""
from __future__ import annotations

import math

import numpy as np


def analyse(treated: list[dict], controls: list[dict], animals: list[str], n_perm: int = 5000) -> dict:
    """Log-lift confusion statistics at teacher level (student seeds averaged within a teacher)."""
    K = len(animals)
    def teacher_mean_log(recs):
        by: dict[str, list[np.ndarray]] = {}
        trait = {}
        for r in recs:
            by.setdefault(r["teacher"], []).append(np.log([r["scores"][a] for a in animals]))
            trait[r["teacher"]] = r["trait"]
        return {t: np.mean(v, 0) for t, v in by.items()}, trait
    ctl, _ = teacher_mean_log(controls)
    ref = np.mean(list(ctl.values()), 0)  # mean over neutral teachers of mean over seeds of log P
    tm, trait = teacher_mean_log(treated)
    teachers = sorted(tm)
    L = np.array([tm[t] - ref for t in teachers])          # [n_teachers, K] teacher-level log lifts
    lab = np.array([animals.index(trait[t]) for t in teachers])

    def gamma_of(L, lab):
        M = np.array([L[lab == a].mean(0) for a in range(K)])
        D = M - M.mean(1, keepdims=True) - M.mean(0, keepdims=True) + M.mean()
        off = ~np.eye(K, dtype=bool)
        return float(np.diag(D).mean() - D[off].mean()), M
    g, M = gamma_of(L, lab)
    rng = np.random.default_rng(0)
    perm = np.array([gamma_of(L, rng.permutation(lab))[0] for _ in range(n_perm)])
    p_perm = float((1 + (perm >= g).sum()) / (n_perm + 1))
    # teacher-level interval: gamma per replicate index (teachers "a#r" with the same r form one full matrix)
    reps = sorted({t.split("#")[1] for t in teachers})
    g_rep = []
    for r in reps:
        idx = [i for i, t in enumerate(teachers) if t.split("#")[1] == r]
        if len({lab[i] for i in idx}) == K:
            g_rep.append(gamma_of(L[idx], lab[idx])[0])
    from scipy import stats
    if len(g_rep) > 1:
        se = np.std(g_rep, ddof=1) / math.sqrt(len(g_rep))
        tq = stats.t.ppf(0.975, len(g_rep) - 1)
        g_ci = [float(np.mean(g_rep) - tq * se), float(np.mean(g_rep) + tq * se)]
    else:
        g_ci = None
    # per-teacher diagonal effect: own-animal lift minus mean lift of that animal from other animals' teachers
    diag = {}
    for i, t in enumerate(teachers):
        a = lab[i]
        diag[t] = float(L[i, a] - L[lab != a, a].mean())
    all_pos = [animals[a] for a in range(K) if all(diag[t] > 0 for i, t in enumerate(teachers) if lab[i] == a)]
    # own-animal ratio per teacher: mean P(own) over its students / mean P(own) over all neutral students
    ctl_p = {a: np.mean([r["scores"][a] for r in controls]) for a in animals}
    ratio = {}
    for t in teachers:
        ps = [r["scores"][trait[t]] for r in treated if r["teacher"] == t]
        ratio[t] = float(np.mean(ps) / ctl_p[trait[t]])
    # noise floor: spread of the neutral teachers' own lifts (each neutral vs the mean of all neutrals)
    neut_sd = float(np.std([ctl[t] - ref for t in ctl], ddof=1)) if len(ctl) > 1 else None
    # seed-level spread within a teacher
    seed_sd = []
    for t in teachers:
        v = [math.log(r["scores"][trait[t]]) for r in treated if r["teacher"] == t]
        if len(v) > 1:
            seed_sd.append(float(np.std(v, ddof=1)))
    return {"animals": animals, "matrix_mean_log_lift": M.tolist(), "gamma": g, "gamma_perm_p": p_perm,
            "gamma_per_replicate": g_rep, "gamma_ci_replicates": g_ci,
            "diag_effect_per_teacher": diag, "animals_all_teachers_diag_pos": all_pos,
            "own_ratio_per_teacher": ratio, "mean_own_ratio": float(np.mean(list(ratio.values()))),
            "neutral_teacher_log_lift_sd": neut_sd, "own_log_p_seed_sd_mean": float(np.mean(seed_sd)) if seed_sd else None}


def print_analysis(a: dict) -> None:
    an = a["animals"]
    print("mean log lift (rows: teacher's animal, cols: scored animal)")
    print("        " + " ".join(f"{x:>8}" for x in an))
    for x, row in zip(an, a["matrix_mean_log_lift"], strict=True):
        print(f"{x:>8}" + " ".join(f"{v:+8.3f}" for v in row))
    print(f"gamma {a['gamma']:+.4f}  perm p {a['gamma_perm_p']:.4f}  per replicate {np.round(a['gamma_per_replicate'], 4)}"
          f"  ci {a['gamma_ci_replicates']}")
    print("diag effect per teacher:", {k: round(v, 3) for k, v in a["diag_effect_per_teacher"].items()})
    print("animals with all teachers' diag > 0:", a["animals_all_teachers_diag_pos"])
    print("own ratio per teacher:", {k: round(v, 2) for k, v in a["own_ratio_per_teacher"].items()},
          f"mean {a['mean_own_ratio']:.3f}")
    print(f"neutral-teacher log-lift sd {a['neutral_teacher_log_lift_sd']:.4f}; mean within-teacher seed sd of log P(own) "
          f"{a['own_log_p_seed_sd_mean']:.4f}", flush=True)


