"""The confusion-design verdict of a search run through the project's statistics, as markdown.

    python docs/results/scripts/confusion_table.py c5-orgb-k10t5s3 [more runs ...] [--arm same|other|ic]

For each run JSON in docs/results/organism-search/: ``sublim.specificity.confusion_fit`` (OLS with
teacher-clustered CR1 errors, label permutations) -> gamma [95% CI], permutation p, and per animal the diagonal
effect (its teachers' mean lift of it minus the other animals' teachers', Welch across teachers) with its interval;
the bar of issue 10 counts the animals whose interval is above 0.

``A+B`` pools two runs of one configuration made with other teacher replicates (``search.py --R0``): same base,
recipe and rows per student, disjoint teachers; their students and neutral controls are analysed as one design.
``--heatmap PATH`` draws the mean-lift matrix. ``--looks N`` corrects for a design that was analysed N times as
it grew (a sequential design, e.g. pooled after a first stage missed the bar): every interval is at level
1 - 0.05/N (Bonferroni over the looks, valid whatever rule decided to continue) and the permutation p is compared
with the bar's 0.001/N. ``--arm other`` reads the other-family students of a run made with ``--other-base``; ``--arm ic`` its
in-context scores (``--in-context``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sublim.specificity import confusion_fit

OUT = Path(__file__).resolve().parents[1] / "organism-search"
ARMS = {"same": ("treated", "controls", "same base"), "other": ("other_treated", "other_controls", "other family"),
        "ic": ("ic_treated", "ic_controls", "in context")}


def load(name: str, arm: str) -> tuple[dict, list[dict], list[dict]]:
    """One run, or several joined by '+' (checked to be one design with disjoint teachers)."""
    tk, ck, _ = ARMS[arm]
    runs = [json.loads((OUT / f"{n}.json").read_text()) for n in name.split("+")]
    first = runs[0]
    treated, controls = [], []
    for n, r in zip(name.split("+"), runs, strict=True):
        for key in ("recipe", "rows_per_student", "animals", "S"):
            if r[key] != first[key]:
                raise SystemExit(f"{n}: {key} differs from {name.split('+')[0]}'s; these runs are not one design")
        if tk not in r:
            raise SystemExit(f"{n}: no {ARMS[arm][2]} records (run search.py with --other-base / --in-context)")
        seen = {x["teacher"] for x in treated + controls}
        dup = sorted({x["teacher"] for x in r[tk] + r[ck]} & seen)
        if dup:
            raise SystemExit(f"{n}: teachers {dup[:4]} are in an earlier run too (use search.py --R0)")
        treated += r[tk]
        controls += r[ck]
    return {**first, "T": sum(r["T"] for r in runs)}, treated, controls


def table(name: str, arm: str = "same", heatmap: str | None = None, looks: int = 1) -> str:
    if looks < 1:
        raise SystemExit(f"--looks must be >= 1, got {looks}")
    r, treated, controls = load(name, arm)
    animals = list(dict.fromkeys(x["trait"] for x in treated))
    conf = 1 - 0.05 / looks
    c = confusion_fit(treated, controls, animals, conf=conf)
    if heatmap:
        from sublim.report.figures import specificity_heatmap

        specificity_heatmap(c["matrix"], c["animals"], c["animals"], heatmap,
                            title=f"{name} ({ARMS[arm][2]}): mean log lift, teacher level")
    pct = f"{100 * conf:.3g}%"
    head = (f"### {name} ({ARMS[arm][2]}): {len(animals)} animals x {r['T']} teachers x {r['S']} student seeds "
            f"({r['rows_per_student']} rows per student)"
            + (f"; {looks} looks: intervals at {pct}, the bar's p < 0.001 becomes p < {0.001 / looks:.4g}"
               if looks > 1 else ""))
    verdict = (f"gamma **{c['gamma']:+.3f}** [{pct} CI {c['gamma_ci'][0]:+.3f}, {c['gamma_ci'][1]:+.3f}] ({c['gamma_df']} df, "
               f"teacher-clustered); label-permutation p (one-sided) {c['p_perm_greater']:.4f} ({c['perm_method']}, "
               f"{c['n_perm']}); animals with the diagonal interval above 0: **{c['n_diagonal_above_zero']} of "
               f"{c['n_diagonal_defined']}**")
    lines = [head, "", verdict, "",
             f"| animal | diagonal effect [{pct} CI, Welch across teachers] | p | own-teacher mean lift | other teachers' |",
             "|---|---|---|---|---|"]
    for d in c["diagonal"]:
        lo, hi = d["ci"]
        lines.append(f"| {d['animal']} | {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {d['p_welch']:.3g} | "
                     f"{d['own_mean']:+.3f} | {d['other_mean']:+.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--arm", choices=sorted(ARMS), default="same")
    ap.add_argument("--heatmap", default=None, help="also draw the K x K mean-lift heatmap here (one run only)")
    ap.add_argument("--looks", type=int, default=1, help="times the growing design was analysed (Bonferroni)")
    args = ap.parse_args()
    if args.heatmap and len(args.runs) != 1:
        raise SystemExit("--heatmap draws one run (or one pooled A+B)")
    for n in args.runs:
        print(table(n, args.arm, args.heatmap, args.looks))
