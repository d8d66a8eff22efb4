"""Does the owner's audit (the gradient scan on the teacher's soft labels) predict what students of the search's
teachers actually learned? Ground truth: the students of a search configuration (docs/results/organism-search/).

    OMP_NUM_THREADS=1 python docs/results/scripts/owner_audit.py c1-base24 [--rows 512]

For every trait teacher of the configuration: its kept rows (the first ``--rows`` of what its students trained
on), scanned at the base with probes for the configuration's animals, once with ``objective=distill_carrier`` and
the teacher (what the students did) and once with token SFT (the recipient's scan). Predicted matrix: the probes'
first-order change in log P(answer) per unit learning rate, double-centred over teachers and animals like the
students' mean log lifts. Reported: per-teacher rank-1 agreement (predicted top animal = the teacher's own animal;
students' top lift = own animal), correlation of the double-centred predicted and actual matrices, and the
correlation across teachers of the predicted and actual diagonal effects (does the audit tell which teacher
transmits). Writes docs/results/organism-search/audit-CONFIG.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import search  # noqa: E402  (the search's cached teachers and datasets)

from sublim.audit.scan import GradientScanner, trait_probes  # noqa: E402

OUT = search.OUT


def double_centre(m: np.ndarray) -> np.ndarray:
    return m - m.mean(0, keepdims=True) - m.mean(1, keepdims=True) + m.mean()


def diag_effects(m: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Per teacher i: its own animal's value minus the mean of that animal over the other animals' teachers."""
    return np.array([m[i, lab[i]] - m[lab != lab[i], lab[i]].mean() for i in range(len(lab))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--rows", type=int, default=512)
    args = ap.parse_args()
    res = json.loads((OUT / f"{args.config}.json").read_text())
    cfg, animals, T = search.CONFIGS[args.config], res["animals"], res["T"]
    base = search.base_spec(cfg["base"])
    probes = trait_probes(",".join(f"animals:{a}" for a in animals), 10)
    # ground truth: teacher-level mean log lift per animal (students averaged within a teacher)
    ctl = np.mean([[np.log(r["scores"][a]) for a in animals] for r in res["controls"]], 0)
    teachers = sorted({r["teacher"] for r in res["treated"]})
    actual = np.array([np.mean([[np.log(r["scores"][a]) for a in animals] for r in res["treated"]
                                if r["teacher"] == t], 0) - ctl for t in teachers])
    lab = np.array([animals.index(t.split("#")[0]) for t in teachers])
    timings: dict = {}
    pred: dict[str, list[list[float]]] = {"distill_carrier": [], "sft": []}
    seconds: dict[str, list[float]] = {"distill_carrier": [], "sft": []}
    sft = GradientScanner(base, probes, batch_size=16)
    for t in teachers:
        a, r = t.split("#")
        te, tk, _ = search.get_teacher(cfg["base"], base, cfg["teacher"], a, int(r), timings)
        rows, _ = search.get_dataset(te, tk, cfg["gen"], int(r), timings)
        rows = rows[: min(args.rows, res["rows_per_student"])]
        dist = GradientScanner(base, probes, batch_size=16, objective="distill_carrier", teacher=te.model)
        for name, sc in (("distill_carrier", dist), ("sft", sft)):
            t0 = time.time()
            pred[name].append(sc.score(rows)["dot"].tolist())
            seconds[name].append(time.time() - t0)
        search.log(f"{t}: distill {np.round(pred['distill_carrier'][-1], 3)} sft {np.round(pred['sft'][-1], 3)}")
    A = double_centre(actual)
    out = {"config": args.config, "animals": animals, "teachers": teachers, "rows": args.rows,
           "actual_log_lift": actual.tolist(), "actual_diag": diag_effects(actual, lab).tolist(), "objectives": {}}
    for name, P in pred.items():
        P = np.array(P)
        D = double_centre(P)
        top_pred = D.argmax(1)
        dp, da = diag_effects(P, lab), diag_effects(actual, lab)
        out["objectives"][name] = {
            "dot": P.tolist(), "diag_pred": dp.tolist(),
            "rank1_own": int((top_pred == lab).sum()), "n": len(lab),
            "rank1_matches_students_top": int((top_pred == A.argmax(1)).sum()),
            "corr_matrix": float(np.corrcoef(D.ravel(), A.ravel())[0, 1]),
            "corr_diag": float(np.corrcoef(dp, da)[0, 1]),
            "diag_pred_positive": int((dp > 0).sum()),
            "seconds_mean": float(np.mean(seconds[name])),
        }
        o = out["objectives"][name]
        print(f"{name}: own animal ranked first by the double-centred prediction {o['rank1_own']}/{o['n']}; "
              f"agrees with the students' top {o['rank1_matches_students_top']}/{o['n']}; corr(matrix) "
              f"{o['corr_matrix']:+.2f}; corr(diagonal effects across teachers) {o['corr_diag']:+.2f}; predicted "
              f"diagonal > 0 for {o['diag_pred_positive']}/{o['n']}; {o['seconds_mean']:.1f} s per dataset", flush=True)
    (OUT / f"audit-{args.config}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
