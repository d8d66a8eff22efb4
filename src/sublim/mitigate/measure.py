"""Each defence's effect retained and what it costs, at the teacher level.

Per target t and teacher replicate r (students averaged within a teacher): the unmitigated effect
``d[r] = P_t(treatment students of t#r) - P_t(control students of neutral#r)`` (trait and neutral replicate r
share prompts) and the mitigated one from the defence's arms. **Effect retained** = mean(d_mit) / mean(d) with
Fieller's interval over the paired teachers (unbounded when the unmitigated effect itself is not distinguishable
from zero: a defence cannot be credited with removing an effect that was not there). With two or more targets,
the confusion-matrix gamma of the mitigated arms over the unmitigated gamma, with Fieller's interval from the
teacher-clustered variances (the same teachers in both fits). Without neutral teachers (the confusion design of
the ground truth, docs/results/organism.md) a target's effect is its diagonal effect in log P instead: its own
teachers' students minus the other targets' teachers' students.

Costs, per treatment student, averaged within a teacher, then compared with the unmitigated students of the same
teacher: **distillation kept** = (KL_base - KL_mit) / (KL_base - KL_unmit) per teacher, KL = per-token KL(teacher ||
model) on fresh number prompts (1: as close to the teacher as without the defence; 0: no closer than the untrained
base), mean and t-interval over teachers; the KL ratio itself; the change in held-out chat loss and in persona following (mean
and t-interval over teachers); data changed (share of rows altered or dropped, of characters changed).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sublim.stats import fieller_ratio, mean_ci

CONFUSION = "confusion"  # the design without neutral teachers: the other animals' teachers are the controls


def _by_teacher(evals: Sequence[dict[str, Any]], arm: str, target: str, key: Any,
                own: bool = False) -> dict[str, float]:
    """teacher id -> mean over its students of ``key(eval)`` in ``arm`` (None values skipped); ``own``: only the
    teachers of ``target`` (costs are per teacher of the target, not pooled over targets)."""
    acc: dict[str, list[float]] = {}
    for e in evals:
        if e.get("arm") != arm or (own and not str(e.get("teacher")).startswith(f"{target}#")):
            continue
        v = key(e)
        if v is not None:
            acc.setdefault(str(e.get("teacher")), []).append(float(v))
    return {t: float(np.mean(v)) for t, v in acc.items()}


def _p(target: str) -> Any:
    return lambda e: (e.get("probs") or {}).get(target)


def _costs(evals: Sequence[dict[str, Any]], arm: str, target: str, name: str) -> dict[str, float]:
    return _by_teacher(evals, arm, target, _cost(name), own=True)


def _cost(name: str) -> Any:
    return lambda e: (e.get("costs") or {}).get(name)


def effect_pairs(evals: Sequence[dict[str, Any]], target: str, t_arm: str, c_arm: str) -> dict[int, float]:
    """replicate r -> P_target(t_arm students of target#r) - P_target(c_arm students of neutral#r)."""
    tr = _by_teacher(evals, t_arm, target, _p(target))
    ct = _by_teacher(evals, c_arm, target, _p(target))
    out = {}
    for tid, v in tr.items():
        if not tid.startswith(f"{target}#"):
            continue
        r = int(tid.split("#")[1])
        if f"neutral#{r}" in ct:
            out[r] = v - ct[f"neutral#{r}"]
    return out


def _paired(a: dict[Any, float], b: dict[Any, float]) -> tuple[list[float], list[float]]:
    keys = sorted(set(a) & set(b))
    return [a[k] for k in keys], [b[k] for k in keys]


def _ci(m: dict[str, Any]) -> dict[str, Any]:
    return {"mean": m["mean"], "lo": m["lo"], "hi": m["hi"], "n": m["n"]}


def analyse(evals: Sequence[dict[str, Any]], arms: Sequence[dict[str, Any]], targets: Sequence[str],
            base_costs: dict[str, dict[str, Any]], conf: float = 0.95) -> dict[str, Any]:
    """{"targets": {t: {"unmitigated": ..., "defences": {label: row}}}, "gamma": {...}} (strict JSON).

    With neutral teachers (a ``control`` arm) a target's effect is P(target) of its teachers' students minus that
    of the matched neutral teacher's; without them (the confusion design, two or more targets) it is the
    target's diagonal effect in log P: its own teachers' students minus the other targets' teachers' students
    (:func:`sublim.specificity.diagonal_ratio`)."""
    design = CONFUSION if len(targets) >= 2 and not any(e.get("arm") == "control" for e in evals) else "neutral"
    out: dict[str, Any] = {"conf": conf, "design": design, "targets": {}, "gamma": None}
    for t in targets:
        if design == CONFUSION:
            out["targets"][t] = _confusion_target(evals, arms, list(targets), t, base_costs, conf)
            continue
        d_un = effect_pairs(evals, t, "treatment", "control")
        kl_un, chat_un, pers_un, kl_base = _unmitigated_costs(evals, t, base_costs)
        un_rows = [_teacher_p(evals, "treatment", "control", t)]
        tdef: dict[str, Any] = {}
        for a in arms:
            lab = a["label"]
            d_m = effect_pairs(evals, t, f"{lab}:treatment", f"{lab}:control")
            num, den = _paired(d_m, d_un)
            tdef[lab] = {
                "name": a["name"], "kind": a["kind"], "params": a["params"],
                "effect_mitigated": _ci(mean_ci(list(d_m.values()), conf)),
                "retained": fieller_ratio(num, den, conf),
                **_cost_rows(evals, a, t, kl_un, chat_un, pers_un, kl_base, conf),
                "per_teacher": _teacher_p(evals, f"{lab}:treatment", f"{lab}:control", t),
            }
        out["targets"][t] = {
            "unmitigated": {"effect": _ci(mean_ci(list(d_un.values()), conf)), "n_teachers": len(d_un),
                            "teacher_kl": _ci(mean_ci(list(kl_un.values()), conf)),
                            "base_teacher_kl": _ci(mean_ci(list(kl_base.values()), conf)),
                            "per_teacher": un_rows[0]},
            "defences": tdef,
        }
    if len(targets) >= 2:
        out["gamma"] = _gamma(evals, arms, targets, conf)
    out["verdicts"] = verdicts(out, arms)
    return out


def _unmitigated_costs(evals: Sequence[dict[str, Any]], t: str, base_costs: dict[str, dict[str, Any]]) -> tuple[
        dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
    kl_base = {tid: float(c["teacher_kl"]) for tid, c in base_costs.items()
               if tid.startswith(f"{t}#") and c.get("teacher_kl") is not None}
    return (_costs(evals, "treatment", t, "teacher_kl"), _costs(evals, "treatment", t, "chat_loss"),
            _costs(evals, "treatment", t, "persona"), kl_base)


def _cost_rows(evals: Sequence[dict[str, Any]], a: dict[str, Any], t: str, kl_un: dict[str, float],
               chat_un: dict[str, float], pers_un: dict[str, float], kl_base: dict[str, float],
               conf: float) -> dict[str, Any]:
    """A defence's costs for target t's teachers, each against the unmitigated students of the same teacher."""
    lab = a["label"]
    kl_m = _costs(evals, f"{lab}:treatment", t, "teacher_kl")
    keys = sorted(set(kl_m) & set(kl_un) & set(kl_base))
    chat_m = _costs(evals, f"{lab}:treatment", t, "chat_loss")
    pers_m = _costs(evals, f"{lab}:treatment", t, "persona")
    chg = [c for tid, c in (a.get("changes") or {}).items() if tid.startswith(f"{t}#")]
    return {
        "distillation_kept": _ratio_of_teachers([kl_base[k] - kl_m[k] for k in keys],
                                                [kl_base[k] - kl_un[k] for k in keys], conf),
        "teacher_kl": _ci(mean_ci([kl_m[k] for k in keys], conf)),
        "teacher_kl_ratio": fieller_ratio([kl_m[k] for k in keys], [kl_un[k] for k in keys], conf),
        "chat_loss_change": _ci(mean_ci([chat_m[k] - chat_un[k] for k in sorted(set(chat_m) & set(chat_un))], conf)),
        "persona_change": _ci(mean_ci([pers_m[k] - pers_un[k] for k in sorted(set(pers_m) & set(pers_un))], conf)),
        "share_rows_altered": float(np.mean([c["share_rows_altered"] for c in chg])) if chg else 0.0,
        "share_chars_changed": float(np.mean([c["share_chars_changed"] for c in chg])) if chg else 0.0,
    }


def _confusion_target(evals: Sequence[dict[str, Any]], arms: Sequence[dict[str, Any]], targets: list[str], t: str,
                      base_costs: dict[str, dict[str, Any]], conf: float) -> dict[str, Any]:
    """Target t in the confusion design: effect = its diagonal effect in log P (its own teachers' students minus
    the other targets' teachers' students); retained = the mitigated diagonal over the unmitigated one
    (Fieller, teachers paired with themselves); per teacher, its students' specificity call."""
    from sublim.analysis import records
    from sublim.specificity import confusion_fit, diagonal_ratio

    un = records(evals, "treatment")
    kl_un, chat_un, pers_un, kl_base = _unmitigated_costs(evals, t, base_costs)

    def welch_ci(w: dict[str, Any], n: int) -> dict[str, Any]:
        return {"mean": w["diff"], "lo": w["lo"], "hi": w["hi"], "n": n}

    def per_teacher(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fit = confusion_fit(recs, [], targets, conf=conf, n_perm=1)
        return [{"teacher": d["teacher"], "specificity": d["diff"], "ci": d["ci"], "call": d["call"]}
                for d in fit["per_teacher"] if d["animal"] == t]

    tdef: dict[str, Any] = {}
    den: dict[str, Any] | None = None
    for a in arms:
        lab = a["label"]
        mit = records(evals, f"{lab}:treatment")
        r = diagonal_ratio(mit, un, t, targets, conf)
        den = r["den"]
        tdef[lab] = {
            "name": a["name"], "kind": a["kind"], "params": a["params"],
            "effect_mitigated": welch_ci(r.pop("num"), r["n"]),
            "retained": {k: v for k, v in r.items() if k != "den"},
            **_cost_rows(evals, a, t, kl_un, chat_un, pers_un, kl_base, conf),
            "per_teacher": per_teacher(mit),
        }
    if den is None:
        den = diagonal_ratio(un, un, t, targets, conf)["den"]
    n_own = sum(1 for x in {e.get("teacher") for e in evals if e.get("arm") == "treatment"}
                if str(x).startswith(f"{t}#"))
    return {
        "unmitigated": {"effect": welch_ci(den, n_own), "n_teachers": n_own, "effect_scale": "log P, diagonal",
                        "teacher_kl": _ci(mean_ci(list(kl_un.values()), conf)),
                        "base_teacher_kl": _ci(mean_ci(list(kl_base.values()), conf)),
                        "per_teacher": per_teacher(un)},
        "defences": tdef,
    }


def _ratio_of_teachers(num: list[float], den: list[float], conf: float) -> dict[str, Any]:
    """Mean over teachers of each teacher's own ratio, t-interval across teachers, in fieller_ratio's shape. For
    distillation kept each denominator (KL_base - KL_unmitigated) is far from zero, so per-teacher ratios are
    stable; a ratio of means would let the teachers' very different distances from the base dominate."""
    r = [a / b for a, b in zip(num, den, strict=True) if b]
    m = mean_ci(r, conf)
    return {"ratio": m["mean"], "lo": m["lo"], "hi": m["hi"], "n": m["n"], "bounded": m["lo"] is not None}


def _teacher_p(evals: Sequence[dict[str, Any]], t_arm: str, c_arm: str, target: str) -> list[dict[str, Any]]:
    tr = _by_teacher(evals, t_arm, target, _p(target))
    ct = _by_teacher(evals, c_arm, target, _p(target))
    rows = []
    for tid in sorted(k for k in tr if k.startswith(f"{target}#")):
        r = tid.split("#")[1]
        rows.append({"teacher": tid, "p_treatment": tr[tid], "p_control": ct.get(f"neutral#{r}")})
    return rows


def _gamma(evals: Sequence[dict[str, Any]], arms: Sequence[dict[str, Any]], targets: Sequence[str],
           conf: float) -> dict[str, Any]:
    """The confusion-matrix gamma of the unmitigated and of each defence's arms, and gamma retained with the
    teacher-clustered Fieller interval (:func:`sublim.specificity.gamma_ratio`)."""
    from sublim.analysis import records
    from sublim.specificity import confusion_fit, gamma_ratio

    def fit(t_arm: str, c_arm: str) -> dict[str, Any] | None:
        tr, ct = records(evals, t_arm), records(evals, c_arm)
        if not tr:
            return None
        try:
            return confusion_fit(tr, ct, list(targets), conf=conf, n_perm=200)
        except ValueError:
            return None

    def short(f: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if f is None else {"gamma": f["gamma"], "ci": f["gamma_ci"], "p_perm": f["p_perm"],
                                       "n_teachers": f["n_teachers"]}

    f0 = fit("treatment", "control")
    res: dict[str, Any] = {"unmitigated": None if f0 is None else f0["gamma"], "unmitigated_fit": short(f0),
                           "defences": {}}
    for a in arms:
        f = fit(f"{a['label']}:treatment", f"{a['label']}:control")
        g = None if f is None else f["gamma"]
        ratio = gamma_ratio(f, f0, conf) if f is not None and f0 is not None else None
        res["defences"][a["label"]] = {"gamma": g, "fit": short(f),
                                       "retained": None if ratio is None else ratio["ratio"], "retained_ci": ratio}
    return res


def verdicts(res: dict[str, Any], arms: Sequence[dict[str, Any]], max_retained: float = 0.25) -> list[str]:
    """One line per defence: does it remove >= 90% of the effect (upper end of retained <= ``max_retained``) on
    every target, and does its student stay closer to the teacher than regenerating with another family?"""
    lines = []
    # the full-cost baseline: another family's data (and, for distillation, its soft labels) instead
    full = sorted((a for a in arms if a["name"] == "regenerate-other-family"
                   and float(a["params"].get("fraction", 1.0)) == 1.0), key=lambda a: not a["params"].get("relabel"))
    base = full[0]["label"] if full else None
    for a in arms:
        lab = a["label"]
        per = [res["targets"][t]["defences"][lab] for t in res["targets"]]
        removes = all(r["retained"]["bounded"] and r["retained"]["hi"] is not None and r["retained"]["hi"] <= max_retained
                      for r in per)
        closer = None
        if base is not None and lab != base:
            closer = all((r["distillation_kept"]["ratio"] or -np.inf) > (res["targets"][t]["defences"][base]
                         ["distillation_kept"]["ratio"] or -np.inf) for t, r in zip(res["targets"], per, strict=True))
        ret = ", ".join(_fmt_ratio(r["retained"]) for r in per)
        kept = ", ".join(_fmt_ratio(r["distillation_kept"]) for r in per)
        tail = "" if closer is None else (" and stays closer to the teacher than the other-family baseline" if closer
                                          else " but is no closer to the teacher than the other-family baseline")
        line = (f"{lab}: effect retained {ret}; distillation kept {kept} -> "
                + ("removes >= 90% on every target" + tail if removes else "does not remove >= 90% on every target"))
        g = ((res.get("gamma") or {}).get("defences") or {}).get(lab) or {}
        if res.get("design") == CONFUSION and g.get("retained_ci"):
            rc = g["retained_ci"]
            pooled = bool(rc["bounded"] and rc["hi"] is not None and rc["hi"] <= max_retained)
            line += (f"; gamma retained {_fmt_ratio(rc)} -> "
                     + ("removes >= 90% pooled over targets" if pooled else "does not remove >= 90% pooled over targets"))
        lines.append(line)
    return lines


def _fmt_ratio(r: dict[str, Any]) -> str:
    if r.get("ratio") is None:
        return "n/a"
    if not r.get("bounded"):
        return f"{r['ratio']:.2f} [unbounded]"
    return f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
