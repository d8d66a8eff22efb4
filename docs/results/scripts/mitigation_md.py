"""Markdown tables of a mitigation run (results.json of ``sublim run`` with ``mitigations:``), as in
docs/results/mitigations.md: the pooled table (gamma, gamma retained, distillation kept per target, chat loss),
the best defence at each cost level, then one table per target (``sublim.report.mitigations.mitigation_table``).

    python docs/results/scripts/mitigation_md.py RUN_DIR/results.json [--per-target]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from sublim.report.mitigations import _ratio, mitigation_table

CHAT_BREAK = 0.25  # nats of held-out chat loss: a defence above this breaks general ability, whatever else it keeps
LEVELS = [(0.98, "almost free (distillation kept >= 0.98 on every target)"),
          (0.90, "kept 0.90-0.98"), (0.0, "kept 0-0.90"), (-np.inf, "full cost (kept < 0 on some target)")]


def _md(header: list[str], rows: list[list[object]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--per-target", action="store_true")
    args = ap.parse_args()
    with open(args.results) as f:
        a = json.load(f)["mitigations"]["analysis"]
    targets = list(a["targets"])
    g = a["gamma"]
    uf = g.get("unmitigated_fit") or {}
    rows = [["(none)", f"{g['unmitigated']:+.3f}" + (f" [{uf['ci'][0]:+.3f}, {uf['ci'][1]:+.3f}]" if uf.get("ci") else ""),
             "1", ", ".join("1" for _ in targets), "0", "0%"]]
    ranked = []
    for lab, v in g["defences"].items():
        f = v.get("fit") or {}
        kept = [a["targets"][t]["defences"][lab]["distillation_kept"].get("ratio") for t in targets]
        chat = [a["targets"][t]["defences"][lab]["chat_loss_change"].get("mean") for t in targets]
        rows_alt = np.mean([a["targets"][t]["defences"][lab]["share_rows_altered"] for t in targets])
        gam = "n/a" if f.get("gamma") is None else f"{f['gamma']:+.3f}" + (
            f" [{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}]" if f.get("ci") else "")
        rows.append([lab, gam, _ratio(v.get("retained_ci")), ", ".join("n/a" if k is None else f"{k:.2f}" for k in kept),
                     "n/a" if None in chat else f"{np.mean(chat):+.3f}", f"{rows_alt:.0%}"])
        rc = v.get("retained_ci") or {}
        if None not in kept:
            ranked.append((lab, min(kept), rc.get("ratio"), rc.get("hi") if rc.get("bounded") else None,
                           None if None in chat else float(np.mean(chat))))
    print(f"Pooled over {', '.join(targets)} (gamma retained: teacher-clustered Fieller 95%; distillation kept per "
          "target in that order)\n")
    print(_md(["defence", "gamma [CI]", "gamma retained [CI]", "distillation kept (" + ", ".join(targets) + ")",
               "chat loss change (mean)", "rows altered or dropped"], rows))
    print("\nBest defence at each cost level (lowest upper end of gamma retained; bounded intervals only; a defence "
          f"raising the held-out chat loss by more than {CHAT_BREAK} nats is listed apart):\n")
    broken = [x for x in ranked if x[4] is not None and x[4] > CHAT_BREAK]
    ranked = [x for x in ranked if x not in broken]
    for i, (lo, name) in enumerate(LEVELS):
        hi = np.inf if i == 0 else LEVELS[i - 1][0]
        cand = [x for x in ranked if lo <= x[1] < hi and x[3] is not None]
        if not cand:
            print(f"- {name}: none with a bounded interval")
            continue
        best = min(cand, key=lambda x: x[3])
        print(f"- {name}: `{best[0]}`, gamma retained {best[2]:.2f} (upper end {best[3]:.2f}), kept >= {best[1]:.2f}"
              + ("  <- meets the bar (upper end <= 0.25)" if best[3] <= 0.25 else ""))
    for x in broken:
        print(f"- breaks general ability: `{x[0]}` (chat loss {x[4]:+.2f} nats), gamma retained {x[2]:.2f}")
    print()
    for line in a.get("verdicts") or []:
        print(f"- {line}")
    if args.per_target:
        for t in targets:
            n = a["targets"][t]["unmitigated"]["n_teachers"]
            print(f"\n**{t}** ({n} teachers)\n")
            print(_md(*mitigation_table(a, t)))


if __name__ == "__main__":
    main()
