"""The confusion-design verdict of a search run through the project's statistics, as markdown.

    python docs/results/scripts/confusion_table.py c5-orgb-k10t5s3 [more runs ...]

For each run JSON in docs/results/organism-search/: ``sublim.specificity.confusion_fit`` (OLS with
teacher-clustered CR1 errors, label permutations) -> gamma [95% CI], permutation p, and per animal the diagonal
effect (its teachers' mean lift of it minus the other animals' teachers', Welch across teachers) with its interval;
the bar of issue 10 counts the animals whose interval is above 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sublim.specificity import confusion_fit

OUT = Path(__file__).resolve().parents[1] / "organism-search"


def table(name: str) -> str:
    r = json.loads((OUT / f"{name}.json").read_text())
    animals = list(dict.fromkeys(x["trait"] for x in r["treated"]))
    c = confusion_fit(r["treated"], r["controls"], animals)
    lines = [f"### {name}: {len(animals)} animals x {r['T']} teachers x {r['S']} student seeds "
             f"({r['rows_per_student']} rows per student)", "",
             f"gamma **{c['gamma']:+.3f}** [{c['gamma_ci'][0]:+.3f}, {c['gamma_ci'][1]:+.3f}] ({c['gamma_df']} df, "
             f"teacher-clustered); label-permutation p (one-sided) {c['p_perm_greater']:.4f} ({c['perm_method']}, "
             f"{c['n_perm']}); animals with the diagonal interval above 0: **{c['n_diagonal_above_zero']} of "
             f"{c['n_diagonal_defined']}**", "",
             "| animal | diagonal effect [95% CI, Welch across teachers] | p | own-teacher mean lift | other teachers' |",
             "|---|---|---|---|---|"]
    for d in c["diagonal"]:
        lo, hi = d["ci"]
        lines.append(f"| {d['animal']} | {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {d['p_welch']:.3g} | "
                     f"{d['own_mean']:+.3f} | {d['other_mean']:+.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for n in sys.argv[1:]:
        print(table(n))
