"""Each defence's effect retained and what it costs, at the teacher level.

Per target t and teacher replicate r (students averaged within a teacher): the unmitigated effect
``d[r] = P_t(treatment students of t#r) - P_t(control students of neutral#r)`` (trait and neutral replicate r
share prompts) and the mitigated one from the defence's arms. **Effect retained** = mean(d_mit) / mean(d) with
Fieller's interval over the paired teachers (unbounded when the unmitigated effect itself is not distinguishable
from zero: a defence cannot be credited with removing an effect that was not there). With two or more targets,
the confusion-matrix gamma of the mitigated arms over the unmitigated gamma (point estimate).

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
    """{"targets": {t: {"unmitigated": ..., "defences": {label: row}}}, "gamma": {...}} (strict JSON)."""
    out: dict[str, Any] = {"conf": conf, "targets": {}, "gamma": None}
    for t in targets:
        d_un = effect_pairs(evals, t, "treatment", "control")
        kl_un = _costs(evals, "treatment", t, "teacher_kl")
        chat_un = _costs(evals, "treatment", t, "chat_loss")
        pers_un = _costs(evals, "treatment", t, "persona")
        kl_base: dict[str, float] = {tid: float(c["teacher_kl"]) for tid, c in base_costs.items()
                                     if tid.startswith(f"{t}#") and c.get("teacher_kl") is not None}
        un_rows = [_teacher_p(evals, "treatment", "control", t)]
        tdef: dict[str, Any] = {}
        for a in arms:
            lab = a["label"]
            d_m = effect_pairs(evals, t, f"{lab}:treatment", f"{lab}:control")
            num, den = _paired(d_m, d_un)
            kl_m = _costs(evals, f"{lab}:treatment", t, "teacher_kl")
            keys = sorted(set(kl_m) & set(kl_un) & set(kl_base))
            kept_num = [kl_base[k] - kl_m[k] for k in keys]
            kept_den = [kl_base[k] - kl_un[k] for k in keys]
            chat_m = _costs(evals, f"{lab}:treatment", t, "chat_loss")
            pers_m = _costs(evals, f"{lab}:treatment", t, "persona")
            chg = [c for tid, c in (a.get("changes") or {}).items() if tid.startswith(f"{t}#")]
            tdef[lab] = {
                "name": a["name"], "kind": a["kind"], "params": a["params"],
                "effect_mitigated": _ci(mean_ci(list(d_m.values()), conf)),
                "retained": fieller_ratio(num, den, conf),
                "distillation_kept": _ratio_of_teachers(kept_num, kept_den, conf),
                "teacher_kl": _ci(mean_ci([kl_m[k] for k in keys], conf)),
                "teacher_kl_ratio": fieller_ratio([kl_m[k] for k in keys], [kl_un[k] for k in keys], conf),
                "chat_loss_change": _ci(mean_ci([chat_m[k] - chat_un[k] for k in sorted(set(chat_m) & set(chat_un))],
                                                conf)),
                "persona_change": _ci(mean_ci([pers_m[k] - pers_un[k] for k in sorted(set(pers_m) & set(pers_un))],
                                              conf)),
                "share_rows_altered": float(np.mean([c["share_rows_altered"] for c in chg])) if chg else 0.0,
                "share_chars_changed": float(np.mean([c["share_chars_changed"] for c in chg])) if chg else 0.0,
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
    from sublim.analysis import records
    from sublim.specificity import confusion_fit

    def fit(t_arm: str, c_arm: str) -> float | None:
        tr, ct = records(evals, t_arm), records(evals, c_arm)
        if not tr or not ct:
            return None
        try:
            return float(confusion_fit(tr, ct, list(targets), conf=conf, n_perm=200)["gamma"])
        except ValueError:
            return None

    g0 = fit("treatment", "control")
    res: dict[str, Any] = {"unmitigated": g0, "defences": {}}
    for a in arms:
        g = fit(f"{a['label']}:treatment", f"{a['label']}:control")
        res["defences"][a["label"]] = {"gamma": g, "retained": g / g0 if g is not None and g0 else None}
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
        lines.append(f"{lab}: effect retained {ret}; distillation kept {kept} -> "
                     + ("removes >= 90% on every target" + tail if removes else "does not remove >= 90% on every target"))
    return lines


def _fmt_ratio(r: dict[str, Any]) -> str:
    if r.get("ratio") is None:
        return "n/a"
    if not r.get("bounded"):
        return f"{r['ratio']:.2f} [unbounded]"
    return f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
