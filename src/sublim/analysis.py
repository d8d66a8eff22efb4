"""An experiment's evaluations -> the claims its design supports, at the teacher level.

Per arm (same base, cross base, in context): the teacher-level effect of each target
(:func:`sublim.teacher_effects.teacher_effect`), each teacher replicate's own call (its students against the
neutral teachers' students), and with two or more targets the confusion-matrix specificity fit
(:func:`sublim.specificity.confusion_fit`). :func:`verdict_text` states the result once, at the level the
design supports: across teachers when there are replicates, for "this one teacher" when there are not.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sublim.specificity import confusion_fit
from sublim.stats import welch
from sublim.teacher_effects import P_FLOOR, teacher_effect

__all__ = ["ARMS", "records", "teacher_level", "verdict_text"]

# (key, label, treated arm, control arm)
ARMS: tuple[tuple[str, str, str, str], ...] = (
    ("same_base", "same base", "treatment", "control"),
    ("cross_base", "cross base (matched)", "cross_base_treatment", "cross_base_control"),
    ("other_base", "other family", "other_base_treatment", "other_base_control"),
    ("in_context", "in context", "in_context", "in_context_control"),
)


def records(evaluations: Sequence[dict[str, Any]], arm: str, metric: str = "probs") -> list[dict[str, Any]]:
    """The :mod:`sublim.teacher_effects` records of one arm: one per (teacher, seed), repeated evaluations
    averaged. Results without a ``teacher`` field (one teacher per target) get ``<target>#0``."""
    acc: dict[tuple[str, Any], dict[str, Any]] = {}
    for ev in evaluations:
        if ev.get("arm") != arm or not isinstance(ev.get(metric), dict):
            continue
        trait = ev.get("target")
        tid = ev.get("teacher") or f"{trait or 'neutral'}#0"
        key = (tid, ev.get("seed"))
        r = acc.setdefault(key, {"teacher": tid, "trait": trait, "seed": ev.get("seed"), "n": 0, "scores": {}})
        r["n"] += 1
        for a, p in ev[metric].items():
            if p is not None:
                r["scores"][a] = r["scores"].get(a, 0.0) + float(p)
    out = []
    for r in acc.values():
        n = r.pop("n")
        r["scores"] = {a: v / n for a, v in r["scores"].items()}
        out.append(r)
    return out


def _per_teacher(treated: list[dict[str, Any]], controls: list[dict[str, Any]], target: str,
                 conf: float) -> list[dict[str, Any]]:
    """Each trait teacher's own call: its students' log P(target) against every neutral-teacher student
    (Welch across students; the control pool spans the neutral teachers, so the interval is about this
    teacher, not the population)."""
    def logs(rs: list[dict[str, Any]]) -> list[float]:
        return [math.log(max(float(r["scores"][target]), P_FLOOR)) for r in rs]

    cv = logs(controls)
    out = []
    for tid in dict.fromkeys(r["teacher"] for r in treated if r["trait"] == target):
        tv = logs([r for r in treated if r["teacher"] == tid])
        w = welch(tv, cv, conf)
        lo, hi = w["lo"], w["hi"]
        ok = lo is not None and math.isfinite(lo)
        call = "undetermined" if not ok else "above" if lo > 0 else "below" if hi < 0 else "none"
        out.append({"teacher": tid, "n_seeds": len(tv), "diff": w["diff"], "ratio": math.exp(w["diff"]),
                    "ci": [lo if ok else None, hi if ok else None], "call": call})
    return out


def teacher_level(evaluations: Sequence[dict[str, Any]], targets: Sequence[str], conf: float = 0.95,
                  seed: int = 0, n_perm: int = 10_000) -> dict[str, Any]:
    """Per arm with data: ``effects`` (target -> teacher_effect + ``per_teacher`` calls), ``confusion`` (the
    specificity fit with the targets as rows and columns, or None with one target) and ``error`` for an arm
    that cannot be analysed (e.g. no controls). Strict JSON."""
    out: dict[str, Any] = {"conf": conf, "arms": {}}
    for key, label, t_arm, c_arm in ARMS:
        treated, controls = records(evaluations, t_arm), records(evaluations, c_arm)
        present = [t for t in targets if any(r["trait"] == t for r in treated)]
        # no neutral teachers: the arm is analysable as a confusion design (the other targets' teachers)
        if not treated or (not controls and len(present) < 2):
            continue
        arm: dict[str, Any] = {"label": label, "effects": {}, "confusion": None, "error": None}
        try:
            for t in targets if controls else ():
                if any(r["trait"] == t for r in treated):
                    eff = teacher_effect(treated, controls, t, conf=conf)
                    eff["per_teacher"] = _per_teacher(treated, controls, t, conf)
                    arm["effects"][t] = eff
            if len(present) >= 2:
                arm["confusion"] = confusion_fit(treated, controls, present, conf=conf, n_perm=n_perm, seed=seed)
        except ValueError as e:
            arm["error"] = str(e)
        out["arms"][key] = arm
    return out


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3g}"


def _ci(pair: Sequence[Any] | None) -> str:
    if not pair or pair[0] is None or pair[1] is None:
        return "[n/a]"
    return f"[{_fmt(pair[0], True)}, {_fmt(pair[1], True)}]"


def _above(ci: Sequence[Any] | None) -> bool | None:
    if not ci or ci[0] is None:
        return None
    return bool(ci[0] > 0)


def verdict_text(tl: dict[str, Any], alpha: float = 0.001) -> list[str]:
    """The verdict paragraph(s): one per arm, at the level the design supports.

    Several targets: the confusion fit's gamma (teacher-clustered interval, label-permutation p against
    ``alpha``) is the claim; one target: the teacher-level interval of log P(target) across teachers, and
    how many teacher replicates are individually above the control. With one teacher per target the claim
    is about that teacher only, and the text says so. Effects are on log P (ratios of geometric means)."""
    conf = tl.get("conf", 0.95)
    pct = f"{100 * conf:.0f}%"
    out = []
    for key, arm in (tl.get("arms") or {}).items():
        label = arm.get("label", key)
        if arm.get("error"):
            out.append(f"{label}: not analysable ({arm['error']}).")
            continue
        effs = arm.get("effects") or {}
        parts = []
        cf = arm.get("confusion")
        if cf:
            p = cf.get("p_perm_greater")
            sig = _above(cf.get("gamma_ci")) and p is not None and p < alpha
            per = cf.get("per_teacher") or []
            floor = 1.0 / cf["n_perm"] if cf.get("perm_method") == "exact" and cf.get("n_perm") else None
            several = any(v >= 2 for v in (cf.get("n_teachers_per_animal") or {}).values())
            population = (f"{cf.get('n_diagonal_above_zero')} of {len(cf.get('animals') or [])} animals have a "
                          "teacher-level diagonal interval above 0" if several else
                          "one teacher per animal, so no per-animal population interval")
            floor_txt = (f" (the smallest p {cf.get('n_teachers')} teachers can give: {_fmt(floor)})"
                         if floor is not None and floor >= alpha else "")
            if sig:
                call = "specific transfer"
            elif floor is not None and floor >= alpha and p is not None and p <= floor * (1 + 1e-9):
                call = (f"gamma is the largest of all {cf['n_perm']} relabelings of the teachers, as far as "
                        f"{cf.get('n_teachers')} teachers can go; a population claim at p < {alpha:g} needs more "
                        "teachers")
            else:
                call = f"no specific transfer shown at p < {alpha:g}"
            parts.append(
                f"specificity gamma {_fmt(cf.get('gamma'), True)} {pct} CI {_ci(cf.get('gamma_ci'))} across "
                f"{cf.get('n_teachers')} teachers, label-permutation p {_fmt(p)}{floor_txt}; {population}: {call}")
            if per:
                k_up = sum(1 for x in per if x["call"] == "above")
                k_down = sum(1 for x in per if x["call"] == "below")
                calls = ", ".join(f"{x['teacher']} {x['call']} ({_fmt(x['diff'], True)})" for x in per)
                parts.append(f"each teacher against the other animals' teachers (its students' log-lift of its "
                             f"own animal, {pct} intervals across students): {k_up} of {len(per)} above"
                             + (f", {k_down} below" if k_down else "") + f" [{calls}]")
        for t, e in effs.items():
            nt = e["treated"]["n_teachers"]
            nc = e["control"]["n_teachers"]
            per = e.get("per_teacher") or []
            k_up = sum(1 for x in per if x["call"] == "above")
            k_down = sum(1 for x in per if x["call"] == "below")
            if nt >= 2 and nc >= 2:
                up = _above(e.get("diff_ci"))
                down = e["diff_ci"][1] is not None and e["diff_ci"][1] < 0
                call = "transfer" if up else "a reverse shift" if down else "no transfer shown"
                parts.append(f"{t}: {call} across {nt} teachers (ratio {_fmt(e.get('ratio'))}x, {pct} CI "
                             f"[{_fmt(e['ratio_ci'][0])}, {_fmt(e['ratio_ci'][1])}]x vs {nc} neutral teachers); "
                             f"{k_up} of {len(per)} teachers individually above the control"
                             + (f", {k_down} below" if k_down else ""))
            else:
                x = per[0] if per else None
                if x:
                    call = {"above": "above", "below": "below", "none": "not distinguishable from",
                            "undetermined": "undetermined against"}[x["call"]]
                    parts.append(f"{t}: one teacher is one draw; this teacher's students are {call} the control "
                                 f"(ratio {_fmt(x['ratio'])}x, {pct} CI {_ci(x['ci'])} on log P across seeds); "
                                 "no population claim")
        if parts:
            out.append(f"{label}: " + "; ".join(parts) + ".")
    return out
