"""Arm names, metric labels and per-seed value extraction shared by the report text and figures.

Kept apart from :mod:`sublim.report.experiment` (text, I/O) and :mod:`sublim.report.figures`
(matplotlib) so that neither imports the other: both import from here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ARM_ORDER",
    "METRICS",
    "METRIC_LABELS",
    "arm_label",
    "arms_in",
    "metric_value",
    "seed_values",
]

ARM_ORDER: tuple[str, ...] = (
    "base", "teacher", "control", "treatment",
    "cross_base_control", "cross_base_treatment", "other_base_control", "other_base_treatment",
    "in_context_control", "in_context",
)
METRICS: tuple[str, ...] = ("probs", "probs_numprefix", "sampled")
METRIC_LABELS: dict[str, str] = {
    "probs": "exact P, averaged over questions",
    "probs_numprefix": "exact P, number-prefixed questions",
    "sampled": "share of sampled answers",
}
_ARM_LABELS = {
    "cross_base_control": "cross-base control",
    "cross_base_treatment": "cross-base treatment",
    "other_base_control": "other-family control",
    "other_base_treatment": "other-family treatment",
    "in_context_control": "in-context control",
    "in_context": "in-context",
}


def arm_label(arm: str) -> str:
    """Human-readable arm name (``cross_base_control`` -> ``cross-base control``)."""
    return _ARM_LABELS.get(arm, arm)


def arms_in(evaluations: Sequence[dict[str, Any]]) -> list[str]:
    """Arms present, in the canonical order, unknown arms after them in order of appearance."""
    seen = [str(e.get("arm")) for e in evaluations]
    known = [a for a in ARM_ORDER if a in seen]
    extra = list(dict.fromkeys(a for a in seen if a not in ARM_ORDER))
    return known + extra


def metric_value(ev: dict[str, Any], metric: str, candidate: str) -> float | None:
    """One evaluation's value for ``candidate``: P(candidate) from ``ev[metric]``, or for
    ``metric="sampled"`` the share of sampled answers naming it. None when absent."""
    if metric == "sampled":
        s = ev.get("sampled")
        if not s or not s.get("n"):
            return None
        return float((s.get("counts") or {}).get(candidate, 0)) / float(s["n"])
    d = ev.get(metric)
    if not isinstance(d, dict) or d.get(candidate) is None:
        return None
    v = float(d[candidate])
    return v if math.isfinite(v) else None


def seed_values(
    evaluations: Sequence[dict[str, Any]], arm: str, target: str, metric: str = "probs",
    include_untargeted: bool = True,
) -> list[tuple[Any, float]]:
    """``[(seed, value)]`` for P(target) in ``arm``: evaluations with ``target == target`` (and,
    with ``include_untargeted``, those with ``target`` null, e.g. control and base, which apply to
    every target). Several evaluations of the same (teacher replicate, seed) are averaged into one value;
    students of different teacher replicates are separate entries (this is the student level: it ignores
    that students of one teacher share it; :mod:`sublim.analysis` makes the teacher-level claim)."""
    by_seed: dict[Any, list[float]] = {}
    for i, ev in enumerate(evaluations):
        if ev.get("arm") != arm:
            continue
        t = ev.get("target")
        if not (t == target or (include_untargeted and t is None)):
            continue
        v = metric_value(ev, metric, target)
        if v is None:
            continue
        seed = ev.get("seed")
        # a student is (teacher replicate, seed): students of different teachers are different units
        key = ("seed", ev.get("teacher"), seed) if seed is not None else ("model", None, ev.get("name", i))
        by_seed.setdefault(key, []).append(v)
    return [(k[2], sum(vs) / len(vs)) for k, vs in by_seed.items()]
