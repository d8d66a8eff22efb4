"""Intervals and the accuracy table shared by the run and its report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sublim.stats import mean_ci
from sublim.toy.mnist.config import ARM_LABELS, ARMS, MnistConfig


# ------------------------------------------------------------------------------------------- the run
def _ci(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    return mean_ci(np.asarray(values, dtype=float))


def _fmt_ci(s: dict[str, Any], pct: bool = False, digits: int = 3) -> str:
    if s.get("mean") is None:
        return "n/a"
    k = 100.0 if pct else 1.0
    if s.get("lo") is None:
        return f"{s['mean'] * k:.{digits}g}"
    if pct:
        return f"{s['mean'] * k:.1f} [{s['lo'] * k:.1f}, {s['hi'] * k:.1f}]"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def accuracy_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: arm, test accuracy % (mean [95% CI] across models), final displacement cosine,
    change of the teacher's loss at the student's parameters vs the student's init, n."""
    header = ["arm", "test acc % [95% CI]", "cos(dS, dT) [95% CI]", "teacher loss change [95% CI]", "models"]
    rows = []
    for arm in ARMS:
        r = results["arms"][arm]
        rows.append(
            [
                r["label"],
                _fmt_ci(r["accuracy"], pct=True),
                _fmt_ci(r["cos"]) if r.get("cos") else "",
                _fmt_ci(r["teacher_loss_change"]) if r.get("teacher_loss_change") else "",
                str(r["accuracy"]["n"]),
            ]
        )
    return header, rows


def _label(arm: str, cfg: MnistConfig) -> str:
    lab = ARM_LABELS[arm]
    if arm.endswith("_same") and cfg.share != "all":
        lab = lab.replace("same init", f"shared {cfg.share} init")
    return lab


def _curve_summary(per_model: list[list[float]], n: int, arm_index: int) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {"mean": [], "lo": [], "hi": []}
    for row in per_model:
        s = _ci(row[arm_index * n : (arm_index + 1) * n])
        for k, values in out.items():
            values.append(s[k])
    return out
