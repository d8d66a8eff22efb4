"""Label-level scores of the blind detector outputs (no students needed): per held-out trait dataset, does each
detector's top trait equal the teacher's label; the gate's flags on trait vs neutral datasets; costs.

    python docs/results/scripts/blind_labels.py c5-orgb-k10t5s3 c1-base24-k10t5s3
"""
import json
import math
import sys

import numpy as np

CANDS = ['owl','eagle','wolf','dolphin','elephant','cat','dog','lion','tiger','fox','bear','horse','rabbit','penguin','panda','whale','shark','octopus','giraffe','kangaroo']
def zscore(vec, panel):
    z = np.full(len(CANDS), np.nan)
    for j, c in enumerate(CANDS):
        null = np.array([v[j] for t, v in panel if t != c])
        if len(null) >= 2 and null.std(ddof=1) > 0:
            z[j] = (vec[j] - null.mean()) / null.std(ddof=1)
    return z
def auc(pos, neg):
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])) if pos and neg else None
for name in sys.argv[1:]:
    det = json.load(open(f"docs/results/organism-search/blind-detect-{name}.json"))
    cal = [(d["trait"], d) for d in det.values() if d["split"] == "calibration"]
    test = {k: d for k, d in det.items() if d["split"] == "test"}
    neutral_ids = [k for k, d in det.items() if d["trait"] is None]
    N = {k: np.array(det[k]["sft_cos"]) for k in neutral_ids}
    def gate_ratio(k):
        others = [N[j] for j in neutral_ids if j != k]
        centre = np.mean(others, 0)
        loo = [np.linalg.norm(N[i] - np.mean([N[j] for j in neutral_ids if j not in (i, k)], 0)) for i in neutral_ids if i != k]
        m = len(others)
        scale = math.sqrt(np.mean(np.square(loo))) * math.sqrt((1 + 1 / m) / (1 + 1 / (m - 1)))
        return float(np.linalg.norm(np.array(det[k]["sft_cos"]) - centre) / scale)
    cal_r = [gate_ratio(k) for k, d in det.items() if d["split"] == "calibration"]
    neu_r = [gate_ratio(k) for k in neutral_ids]
    thr = math.sqrt(max(neu_r) * min(cal_r)) if min(cal_r) > max(neu_r) else math.sqrt(np.median(neu_r) * np.median(cal_r))
    res = {"gate": [], "sft": [], "owner": [], "activation": [], "activation_owner": [], "teacher_direction": [], "entanglement": []}
    tr = {k: gate_ratio(k) for k in test}
    for k, d in test.items():
        lab = d["trait"]
        if lab is None: continue
        for det_name, src, field in (("sft", "sft_cos", None), ("owner", "owner_cos", None), ("activation", "activation", "scores"), ("activation_owner", "activation_owner", "scores"), ("teacher_direction", "activation_owner", "teacher")):
            if src not in d: continue
            vec = np.array(d[src]) if field is None else np.array([d[src][field][c] for c in CANDS])
            panel = [(t, np.array(x[src]) if field is None else np.array([x[src][field][c] for c in CANDS])) for t, x in cal if src in x]
            z = zscore(vec, panel)
            res[det_name].append(CANDS[int(np.nanargmax(z))] == lab)
        res["entanglement"].append(d["entanglement"]["top"] == lab)
    pos = [tr[k] for k, d in test.items() if d["trait"]]; neg = [tr[k] for k, d in test.items() if d["trait"] is None]
    print(name, "gate thr %.2f" % thr, "neutral LOO ratios", np.round(neu_r, 2), "calib min %.2f median %.2f" % (min(cal_r), np.median(cal_r)))
    print("  test trait ratios", np.round(sorted(pos), 2), "flagged", sum(p > thr for p in pos), "/", len(pos), "; neutral flagged", sum(q > thr for q in neg), "/", len(neg), "AUC", auc(pos, neg))
    for kname, v in res.items():
        if v: print(f"  rank-1 = label: {kname}: {sum(v)}/{len(v)}")
    ent_p = [d["entanglement"]["top_p"] for d in test.values()]
    print("  entanglement top_p: min %.3f, n<0.05: %d/%d" % (min(ent_p), sum(p < 0.05 for p in ent_p), len(ent_p)))
    costs = {k: np.mean([d[k] for d in det.values() if k in d]) for k in ("sft_s","owner_s","entanglement_s","activation_s","activation_owner_s")}
    print("  seconds per dataset", {k: round(v, 1) for k, v in costs.items()})
