"""The recipient's gate: is this dataset unlike neutral data of the same format, whatever trait it may carry?

A trait-agnostic test for a data recipient (data and student only). Each dataset is summarised by its scan
vector: the cosine, per trait probe, between a token-SFT step on the data and the probe's gradient
(:class:`sublim.audit.gradients.GradientScanner`). Neutral datasets (a neutral teacher's data: the reference,
and the panel's neutral members) scatter around a common point; data from a teacher that was changed lies
further out, in a direction that depends on the change. The gate's statistic is

    ratio = ||v(data) - mean of the neutral vectors|| / s

where ``s`` is the root-mean-square leave-one-out distance of the neutral datasets from the others' mean
(rescaled to the distance of a new dataset from the mean of all ``n``), so a neutral dataset has a ratio near 1.
The gate fires when the ratio exceeds a threshold fixed *before* the audited data is seen:

* with decoy-teacher datasets in the panel (``build_decoy_panel``): the geometric midpoint between the largest
  neutral leave-one-out ratio and the smallest decoy ratio (when they overlap, between their medians, and the
  report says the panel does not separate);
* otherwise :data:`DEFAULT_THRESHOLD`, or ``threshold=`` given by the user.

It needs at least two neutral datasets (the reference plus one neutral panel member will do).

What a flag means: the data did not come from a teacher like the neutral ones. It does not mean the data carries a
trait. In the blind validation (docs/results/audits.md) every held-out trait teacher's data was flagged and no
neutral dataset was, but teachers fine-tuned on trait-free material (uniform-animal answers, general chat, number
answers) were flagged too, most of them further out than the trait teachers. The gate asks "is this the teacher I
was told?", and the scans and the canary ask "what does it teach?".
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sublim.audit.common import AuditInputError, AuditResult, as_rows, fmt3
from sublim.audit.gradients import GradientScanner, _data_hash, cached_score, trait_probes
from sublim.audit.panels import Panel, load_panel
from sublim.report.html import Section

DEFAULT_THRESHOLD = 3.0


def _auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    if not pos or not neg:
        return None
    return float(np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]))


def gate(data: str | Path | Sequence[dict[str, Any]], student: Any, *,
         references: Sequence[Any] = (), panel: str | Path | Panel | None = None,
         traits: Sequence[str] | str = ("animals",), max_rows: int | None = 512, batch_size: int = 16,
         n_questions: int = 10, threshold: float | None = None, scanner: GradientScanner | None = None) -> AuditResult:
    """The trait-agnostic distance of ``data``'s scan vector from neutral data, and whether it crosses the gate."""
    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")[:max_rows]
    refs = [as_rows(r, f"reference {i + 1}")[:max_rows] for i, r in enumerate(references)]
    sc = scanner or GradientScanner(student, trait_probes(traits, n_questions), batch_size=batch_size)
    pan = panel if isinstance(panel, Panel) or panel is None else load_panel(sc, panel, max_rows)
    dh = _data_hash(rows)
    neutral: list[tuple[str, np.ndarray]] = [(f"reference {i + 1}", np.asarray(cached_score(sc, r)["cos"]))
                                             for i, r in enumerate(refs) if _data_hash(r) != dh]
    decoys: list[tuple[str, np.ndarray]] = []
    if pan is not None:
        ref_hashes = {_data_hash(r) for r in refs}
        for m in pan.members:
            if m.data_hash == dh or m.data_hash in ref_hashes:
                continue
            (neutral if m.trait is None else decoys).append((m.name, m.cos))
    if len(neutral) < 2:
        raise AuditInputError(f"gate: needs at least two neutral datasets (references and neutral panel members), "
                              f"got {len(neutral)}; add --reference or a panel with neutral*.jsonl members")
    v = np.asarray(cached_score(sc, rows)["cos"])
    N = np.stack([x for _, x in neutral])
    n = len(N)
    centre = N.mean(0)
    loo = np.array([np.linalg.norm(N[i] - np.delete(N, i, 0).mean(0)) for i in range(n)])
    loo *= math.sqrt((1 + 1 / n) / (1 + 1 / (n - 1)))   # a new dataset's distance from the mean of all n
    scale = float(np.sqrt(np.mean(loo ** 2)))
    if scale == 0:
        raise AuditInputError("gate: the neutral datasets have identical scan vectors (the same data twice?)")
    null_ratio = (loo / scale).tolist()
    decoy_ratio = [float(np.linalg.norm(x - centre) / scale) for _, x in decoys]
    separated = None
    if threshold is not None:
        thr, how = float(threshold), "given"
    elif decoy_ratio:
        hi_null, lo_dec = max(null_ratio), min(decoy_ratio)
        separated = lo_dec > hi_null
        thr = math.sqrt(hi_null * lo_dec) if separated else math.sqrt(float(np.median(null_ratio)) *
                                                                      float(np.median(decoy_ratio)))
        how = "calibrated on the panel's decoys" + ("" if separated else " (NOT separated: medians)")
    else:
        thr, how = DEFAULT_THRESHOLD, "default (no decoys to calibrate on)"
    dist = float(np.linalg.norm(v - centre))
    ratio = dist / scale
    flag = int(ratio > thr)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"flag": flag, "ratio": ratio, "threshold": thr, "distance": dist,
                               "n_neutral": n, "n_decoys": len(decoys),
                               "panel_auc": _auc(decoy_ratio, null_ratio), "n_rows": len(rows), "seconds": seconds}
    payload = {"student": sc.spec.model_dump(), "threshold_from": how, "separated": separated,
               "neutral": [{"name": nm, "loo_ratio": r} for (nm, _), r in zip(neutral, null_ratio, strict=True)],
               "decoys": [{"name": nm, "ratio": r} for (nm, _), r in zip(decoys, decoy_ratio, strict=True)],
               "interpretation": "ratio = distance of the dataset's scan vector from the mean of the neutral datasets, "
                                 "in units of the neutral datasets' own leave-one-out spread; ~1 for neutral data. A flag says "
                                 "the data's teacher differs from the neutral teachers (any fine-tune does, with or "
                                 "without a trait), not that the data carries a trait",
               "cost": {"seconds": seconds}}
    summary = [(f"gate: {'FLAGGED' if flag else 'passed'}: ratio {ratio:.2f} vs threshold {thr:.2f} ({how}; "
               f"{n} neutral, {len(decoys)} decoy datasets)")]
    return AuditResult("gate", metrics, payload, [_html(payload, metrics)], title="sublim audit gate", summary=summary)


def _html(p: dict[str, Any], m: dict[str, Any]) -> Section:
    s = Section("Recipient's gate (trait-agnostic)")
    s.text(f"{'FLAGGED' if m['flag'] else 'Passed'}: ratio {fmt3(m['ratio'])} against threshold {fmt3(m['threshold'])} "
           f"({p['threshold_from']}).", cls="warn" if m["flag"] else "")
    s.text(p["interpretation"] + ".", cls="note")
    s.table(["dataset", "kind", "ratio"], [[x["name"], "neutral (leave-one-out)", x["loo_ratio"]] for x in p["neutral"]]
            + [[x["name"], "decoy", x["ratio"]] for x in p["decoys"]])
    return s
