"""gamma and gamma retained of a defence run on subsets of its teachers (replicate ranges), e.g. the 8-teacher run's
teachers 0-3 (the same seeds as the 4-teacher run, implanted on another CPU) and 4-7 (new draws):

    python docs/results/scripts/gamma_subsets.py docs/results/mitigations-gt-8.json 0-3 4-7 0-7

Each subset is its own confusion fit (teacher-clustered, sublim.specificity.confusion_fit) of the unmitigated
arm and of each defence's arm, and gamma retained is Fieller's interval over that subset's teachers
(sublim.specificity.gamma_ratio). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sublim.analysis import records
from sublim.specificity import confusion_fit, gamma_ratio


def _subset(recs: list[dict], lo: int, hi: int) -> list[dict]:
    return [r for r in recs if lo <= int(r["teacher"].split("#")[1]) <= hi]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, help="a run's results.json (or its copy under docs/results)")
    ap.add_argument("ranges", nargs="+", help="replicate ranges, e.g. 0-3")
    args = ap.parse_args()
    res = json.loads(args.results.read_text())
    evals, targets = res["evaluations"], list(res["spec"]["targets"])
    arms = ["treatment"] + sorted({e["arm"] for e in evals if e["arm"].endswith(":treatment")})
    print("| teachers | " + " | ".join(a.split(":")[0] if a != "treatment" else "(none): gamma [CI]"
                                     for a in arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for rng in args.ranges:
        lo, hi = (int(x) for x in rng.split("-"))
        fits = {a: confusion_fit(_subset(records(evals, a), lo, hi), [], targets, n_perm=1) for a in arms}
        f0 = fits["treatment"]
        cells = [f"{f0['gamma']:+.3f} [{f0['gamma_ci'][0]:+.3f}, {f0['gamma_ci'][1]:+.3f}]"]
        for a in arms[1:]:
            r = gamma_ratio(fits[a], f0)
            cells.append(f"{r['ratio']:.2f} " + (f"[{r['lo']:.2f}, {r['hi']:.2f}]" if r["bounded"] else "[unbounded]"))
        print(f"| {lo}-{hi} ({f0['n_teachers']}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
