"""Gradient-alignment scan: would a training step on this dataset move the student toward a trait?

The theorem made into a tool. For a trait probe ``c`` (questions whose answer is the trait word, e.g.
"favourite animal?" -> "Owl") let ``f_c(theta) = mean_q log p_theta(answer_c | q)``. One SGD step of size
``eta`` on the dataset's SFT loss ``L`` changes it, to first order, by ``eta * <-grad L, grad f_c>``. The scan
estimates that inner product at the student's weights (no training run): the dataset is cut into batches,
each batch gives ``s_bc = <-grad L_b, grad f_c>``, and the mean over batches has a t-interval across
batches. A reference dataset (a neutral teacher's data) gets the same treatment, and the difference
``data - reference`` per trait has a Welch interval.

Calibration. Every fine-tuned teacher shifts its data in a common direction that favours a few
high-sensitivity probes, so the raw inner product ranks the wrong trait first (a pilot on a 0.3M-parameter
organism: right for 1 of 6 trait datasets). Standardising each probe across a *panel* of datasets from
other trait teachers fixes it (6 of 6): the score of probe ``c`` is the cosine ``cos(-grad L, grad f_c)``,
and ``z_c = (cos_c - mean) / sd`` over the panel datasets whose teacher does not have trait ``c`` (and that
are not the audited dataset itself: leave-one-out). Panels are decoy teachers fine-tuned from the
student's base for other traits (:func:`build_decoy_panel`, cached per base) or any directory of
``<trait>.jsonl`` datasets; the report names the panel it used.

Without a panel, traits are ranked by the centred difference to the reference (or the centred raw cosine),
and the report says that this ranking is uncalibrated.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sublim.audit.common import AuditResult, as_rows, fmt3
from sublim.audit.gradients import (
    SCAN_VERSION,
    GradientScanner,
    Probe,
    _data_hash,
    cached_score,
    trait_probes,
)
from sublim.audit.panels import Panel, PanelMember, build_decoy_panel, load_panel, panel_from_datasets
from sublim.report.html import Section

__all__ = ["SCAN_VERSION", "GradientScanner", "Panel", "PanelMember", "Probe", "build_decoy_panel", "cached_score",
           "load_panel", "panel_from_datasets", "scan", "trait_probes"]


# -------------------------------------------------------------------------------------------------- scan


def scan(data: str | Path | Sequence[dict[str, Any]], student: Any, *, reference: Any = None,
         traits: Sequence[str] | str = ("animals",), panel: str | Path | Panel | None = None,
         max_rows: int | None = 512, batch_size: int = 16, n_questions: int = 10, params: str | None = None,
         scanner: GradientScanner | None = None, use_cache: bool = True, objective: str = "sft",
         teacher: Any = None, teacher_system: str | None = None) -> AuditResult:
    """Score every trait probe against ``data`` (and ``reference``), calibrate on ``panel`` if given, rank."""
    from sublim.stats import mean_ci, welch

    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")[:max_rows]
    ref_rows = as_rows(reference, "reference")[:max_rows] if reference is not None else None
    probes = trait_probes(traits, n_questions)
    sc = scanner or GradientScanner(student, probes, params=params, batch_size=batch_size, objective=objective,
                                    teacher=teacher, teacher_system=teacher_system)
    if scanner is not None and [p.name for p in scanner.probes] != [p.name for p in probes]:
        probes = scanner.probes
    res = cached_score(sc, rows, use_cache) if use_cache else {**sc.score(rows), "cached": False}
    ref = (cached_score(sc, ref_rows, use_cache) if use_cache else {**sc.score(ref_rows), "cached": False}) \
        if ref_rows is not None else None
    pan: Panel | None = None
    if isinstance(panel, Panel):
        pan = panel
    elif panel is not None:
        pan = load_panel(sc, panel, max_rows)
    dh = _data_hash(rows)
    table = []
    for i, p in enumerate(probes):
        pb = res["per_batch"][:, i]
        ci = mean_ci(pb)
        row: dict[str, Any] = {"trait": p.name, "target": p.target, "dot": float(res["dot"][i]), "dot_ci": ci,
                               "cos": float(res["cos"][i])}
        if ref is not None:
            row["ref_dot"] = float(ref["dot"][i])
            row["ref_cos"] = float(ref["cos"][i])
            w = welch(pb, ref["per_batch"][:, i])
            row["diff"] = w["diff"]
            row["diff_ci"] = [w["lo"], w["hi"]]
            row["diff_p"] = w["p"]
            row["cos_diff"] = row["cos"] - row["ref_cos"]
        if pan is not None:
            null = pan.null(i, p.target, dh)
            if len(null) >= 2 and float(null.std(ddof=1)) > 0:
                row["z"] = float((row["cos"] - null.mean()) / null.std(ddof=1))
                row["panel_n"] = len(null)
            else:
                row["z"] = None
                row["panel_n"] = len(null)
        table.append(row)
    # centred scores (remove the direction every trait shares)
    base_key = "cos_diff" if ref is not None else "cos"
    vals = np.array([r[base_key] for r in table])
    for r, v in zip(table, vals - vals.mean(), strict=True):
        r["centred"] = float(v)
    if pan is not None and all(r.get("z") is not None for r in table):
        rank_by, calibrated = "z", True
    else:
        rank_by, calibrated = "centred", False
    order = sorted(range(len(table)), key=lambda k: -(table[k][rank_by] if table[k][rank_by] is not None else -1e9))
    for rank, k in enumerate(order, 1):
        table[k]["rank"] = rank
    top = table[order[0]]
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "top_trait": top["target"], "top_score": top[rank_by], "ranked_by": rank_by, "calibrated": int(calibrated),
        "top_z": top.get("z"), "top_diff": top.get("diff"), "top_centred": top["centred"],
        "max_diff_lo": max((r["diff_ci"][0] for r in table if r.get("diff_ci") and r["diff_ci"][0] is not None),
                           default=None),
        "n_rows": len(rows), "n_probes": len(table), "panel_size": len(pan.members) if pan else 0,
        "seconds": seconds,
    }
    for r in table:
        metrics[f"z.{r['target']}"] = r.get("z")
        if ref is not None:
            metrics[f"diff.{r['target']}"] = r.get("diff")
    payload = {
        "student": sc.spec.model_dump(), "n_params": sc.n_params, "params": params,
        "rows": len(rows), "reference_rows": len(ref_rows) if ref_rows is not None else None,
        "batches": int(res["per_batch"].shape[0]), "tokens": res["tokens"],
        "panel": pan.describe() if pan else None,
        "calibration": ("z-score of each probe's cosine over the panel datasets from teachers without that trait "
                        "(leave-one-out)") if calibrated else
                       ("UNCALIBRATED: no panel; ranked by the cosine " + ("difference to the reference, " if ref else "")
                        + "centred across probes. A fine-tuned teacher's common shift can rank the wrong trait first."),
        "objective": sc.objective, "teacher": sc.teacher_spec.model_dump() if sc.teacher_spec else None,
        "interpretation": "dot = first-order change in mean log p(answer) per unit SGD learning rate from one step "
                          + ("on the dataset's SFT loss" if sc.objective == "sft" else
                             f"of {sc.objective} on the teacher's soft labels at the dataset's completion positions"),
        "traits": table, "order": [table[k]["target"] for k in order],
        "cost": {"seconds": seconds, "setup_seconds": sc.setup_seconds, "data_seconds": res["seconds"],
                 "reference_seconds": ref["seconds"] if ref else None, "cached": bool(res.get("cached"))},
    }
    summary = [f"scan: top trait {top['trait']} ({rank_by} {top[rank_by]:.3g}"
               + (f", diff vs reference {top['diff']:.3g} [{fmt3(top['diff_ci'][0])}, {fmt3(top['diff_ci'][1])}]"
                  if top.get("diff") is not None else "") + ")"
               + ("" if calibrated else "; UNCALIBRATED (no panel)"),
               f"panel: {pan.name} ({len(pan.members)} datasets)" if pan else "panel: none"]
    return AuditResult("scan", metrics, payload, [_html(payload, rank_by)], title="sublim audit scan",
                       summary=summary)


def _html(p: dict[str, Any], rank_by: str) -> Section:
    s = Section("Trait alignment")
    s.text(p["calibration"], cls="" if rank_by == "z" else "warn")
    s.text(p["interpretation"] + ".", cls="note")
    if p["panel"]:
        s.text(f"Panel: {p['panel']['name']}: " + ", ".join(f"{m['name']} ({m['trait'] or 'neutral'})"
                                                           for m in p["panel"]["members"]))
    rows = []
    for t in sorted(p["traits"], key=lambda r: r["rank"]):
        ci = t["dot_ci"]
        rows.append([t["rank"], t["trait"], t.get("z"), t["centred"], t["cos"], t["dot"], ci.get("lo"), ci.get("hi"),
                     t.get("ref_dot"), t.get("diff"), (t.get("diff_ci") or [None])[0],
                     (t.get("diff_ci") or [None, None])[1]])
    s.table(["rank", "trait", "z (panel)", "centred", "cos", "dot", "dot lo", "dot hi", "ref dot", "diff", "diff lo",
             "diff hi"], rows)
    c = p["cost"]
    s.text(f"Cost: {c['seconds']:.1f} s in total ({c['setup_seconds']:.1f} s loading and probe gradients, "
           f"{c['data_seconds']:.1f} s on the data{'; cached' if c['cached'] else ''}); {p['rows']} rows, "
           f"{p['batches']} batches, {p['n_params']} parameters.", cls="note")
    return s
