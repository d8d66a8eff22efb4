"""The experiment report: ``results.json`` -> figures + one self-contained ``report.html``.

Every interval here is across student fine-tune seeds (the unit of replication); evaluations of the
same arm, target and seed are averaged into one value before any statistic is computed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sublim.report.arms import (
    ARM_ORDER,
    METRIC_LABELS,
    METRICS,
    arm_label,
    arms_in,
    metric_value,
    seed_values,
)
from sublim.report.html import Section, write_html
from sublim.runs import atomic_write_json
from sublim.stats import compare, wilson

__all__ = [
    "ARM_ORDER",
    "DEFAULT_PAIRS",
    "METRICS",
    "METRIC_LABELS",
    "arm_label",
    "arms_in",
    "comparisons_from_evaluations",
    "load_results",
    "metric_value",
    "report",
    "seed_values",
    "verdict",
    "write_experiment_report",
]

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    ("treatment", "control"),
    ("cross_base_treatment", "cross_base_control"),
    ("other_base_treatment", "other_base_control"),
    ("in_context", "in_context_control"),
)


def comparisons_from_evaluations(
    evaluations: Sequence[dict[str, Any]],
    targets: Sequence[str],
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    metric: str = "probs",
    conf: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per target and (treatment_arm, control_arm) pair: per-seed P(target) of the treatment arm
    (evaluations with that arm and target) vs the control arm (that arm with target == target or
    null), via :func:`sublim.stats.compare`. Pairs with no data in either arm are skipped."""
    out: list[dict[str, Any]] = []
    for target in targets:
        for t_arm, c_arm in pairs:
            tv = [v for _, v in seed_values(evaluations, t_arm, target, metric, include_untargeted=False)]
            cv = [v for _, v in seed_values(evaluations, c_arm, target, metric, include_untargeted=True)]
            if not tv or not cv:
                continue
            out.append({
                "target": target, "metric": metric, "treatment_arm": t_arm, "control_arm": c_arm,
                "stats": compare(tv, cv, conf=conf, n_boot=n_boot, seed=seed),
            })
    return out


# ----------------------------------------------------------------------------------------------- text


def _g(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _signed(x: Any) -> str:
    s = _g(x)
    return s if s == "n/a" or s.startswith("-") else "+" + s


def _p(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.2g}"


def _ci(pair: Sequence[Any] | None) -> str:
    if not pair or pair[0] is None or pair[1] is None:
        return "[n/a]"
    return f"[{_g(pair[0])}, {_g(pair[1])}]"


def verdict(comparison: dict[str, Any]) -> str:
    """One honest sentence for a comparison: both arms with seed-level intervals, the difference
    with its Welch CI, the permutation p, and the call (transfer / none detectable / undetermined)."""
    s = comparison["stats"]
    tgt, metric = comparison["target"], comparison.get("metric", "probs")
    t_arm, c_arm = arm_label(comparison["treatment_arm"]), arm_label(comparison["control_arm"])
    tr, co = s["treatment"], s["control"]
    nt, nc = s["n_treatment"], s["n_control"]
    conf_pct = f"{100 * s.get('conf', 0.95):.0f}%"
    seeds = f"across {nt} seeds per arm" if nt == nc else f"across {nt} {t_arm} / {nc} {c_arm} seeds"
    what = f"P({tgt})" + ("" if metric == "probs" else f" [{METRIC_LABELS.get(metric, metric)}]")
    text = (f"{what}: {t_arm} {_g(tr['mean'])} {_ci([tr['lo'], tr['hi']])} vs {c_arm} {_g(co['mean'])} "
            f"{_ci([co['lo'], co['hi']])} {seeds}; difference {_signed(s['diff'])}")
    lo, hi = s["diff_t_ci"]
    if lo is None:
        return text + (f", permutation p={_p(s['p_perm'])}. Undetermined: a seed-level interval needs at "
                       f"least 2 seeds per arm (have {nt} and {nc}).")
    text += (f", {conf_pct} CI {_ci(s['diff_t_ci'])} (Welch p={_p(s['p_welch'])}), "
             f"bootstrap {_ci(s['diff_boot_ci'])}, "
             f"permutation p={_p(s['p_perm'])} (one-sided {_p(s['p_perm_greater'])})")
    if s.get("ratio") is not None:
        text += f"; ratio {_g(s['ratio'])}x"
    alpha = 1 - s.get("conf", 0.95)
    if tr.get("sd") == 0 and co.get("sd") == 0 and s["diff"]:
        p = s["p_perm"]
        sig = p is not None and p <= alpha
        call = (f"both arms have zero spread across seeds, so the t-interval is degenerate; the two-sided "
                f"permutation test {'is' if sig else 'is not'} significant at {alpha:.2g}"
                + ("" if not sig else f" (treatment {'above' if s['diff'] > 0 else 'below'} control)"))
        return text + ". " + call[0].upper() + call[1:] + "."
    if lo > 0:
        call = "transfer detected: treatment above control"
        if s["p_perm"] is not None and s["p_perm"] > alpha:
            call += (f", but the permutation test does not confirm it at p<{alpha:.2g} "
                     f"(too few seeds for an exact test to get there)")
    elif hi < 0:
        call = "treatment below control (a reverse effect, not transfer)"
    else:
        call = f"no detectable transfer (the {conf_pct} CI of the difference includes 0)"
        need = s.get("seeds_needed_80pct")
        if need is not None and need > max(nt, nc):
            call += f"; an effect of the observed size would need about {need} seeds per arm for 80% power"
    return text + ". " + call[0].upper() + call[1:] + "."


# ---------------------------------------------------------------------------------------------- I/O


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, nan/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        obj = obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _results_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "results.json" if p.is_dir() else p


def load_results(path: str | Path) -> dict[str, Any]:
    """Read ``results.json`` (a file, or a run directory containing one)."""
    p = _results_file(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file at {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data


def _dump(obj: Any) -> str:
    try:
        import yaml

        return str(yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True))
    except Exception:  # noqa: BLE001 - fall back to JSON for anything YAML cannot represent
        return json.dumps(obj, indent=2, default=str)


def _with_comparisons(results: dict[str, Any]) -> dict[str, Any]:
    res = _jsonable(results)
    if not res.get("comparisons"):
        evs = res.get("evaluations") or []
        targets = res.get("targets") or []
        comps: list[dict[str, Any]] = []
        for m in METRICS:
            if any(e.get(m) for e in evs):
                comps += comparisons_from_evaluations(evs, targets, metric=m)
        res["comparisons"] = comps
    return res


# ------------------------------------------------------------------------------------------- report


def _headline(res: dict[str, Any], heading: str = "Headline") -> Section:
    sec = Section(heading)
    comps = res.get("comparisons") or []
    for target in res.get("targets") or []:
        mine = [c for c in comps if c.get("target") == target]
        if not mine:
            sec.text(f"P({target}): no treatment/control pair with data; nothing can be concluded.")
        mine.sort(key=lambda c: (METRICS.index(c["metric"]) if c.get("metric") in METRICS else 99,
                                 [p[0] for p in DEFAULT_PAIRS].index(c["treatment_arm"])
                                 if c["treatment_arm"] in [p[0] for p in DEFAULT_PAIRS] else 99))
        for c in mine:
            sec.text(verdict(c))
    sec.text("Intervals are Student-t intervals across student fine-tune seeds (the unit of replication), "
             "not across evaluation samples; the control is a student trained on a neutral teacher's data.",
             cls="note")
    return sec


def _comparison_table(res: dict[str, Any]) -> Section:
    sec = Section("Comparisons")
    header = ["target", "metric", "treatment arm", "control arm", "n t/c", "treatment [CI]", "control [CI]",
              "diff", "Welch CI", "p Welch", "bootstrap CI", "p perm", "p perm (>)", "Hedges g", "ratio",
              "geo. ratio CI", "seeds for 80%"]
    rows = []
    for c in res.get("comparisons") or []:
        s = c["stats"]
        tr, co = s["treatment"], s["control"]
        rows.append([
            c["target"], c.get("metric", "probs"), arm_label(c["treatment_arm"]), arm_label(c["control_arm"]),
            f"{s['n_treatment']}/{s['n_control']}", f"{_g(tr['mean'])} {_ci([tr['lo'], tr['hi']])}",
            f"{_g(co['mean'])} {_ci([co['lo'], co['hi']])}", _signed(s["diff"]), _ci(s["diff_t_ci"]),
            _p(s["p_welch"]), _ci(s["diff_boot_ci"]), _p(s["p_perm"]), _p(s["p_perm_greater"]),
            _g(s["hedges_g"]), _g(s["ratio"]), _ci(s.get("geo_ratio_ci")), s.get("seeds_needed_80pct"),
        ])
    if rows:
        sec.table(header, rows)
        sec.text("Welch CI: t-interval of the difference in means across seeds. Bootstrap: seeded percentile "
                 "bootstrap resampling seeds within each arm (too narrow with few seeds). p perm: exact "
                 "permutation test over seed labels (Monte Carlo when there are too many relabelings). geo. "
                 "ratio CI: Welch interval on log values, back-transformed (ratio of geometric means). "
                 "Seeds for 80%: per-arm seeds a two-sided t-test needs for 80% power at the observed g "
                 "(a rough, noisy planning number).", cls="note")
    else:
        sec.text("No comparisons: no arm pair had data for any target.")
    return sec


def _model_table(res: dict[str, Any]) -> Section:
    sec = Section("Evaluated models")
    evs = res.get("evaluations") or []
    targets = list(res.get("targets") or [])
    candidates = list(res.get("candidates") or [])
    has_np = any(e.get("probs_numprefix") for e in evs)
    has_s = any(e.get("sampled") for e in evs)
    header = ["name", "arm", "target", "seed", "base", "objective"] + [f"P({t})" for t in targets]
    if has_np:
        header += [f"P#({t})" for t in targets]
    if has_s:
        header += [f"sampled {t} k/n [Wilson]" for t in targets]
    header += ["top candidate"]
    rows = []
    for e in evs:
        row: list[Any] = [e.get("name"), arm_label(str(e.get("arm"))), e.get("target"), e.get("seed"),
                          e.get("base"), e.get("objective")]
        row += [_g(metric_value(e, "probs", t)) for t in targets]
        if has_np:
            row += [_g(metric_value(e, "probs_numprefix", t)) for t in targets]
        if has_s:
            smp = e.get("sampled")
            for t in targets:
                if smp and smp.get("n"):
                    k, n = int((smp.get("counts") or {}).get(t, 0)), int(smp["n"])
                    row.append(f"{k}/{n} {_ci(wilson(k, n))}")
                else:
                    row.append("")
        probs = e.get("probs") or {}
        known = [(c, probs[c]) for c in candidates if probs.get(c) is not None]
        row.append(max(known, key=lambda kv: kv[1])[0] if known else "")
        rows.append(row)
    if rows:
        sec.table(header, rows)
        notes = "P(x): exact probability of naming x, averaged over the question battery."
        if has_np:
            notes += " P#(x): the same on the number-prefixed battery."
        if has_s:
            notes += " Sampled: Wilson interval for one model's sampled answers (not a seed-level interval)."
        sec.text(notes, cls="note")
    else:
        sec.text("No evaluations recorded.")
    return sec


def _data_section(res: dict[str, Any]) -> Section:
    sec = Section("Data")
    data = res.get("data") or {}
    if not data:
        return sec.text("No dataset counts recorded.")
    rows, rej_rows = [], []
    for name, d in data.items():
        gen, kept = d.get("generated"), d.get("kept")
        share = f"{100 * kept / gen:.1f}%" if gen and kept is not None else ""
        rej = d.get("reject_counts") or {}
        top = sorted(rej.items(), key=lambda kv: -kv[1])
        rows.append([name, gen, kept, share, sum(rej.values()) if rej else "",
                     ", ".join(f"{k} ({v})" for k, v in top[:3])])
        for reason, n in top:
            rej_rows.append([name, reason, n, f"{100 * n / gen:.1f}%" if gen else ""])
    sec.table(["dataset", "generated", "kept", "kept %", "rejected", "top reject reasons"], rows)
    kept_shares = [d["kept"] / d["generated"] for d in data.values()
                   if d.get("generated") and d.get("kept") is not None]
    if len(kept_shares) > 1 and max(kept_shares) - min(kept_shares) > 0.1:
        sec.text("Kept shares differ by more than 10 points between datasets: the filters act differently "
                 "on the teachers, a possible confound.", cls="warn")
    if rej_rows:
        sec.table(["dataset", "reject reason", "count", "share of generated"], rej_rows)
    return sec


def write_experiment_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (atomic; comparisons computed from the evaluations if missing),
    ``fig_target.png``, ``fig_distribution.png`` and a self-contained ``report.html`` into
    ``out_dir``. Returns ``{"results", "fig_target", "fig_distribution", "report"}`` -> path."""
    from sublim.report.figures import distribution_plot, target_bars  # lazy: matplotlib is slow to import

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = _with_comparisons(results)
    paths = {"results": atomic_write_json(out / "results.json", res)}
    paths["fig_target"] = target_bars(res, out / "fig_target.png")
    paths["fig_distribution"] = distribution_plot(res, out / "fig_distribution.png")

    title = str(res.get("title") or "sublim experiment")
    env = res.get("env") or {}
    sub = [f"category: {res['category']}" if res.get("category") else "",
           f"targets: {', '.join(res.get('targets') or [])}",
           f"candidates: {len(res.get('candidates') or [])}",
           f"git {env['git_revision']}" if isinstance(env, dict) and env.get("git_revision") else ""]
    from sublim.report.teacher_level import heatmap_figures, teacher_tables, theorem_section, verdict_section

    verdict_sec = verdict_section(res)
    sections = [verdict_sec] if verdict_sec else [_headline(res)]
    notes = [str(n) for n in res.get("notes") or []]
    if notes:
        caveats = Section("Caveats")
        for n in notes:
            caveats.text(n, cls="warn")
        sections.append(caveats)
    figs = Section("Figures")
    figs.figure(paths["fig_target"], alt="P(target) per arm, mean across seeds with 95% intervals")
    figs.figure(paths["fig_distribution"], alt="distribution over candidates per arm")
    for png, alt in heatmap_figures(res, out):
        paths[png.stem] = png
        figs.figure(png, alt=alt)
    sections.append(figs)
    if verdict_sec:  # the claim is the verdict; the per-comparison sentences are the student-level detail
        sections += [s for s in (teacher_tables(res), _headline(res, "Comparisons one at a time (student level)"))
                     if s is not None]
    from sublim.report.mitigations import mitigation_section

    sections += [s for s in (mitigation_section(res, out), theorem_section(res, out)) if s is not None]
    sections += [_comparison_table(res), _model_table(res), _data_section(res)]
    sections.append(Section("Resolved spec").pre(_dump(res.get("spec") or {})))
    sections.append(Section("Environment").pre(_dump(env)))
    subtitle = "; ".join(s for s in sub if s)
    paths["report"] = write_html(out / "report.html", title, sections, subtitle=subtitle)
    return paths


def report(run_dir: str | Path) -> Path:
    """Re-render the report of a finished run from its ``results.json`` (a run directory or the file
    itself); outputs go beside the file. Returns the path of ``report.html``."""
    path = _results_file(run_dir)
    return write_experiment_report(load_results(path), path.parent)["report"]
