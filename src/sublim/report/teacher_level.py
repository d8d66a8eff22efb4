"""Report sections for the teacher-level claims of ``results["teacher_level"]`` (:mod:`sublim.analysis`):
the verdict paragraph, per-target teacher tables (every replicate's own effect) and the specificity
heatmaps, one per arm."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sublim.analysis import verdict_text
from sublim.report.html import Section

__all__ = ["heatmap_figures", "teacher_tables", "theorem_section", "verdict_section"]


def _r(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _rci(pair: Any) -> str:
    if not pair or pair[0] is None or pair[1] is None:
        return "[n/a]"
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def verdict_section(res: dict[str, Any]) -> Section | None:
    """The verdict, stated once per arm at the level the design supports; None for older results."""
    tl = res.get("teacher_level")
    if not tl or not tl.get("arms"):
        return None
    sec = Section("Verdict")
    for line in verdict_text(tl):
        sec.text(line, cls="verdict")
    sec.text("The teacher is the unit: each teacher replicate is an independently implanted teacher, its student "
             "seeds are nested in it, and the intervals above are across teachers (t on teachers - 1 degrees of "
             "freedom; the specificity fit clusters its standard errors by teacher). Effects are on log P(target): "
             "ratios of geometric means against the students of neutral teachers (in a design without neutral "
             "teachers, lifts against the trait teachers' mean, and each teacher's call against the other animals' "
             "teachers' students). The same-base arm is the claim; "
             "cross-base and in-context arms are its controls. The per-comparison sentences in 'Comparisons' "
             "pool every student as independent and are not corrected for the several comparisons made.",
             cls="note")
    return sec


def teacher_tables(res: dict[str, Any]) -> Section | None:
    """Per arm and target: the teacher-level effect and each replicate's own effect (its seeds vs control)."""
    tl = res.get("teacher_level")
    if not tl or not tl.get("arms"):
        return None
    sec = Section("Teacher level")
    rows = []
    for arm in tl["arms"].values():
        for t, e in (arm.get("effects") or {}).items():
            rows.append([arm["label"], t, "all teachers", f"{e['treated']['n_teachers']} / {e['control']['n_teachers']}",
                         _r(e.get("ratio")), _rci(e.get("ratio_ci")), _r(e.get("p_perm_greater")),
                         _r(e["treated"].get("sd_between")), _r(e.get("sd_within"))])
            for x in e.get("per_teacher") or []:
                lo, hi = x["ci"]
                ci = [None if lo is None else math.exp(lo), None if hi is None else math.exp(hi)]
                rows.append([arm["label"], t, x["teacher"], f"{x['n_seeds']} seeds", _r(x["ratio"]), _rci(ci),
                             "", "", x["call"]])
    spec_rows = []
    for arm in tl["arms"].values():
        cf = arm.get("confusion") or {}
        for x in cf.get("per_teacher") or []:
            spec_rows.append([arm["label"], x["teacher"], x["animal"], f"{x['n_seeds']} vs {x['n_other']}",
                              f"{x['diff']:+.3f}" if x.get("diff") is not None else "n/a", _rci(x["ci"]),
                              _r(x.get("p_welch")), x["call"]])
    if spec_rows:
        sec.table(["arm", "teacher", "its animal", "students (own vs other teachers')",
                   "log-lift of its animal, own minus others'", "95% CI", "p (Welch)", "call"], spec_rows)
        sec.text("Each teacher's own specificity: its students' log P of its animal against the same animal in the "
                 "students of the other animals' teachers (Welch across students). A statement about that teacher "
                 "against those teachers; the population claim is gamma in the verdict.", cls="note")
    if rows:
        sec.table(["arm", "target", "teacher", "n (teachers / neutral, or seeds)", "ratio", "95% CI", "p perm (>)",
                   "sd between teachers", "sd within (seeds) / call"], rows)
        sec.text("Ratio: geometric-mean P(target) of the teacher's students over the neutral teachers' students. "
                 "'all teachers': Welch interval across teachers and the exact permutation p over teacher labels "
                 "(with 3 vs 3 teachers its floor is 0.05). A replicate's own row compares its seeds with every "
                 "neutral student: a statement about that teacher, not the population.", cls="note")
    return sec


def heatmap_figures(res: dict[str, Any], out_dir: Path) -> list[tuple[Path, str]]:
    """One specificity heatmap per arm with a confusion fit; returns (path, alt text) pairs."""
    from sublim.report.figures import specificity_heatmap  # lazy: matplotlib

    tl = res.get("teacher_level") or {}
    figs = []
    for key, arm in (tl.get("arms") or {}).items():
        cf = arm.get("confusion")
        if not cf or not cf.get("matrix"):
            continue
        p = specificity_heatmap(cf["matrix"], cf["animals"], cf["animals"], out_dir / f"fig_specificity_{key}.png",
                                title=f"{arm['label']}: mean log lift (gamma {cf['gamma']:+.3f})",
                                zero="neutral teachers" if cf.get("reference_kind", "neutral").startswith("neutral")
                                else "mean of the trait teachers")
        figs.append((p, f"specificity heatmap, {arm['label']}"))
    return figs


def theorem_section(res: dict[str, Any], out_dir: Path) -> Section | None:
    """The theorem curves (``theorem_every``) and a table of each traced student's end point."""
    from sublim.report.figures import theorem_curves  # lazy: matplotlib

    traces = res.get("theorem") or []
    if not traces:
        return None
    sec = Section("The theorem along training")
    sec.figure(theorem_curves(traces, out_dir / "fig_theorem.png"), alt="displacement cosine and implant loss")
    rows = []
    for tr in traces:
        pts = tr.get("points") or []
        if not pts:
            continue
        first, last = pts[0], pts[-1]
        rows.append([tr.get("arm"), tr.get("teacher"), tr.get("against"), last["step"], _r(last.get("cosine")),
                     _r(first.get("implant_loss")), _r(last.get("implant_loss"))])
    sec.table(["student", "its teacher", "measured against", "steps", "final cosine", "implant loss at start",
               "at end"], rows)
    sec.text("Cosine: between the student's displacement from its own initialisation and the traced teacher's "
             "displacement from the base (its trait implant); for another architecture it is undefined. Implant "
             "loss: the traced teacher's own Q&A objective at the student's parameters. The first-order theorem "
             "predicts a positive cosine and a falling loss for same-initialisation students of that teacher, "
             "and nothing in particular for the control student or another initialisation.", cls="note")
    return sec
