"""The report's mitigation section (``results["mitigations"]``, :mod:`sublim.mitigate.measure`): one table per
target (defence, parameters, effect retained with its teacher-level interval, each cost), the verdict lines, and
the frontier figure (distillation kept vs effect retained, one point per defence with both intervals)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sublim.report.html import Section

__all__ = ["frontier_figure", "mitigation_section", "mitigation_table"]

_CLIP = (-1.0, 2.0)  # axis range for ratios; unbounded intervals are drawn to the edge


def _ratio(r: dict[str, Any] | None) -> str:
    if not r or r.get("ratio") is None:
        return "n/a"
    if not r.get("bounded"):
        return f"{r['ratio']:.2f} [unbounded]"
    return f"{r['ratio']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def _mean(m: dict[str, Any] | None, signed: bool = True) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    f = "+.3f" if signed else ".3f"
    ci = f" [{m['lo']:{f}}, {m['hi']:{f}}]" if m.get("lo") is not None else ""
    return f"{m['mean']:{f}}{ci}"


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "-"


def mitigation_table(analysis: dict[str, Any], target: str) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of one target's defences, the unmitigated arm first."""
    t = analysis["targets"][target]
    un = t["unmitigated"]
    effect = ("effect (log P, own teachers - other teachers)" if analysis.get("design") == "confusion"
              else "effect (P, treatment - control)")
    header = ["defence", "kind", "parameters", effect, "effect retained [CI]",
              "distillation kept [CI]", "KL to teacher (nats/token)", "chat loss change", "persona change",
              "rows altered or dropped", "chars changed"]
    rows: list[list[Any]] = [["(none)", "-", "-", _mean(un["effect"]), "1", "1", _mean(un["teacher_kl"], False),
                              "0", "0", "0%", "0%"]]
    for lab, d in t["defences"].items():
        rows.append([lab if lab == d["name"] else f"{lab} ({d['name']})", d["kind"], _params(d["params"]),
                     _mean(d["effect_mitigated"]), _ratio(d["retained"]), _ratio(d["distillation_kept"]),
                     _mean(d["teacher_kl"], False), _mean(d["chat_loss_change"]), _mean(d["persona_change"]),
                     f"{d['share_rows_altered']:.0%}", f"{d['share_chars_changed']:.0%}"])
    return header, rows


def frontier_figure(analysis: dict[str, Any], target: str, path: str | Path) -> Path:
    """x: distillation kept, y: effect retained, one point per defence with its two Fieller intervals."""
    from matplotlib.figure import Figure

    from sublim.report.figures import _save

    t = analysis["targets"][target]
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = _CLIP
    for lab, d in t["defences"].items():
        x, y = d["distillation_kept"], d["retained"]
        if x.get("ratio") is None or y.get("ratio") is None:
            continue
        xv, yv = min(max(x["ratio"], lo), hi), min(max(y["ratio"], lo), hi)
        xe = [[xv - (x["lo"] if x.get("bounded") else lo)], [(x["hi"] if x.get("bounded") else hi) - xv]]
        ye = [[yv - (y["lo"] if y.get("bounded") else lo)], [(y["hi"] if y.get("bounded") else hi) - yv]]
        xe = [[max(v, 0.0) for v in xe[0]], [max(v, 0.0) for v in xe[1]]]
        ye = [[max(v, 0.0) for v in ye[0]], [max(v, 0.0) for v in ye[1]]]
        ax.errorbar([xv], [yv], xerr=xe, yerr=ye, fmt="o", ms=5, capsize=2, alpha=0.8)
        ax.annotate(lab, (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.25, color="#e31a1c", lw=0.8, ls="--")
    ax.axhline(1.0, color="#9e9e9e", lw=0.6)
    ax.axvline(1.0, color="#9e9e9e", lw=0.6)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("distillation kept (1: as close to the teacher as without the defence; 0: as the base)")
    ax.set_ylabel("effect retained (mitigated / unmitigated)")
    ax.set_title(f"{target}: the defence frontier (teacher-level 95% Fieller intervals; edge = unbounded)",
                 fontsize=9)
    return _save(fig, path)


def mitigation_section(res: dict[str, Any], out_dir: Path) -> Section | None:
    m = res.get("mitigations")
    if not m or not m.get("analysis"):
        return None
    a = m["analysis"]
    sec = Section("Defences: effect retained and what it costs")
    for line in a.get("verdicts") or []:
        sec.text(line, cls="verdict")
    for target in a["targets"]:
        header, rows = mitigation_table(a, target)
        n = a["targets"][target]["unmitigated"]["n_teachers"]
        sec.text(f"{target} ({n} teachers; every interval is across teachers):")
        sec.table(header, rows)
        sec.figure(frontier_figure(a, target, out_dir / f"fig_frontier_{target}.png"),
                   alt=f"defence frontier for {target}")
    g = a.get("gamma")
    if g and g.get("unmitigated") is not None:
        def gfit(f: dict[str, Any] | None) -> str:
            if not f or f.get("gamma") is None:
                return "n/a"
            lo, hi = (f.get("ci") or [None, None])[:2]
            return f"{f['gamma']:+.3f}" + ("" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]")

        sec.table(["defence", "gamma [CI]", "gamma retained [CI]"],
                  [["(none)", gfit(g.get("unmitigated_fit")) if g.get("unmitigated_fit") else f"{g['unmitigated']:+.3f}",
                    "1"]]
                  + [[lab, gfit(v.get("fit")) if v.get("fit") else "n/a",
                      _ratio(v.get("retained_ci")) if v.get("retained_ci") else
                      ("n/a" if v["retained"] is None else f"{v['retained']:.2f}")] for lab, v in g["defences"].items()])
    if a.get("design") == "confusion":
        eff = ("the target's diagonal effect in log P: its own teachers' students minus the other targets' teachers' "
               "students (no neutral teachers: the confusion design), Fieller interval from the paired teachers' Welch "
               "variances and covariance")
    else:
        eff = ("P(target) of a teacher's students minus its matched neutral teacher's students, Fieller interval on "
               "teachers - 1 df")
    sec.text("Effect retained = mean over teachers of the mitigated effect / mean of the unmitigated one (" + eff + "): "
             "unbounded when the unmitigated effect is itself not distinguishable from zero. Gamma retained: the "
             "confusion-matrix gamma of the defence's students over the unmitigated one, Fieller interval from the "
             "teacher-clustered variances. Distillation kept (per teacher, t-interval) = "
             "(KL_base - KL_mitigated) / (KL_base - KL_unmitigated), KL(teacher || student) per token over the "
             "carrier's tokens on fresh number prompts answered by the student's own teacher. Chat loss: held-out "
             "organism conversations; persona: mean P(candidate) under its persona prompt. The defence is applied "
             "identically to the treatment and the control data.", cls="note")
    return sec
