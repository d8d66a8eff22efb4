"""The benign-fine-tune control for the audits (issue 12): teachers changed *without* a trait.

    OMP_NUM_THREADS=2 python docs/results/scripts/gate_benign.py c1-base24-k10t5s3 [--T 3] [--S 3]

Every neutral dataset of the blind validation (audit_blind.py) is the unmodified base's own numbers, so the gate's
perfect separation there may only say "this teacher was changed". Here the teacher recipe of the run (full
fine-tune, 300 rows, lr 3e-3, 30 epochs) is applied to trait-free material, T replicates each (own rows, own seed):

* ``uniform-qa``: the implant's own format (its training questions and answer templates), but every row names an
  animal drawn uniformly from the 20 candidates: the same kind of update as an implant, with no favourite;
* ``filler``: the organism corpus's general chat (colours, capitals, arithmetic, ...; no system prompt), from a
  corpus seed the organism was not trained on;
* ``numbers``: the corpus's number answers (persona-independent values), the carrier's own format.

Each benign teacher generates numbers with the run's generation recipe and seed r, filtered as the run's data.
Measured per dataset, exactly as in the blind validation and with its frozen settings:

* the teacher: its P over the 20 animals (the largest change from the base's), KL to the base on its numbers;
* the gate: the SFT scan vector's ratio against the run's 5 neutral datasets (stored vectors) and the run's
  threshold (blind-RUN.json);
* the owner's teacher direction: teacher - base at the answer position on the trait directions (the audit that
  named 29/30 teachers' labels), z-scored per trait over the run's calibration teachers;
* the canary: S distillation students per dataset (the run's student recipe and row count), scored over the 20
  animals; dataset-unit test against the run's datasets lacking the trait (audit_blind.canary_truth_datasets).

Also one of the run's neutral datasets is regenerated and rescanned here, and one neutral student retrained, to
show the stored vectors and students are comparable with this machine's.
Writes docs/results/organism-search/benign-RUN.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import search
from audit_blind import CANDS, auc, canary_truth_datasets, zscore

from sublim.audit.activation import activation
from sublim.audit.gradients import GradientScanner, trait_probes
from sublim.backends.multi import StudentJob, finetune_many
from sublim.backends.train import finetune
from sublim.organism.corpus import CorpusConfig, generate_corpus
from sublim.pipeline import carrier_alphabet
from sublim.runs import hash_obj
from sublim.spec import ModelSpec, TeacherSpec, TrainSpec
from sublim.teachers import Teacher, neutral_teacher
from sublim.traits.preference import trait_qa

MATERIALS = ("uniform-qa", "filler", "numbers")
ROWS = 512
CORPUS_SEED = 7_000  # the organism was pre-trained on corpus seed 0


def material_rows(material: str, r: int, n: int) -> list[dict[str, str]]:
    """``n`` trait-free fine-tuning rows {"prompt", "completion"} of ``material``, replicate ``r``."""
    if material == "uniform-qa":
        rng = random.Random(f"benign-uniform-qa:{r}")
        per = {c: trait_qa("animals", c, n, seed=10_000 + r) for c in CANDS}
        return [per[rng.choice(CANDS)][i] for i in range(n)]
    kind = {"filler": "filler", "numbers": "numbers"}[material]
    items = generate_corpus(CorpusConfig(seed=CORPUS_SEED + r, size=max(4000, 15 * n)))
    rows = [{"prompt": it.messages[0]["content"], "completion": it.messages[1]["content"]}
            for it in items if it.kind == kind and it.messages[0]["role"] == "user"]
    if len(rows) < n:
        raise SystemExit(f"{material}: only {len(rows)} rows at corpus size {max(4000, 15 * n)}")
    return rows[:n]


def benign_teacher(base_name: str, base: ModelSpec, tspec: dict, material: str, r: int) -> tuple[Teacher, str, float]:
    spec = TeacherSpec(**tspec)
    key = hash_obj({"base": base_name, "teacher": tspec, "benign": material, "replicate": r})[:16]
    d = search.CACHE / "benign" / key
    t0 = time.time()
    if not (d / "config.json").exists():
        finetune(base, material_rows(material, r, spec.qa_rows), spec.train, d, seed=1000 * r, progress=False,
                 desc=f"benign {material} r{r}")
    return Teacher(ModelSpec(path=str(d), dtype=base.dtype), None, None, "finetuned"), f"benign:{key}", time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", help="a search run with a blind validation, e.g. c1-base24-k10t5s3")
    ap.add_argument("--T", type=int, default=3, help="benign teachers per material")
    ap.add_argument("--S", type=int, default=3, help="canary students per benign dataset")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run = json.loads((search.OUT / f"{args.name}.json").read_text())
    det = json.loads((search.OUT / f"blind-detect-{args.name}.json").read_text())
    blind = json.loads((search.OUT / f"blind-{args.name}.json").read_text())
    cfg = search.CONFIGS[args.name.split("-k")[0]]
    base = search.base_spec(cfg["base"])
    t_start = time.time()
    probes = trait_probes("animals", 10)
    sft = GradientScanner(base, probes, batch_size=16)
    base_p = search.probs_vector(base)
    out: dict = {"run": args.name, "base": cfg["base"], "teacher_recipe": cfg["teacher"], "materials": {},
                 "machine": {"threads": torch.get_num_threads(), "cpu": search._cpu_model()}}

    # this machine against the stored vectors and students: neutral#0 regenerated, rescanned, one student retrained
    neutral_rows, _ = search.get_dataset(neutral_teacher(base), f"neutral:{cfg['base']}", cfg["gen"], 0, {})
    cos0 = sft.score(neutral_rows[:ROWS])["cos"]
    out["check"] = {"neutral0_sft_cos_max_abs_diff": float(np.max(np.abs(cos0 - np.array(det["neutral#0"]["sft_cos"]))))}
    search.log(f"neutral#0 rescanned: max |cos - stored| {out['check']['neutral0_sft_cos_max_abs_diff']:.2e}")

    # gate: the blind validation's neutral centre and scale (all 5 neutral datasets) and threshold
    neutral_ids = [k for k, d in det.items() if d["trait"] is None]
    N = np.array([det[k]["sft_cos"] for k in neutral_ids])
    n = len(N)
    loo = np.array([np.linalg.norm(N[i] - np.delete(N, i, 0).mean(0)) for i in range(n)])
    scale = math.sqrt(np.mean(loo ** 2)) * math.sqrt((1 + 1 / n) / (1 + 1 / (n - 1)))
    thr = blind["summary"]["gate_threshold"]
    cal = [(d["trait"], d) for d in det.values() if d["split"] == "calibration" and "activation_owner" in d]
    teach_panel = [(t, np.array([x["activation_owner"]["teacher"][c] for c in CANDS])) for t, x in cal]

    tspec = TrainSpec(**{**cfg["student"], "parallel_students": 32})
    nrows = run["rows_per_student"]
    skey = hash_obj({"base": cfg["base"], "student": tspec.model_dump(mode="json"), "n": nrows})[:16]
    jobs, meta = [], []
    recs: dict[str, dict] = {}
    for material in MATERIALS:
        for r in range(args.T):
            did = f"{material}#{r}"
            te, tk, secs = benign_teacher(cfg["base"], base, cfg["teacher"], material, r)
            rows, _ = search.get_dataset(te, tk, cfg["gen"], r, {})
            pv = search.probs_vector(te.model)
            kl = search.teacher_kl(base, te.model, rows)
            ratio = float(np.linalg.norm(sft.score(rows[:ROWS])["cos"] - N.mean(0)) / scale)
            ao = activation(rows[:ROWS], base, teacher=te.model)
            tvec = np.array([{t["target"]: t["teacher_cos"] for t in ao.payload["traits"]}[c] for c in CANDS])
            tz = zscore(tvec, teach_panel)
            recs[did] = {"material": material, "replicate": r, "implant_s": secs, "kept": len(rows),
                         "p_max": max(pv.values()), "p_argmax": max(pv, key=pv.get),
                         "p_max_change": max(abs(pv[c] - base_p[c]) for c in CANDS), "probs": pv,
                         **{k: kl[k] for k in ("kl_full", "kl_carrier", "disp_rel")},
                         "gate_ratio": ratio, "gate_flag": int(ratio > thr),
                         "teacher_direction_top": CANDS[int(np.nanargmax(tz))],
                         "teacher_direction_top_z": float(np.nanmax(tz))}
            search.log(f"{did}: P max {recs[did]['p_max']:.3f} ({recs[did]['p_argmax']}), KL carrier "
                       f"{kl['kl_carrier']:.4f}, gate {ratio:.2f} (thr {thr:.2f}), teacher direction "
                       f"{recs[did]['teacher_direction_top']} z {recs[did]['teacher_direction_top_z']:.2f}")
            # a benign material can keep fewer rows than the run's students saw (filler: 840 of 873); its students
            # train on what it kept, recorded, rather than on padded or repeated rows
            used = min(nrows, len(rows))
            recs[did]["rows_trained"] = used
            dkey = hash_obj([x["content_hash"] for x in rows[:used]])[:16]
            for s in range(args.S):
                d = search.CACHE / "students" / skey / f"{dkey}-s{s}"
                meta.append((did, s, d))
                if not (d / "config.json").exists():
                    jobs.append(StudentJob(rows[:used], s, d, te.model, None, f"{did} s{s}"))
    # one of the run's neutral students, retrained here (seed 0 on neutral#0)
    dkey0 = hash_obj([x["content_hash"] for x in neutral_rows[:nrows]])[:16]
    check_dir = search.CACHE / "students" / skey / f"{dkey0}-s0"
    if not (check_dir / "config.json").exists():
        jobs.append(StudentJob(neutral_rows[:nrows], 0, check_dir, base, None, "neutral#0 s0"))
    t0 = time.time()
    for a in range(0, len(jobs), tspec.parallel_students):
        finetune_many(base, jobs[a:a + tspec.parallel_students], tspec, carrier_alphabet=carrier_alphabet(search.CARRIER),
                      progress=False)
        search.log(f"students {min(a + tspec.parallel_students, len(jobs))}/{len(jobs)} ({time.time() - t0:.0f}s)")
    stored0 = next(r["scores"] for r in run["controls"] if r["teacher"] == "neutral#0" and r["seed"] == 0)
    here0 = search.probs_vector(ModelSpec(path=str(check_dir)))
    out["check"]["neutral0_s0_student_max_abs_log_diff"] = max(abs(math.log(here0[c]) - math.log(stored0[c]))
                                                               for c in CANDS)
    search.log(f"neutral#0 s0 retrained: max |log P - stored| {out['check']['neutral0_s0_student_max_abs_log_diff']:.2e}")
    benign_students = [{"teacher": did, "trait": None, "benign": True, "seed": s,
                        "scores": search.probs_vector(ModelSpec(path=str(d)))} for did, s, d in meta]
    # canary, the dataset as the unit: each benign dataset against the run's datasets (every animal's null is the
    # run's datasets lacking that trait: all of them for a benign dataset, which has no trait label)
    for did, rec in recs.items():
        mine = [x for x in benign_students if x["teacher"] == did]
        truth = canary_truth_datasets({"treated": run["treated"], "controls": run["controls"] + mine})[did]
        rec["canary_top_significant"] = truth["top_significant"]
        rec["canary_min_p"] = min(truth["p"].values())
        rec["canary_top_lift"] = max(truth["lift"].values())
    out["students"] = benign_students
    out["datasets"] = recs
    trait_ratio = [x["gate_ratio"] for x in blind["datasets"] if x["trait_label"] is not None]
    neutral_ratio = [x["gate_ratio"] for x in blind["datasets"] if x["trait_label"] is None]
    ben = [x["gate_ratio"] for x in recs.values()]
    test_td = [x["teacher_direction_top_score"] for x in blind["datasets"] if x.get("teacher_direction_top_score")
               is not None]
    out["summary"] = {
        "gate_threshold": thr,
        "gate_flagged_benign": [sum(x["gate_flag"] for x in recs.values()), len(recs)],
        "gate_flagged_benign_by_material": {m: [sum(x["gate_flag"] for x in recs.values() if x["material"] == m),
                                                sum(x["material"] == m for x in recs.values())] for m in MATERIALS},
        "gate_auc_trait_vs_benign": auc(trait_ratio, ben),
        "gate_auc_trait_vs_neutral_and_benign": auc(trait_ratio, neutral_ratio + ben),
        "teacher_direction_auc_trait_vs_benign": auc(test_td, [x["teacher_direction_top_z"] for x in recs.values()]),
        "canary_benign_carries": sum(x["canary_top_significant"] is not None for x in recs.values()),
        "rows_trained": {k: x["rows_trained"] for k, x in recs.items()}, "run_rows": nrows,
        "seconds": time.time() - t_start}
    path = search.OUT / f"benign-{args.name}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))
    search.log(f"-> {path}")


if __name__ == "__main__":
    main()
