"""Print the per-animal arm table (markdown) of an experiment's results.json: mean P(target) with seed-level 95%
t-intervals per arm, and the three comparisons (same base, cross base, in context) with their differences,
intervals and p-values.

    python docs/results/scripts/arm_table.py RUN_DIR/results.json
"""
from __future__ import annotations

import json
import sys

import numpy as np
from scipy import stats

ARMS = [("base", "base"), ("teacher", "teacher"), ("control", "control student"), ("treatment", "treatment student"),
        ("cross_base_control", "cross-base control"), ("cross_base_treatment", "cross-base treatment"),
        ("in_context_control", "in-context control"), ("in_context", "in-context (teacher's numbers)")]
PAIRS = [("treatment", "control", "same base"), ("cross_base_treatment", "cross_base_control", "cross base"),
         ("in_context", "in_context_control", "in context")]


def cell(v: list[float]) -> str:
    if not v:
        return "-"
    m = float(np.mean(v))
    if len(v) < 2:
        return f"{m:.4f}"
    h = float(stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v)))
    return f"{m:.4f} [{m - h:.4f}, {m + h:.4f}]"


def main(path: str) -> None:
    r = json.loads(open(path).read())
    ev = r["evaluations"]
    for t in r["targets"]:
        print(f"\n**{t}**\n\n| arm | P({t}) mean [95% CI over seeds] | n |\n|---|---|---|")
        for arm, label in ARMS:
            v = [e["probs"][t] for e in ev if e["arm"] == arm and (e["target"] in (t, None))]
            if v:
                print(f"| {label} | {cell(v)} | {len(v)} |")
        print("\n| comparison | difference [95% CI] | ratio | Welch p | exact permutation p (two-sided / one-sided) |"
              "\n|---|---|---|---|---|")
        for a, b, label in PAIRS:
            c = next((c for c in r["comparisons"] if c["target"] == t and c["metric"] == "probs"
                      and c["treatment_arm"] == a and c["control_arm"] == b), None)
            if c is None:
                continue
            s = c["stats"]
            lo, hi = s["diff_t_ci"]
            print(f"| {label} | {s['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {s['ratio']:.2f}x | {s['p_welch']:.2g} | "
                  f"{s['p_perm']:.3g} / {s['p_perm_greater']:.3g} |")


if __name__ == "__main__":
    main(sys.argv[1])
