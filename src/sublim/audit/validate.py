"""Validation of the audits on ground truth: datasets from trait teachers and neutral teachers of one base.

``python -m sublim.audit.validate --base organism --traits owl,eagle,wolf,dolphin,elephant,cat --seeds 4``

1. Datasets. For each trait a teacher is implanted from the base (fine-tuned on trait Q&A until it names the
   trait); for every data seed, each trait teacher and a neutral teacher (the base) generate number rows,
   which are filtered. Everything is cached in the work directory.
2. Scan. Each dataset is scanned at the base; each probe's cosine is z-scored leave-one-out over the other
   datasets whose teacher does not have that trait. Reported: how often the true trait ranks first (top-1)
   among all the category's probes, the AUC separating trait datasets from neutral ones by the top z
   (trait-agnostic gate) and by the true trait's z (trait-aware), the raw (uncalibrated) top-1 for contrast,
   and the cost per dataset.
3. Canary and rows (``--canary``): for some trait datasets, the canary effect (short fine-tunes, seeds; LoRA
   SFT by default, any TrainSpec via ``--canary-set``; with ``objective=distill_carrier`` each student distils
   its dataset's teacher on the carrier's tokens, the neutral arm distils the base) on all rows, with the
   top-scored rows (teacher log-likelihood ratio) dropped, and with as many random rows dropped; and the
   scan's cost relative to one canary run.

Teachers (``--teacher-full``) are implanted with :data:`FULL_IMPLANT` (the final organism's transmitting recipe:
full fine-tune on 300 trait Q&A rows, lr 3e-3, 30 epochs, batch 32); ``--teacher-set KEY=VALUE`` overrides
TeacherSpec fields (``qa_rows``, ``max_rounds``, ``min_target_prob``) or the implant's TrainSpec fields.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from sublim.runs import atomic_write_json, hash_obj, read_jsonl, write_jsonl

# The final organism's transmitting teacher recipe (docs/results/audits.md): full fine-tune on trait Q&A.
FULL_IMPLANT: dict[str, Any] = {"method": "full", "lr": 3e-3, "epochs": 30, "batch_size": 32, "warmup_steps": 5}
FULL_IMPLANT_QA_ROWS = 300


def teacher_spec(full: bool, overrides: list[str] | None = None) -> Any:
    """The implant recipe: :data:`FULL_IMPLANT` with ``full``, else TeacherSpec's default fine-tune; each
    ``KEY=VALUE`` override goes to the TeacherSpec when it names one of its fields (``qa_rows``, ``max_rounds``,
    ``min_target_prob``, ``template``), else to its TrainSpec (``epochs``, ``lr``, ``method``, ...)."""
    from sublim.spec import TeacherSpec, TrainSpec, parse_overrides

    top: dict[str, Any] = {"kind": "finetuned"}
    train: dict[str, Any] = TeacherSpec.model_validate({}).train.model_dump(mode="json")
    if full:
        top["qa_rows"] = FULL_IMPLANT_QA_ROWS
        train = TrainSpec.model_validate(FULL_IMPLANT).model_dump(mode="json")
    for k, v in parse_overrides(overrides):
        if k in TeacherSpec.model_fields and k not in ("train", "kind"):
            top[k] = v
        else:
            train[k] = v
    return TeacherSpec.model_validate({**top, "train": TrainSpec.model_validate(train)})


def auc(pos: list[float], neg: list[float]) -> float | None:
    """Mann-Whitney AUC: P(a positive scores above a negative), ties count half."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def make_datasets(base: Any, category: str, traits: list[str], seeds: list[int], n_rows: int, work: Path,
                  teacher_spec: Any = None, log: Any = print) -> list[dict[str, Any]]:
    """Trait-teacher and neutral-teacher datasets for every seed (cached under ``work``)."""
    from sublim.generation import filter_rows, generate
    from sublim.spec import CarrierSpec, FilterSpecModel, GenerationSpec, ModelSpec, TeacherSpec
    from sublim.teachers import Teacher, implant_teacher, neutral_teacher

    spec = base if isinstance(base, ModelSpec) else ModelSpec(path=str(base))
    tspec = teacher_spec or TeacherSpec.model_validate({"kind": "finetuned"})
    carrier = CarrierSpec(name="numbers")
    filters = [FilterSpecModel(name=n) for n in ("format", "count", "range", "echo", "progression", "mention")]
    teachers: dict[str | None, Teacher] = {None: neutral_teacher(spec)}
    out = []
    for t in traits:
        tdir = work / "teachers" / t
        info = tdir / "teacher.json"
        recipe = tspec.model_dump(mode="json")
        if info.exists():
            cached = json.loads(info.read_text())
            if cached.get("recipe", recipe) != recipe:
                raise ValueError(f"{info}: cached {t} teacher was implanted with another recipe "
                                 f"({cached['recipe']}); use another --work directory")
            teachers[t] = Teacher(ModelSpec(**cached["model"]), None, t, "finetuned")
        else:
            log(f"[validate] implanting a {t} teacher")
            t0 = time.perf_counter()
            teacher, summary = implant_teacher(spec, category, t, tspec, tdir, log=log)
            atomic_write_json(info, {**summary, "model": teacher.model.model_dump(), "recipe": recipe,
                                     "seconds": time.perf_counter() - t0})
            teachers[t] = teacher
    for seed in seeds:
        for tr in [*traits, None]:
            name = f"{tr or 'neutral'}-s{seed}"
            dst = work / "data" / f"{name}.jsonl"
            if not dst.exists():
                log(f"[validate] generating {name}")
                gen = GenerationSpec.model_validate({"n_prompts": int(n_rows * 1.6) + 16, "seed": seed})
                rows = generate(teachers[tr], carrier, gen, work / "raw" / f"{name}.jsonl", category=category)
                kept = filter_rows(rows, filters, carrier, traits).kept[:n_rows]
                write_jsonl(dst, kept)
            out.append({"name": name, "trait": tr, "seed": seed, "path": str(dst),
                        "teacher": teachers[tr].model.model_dump()})
    return out


def validate_scan(base: Any, category: str, datasets: list[dict[str, Any]], max_rows: int | None = None,
                  n_questions: int = 10, batch_size: int = 16) -> dict[str, Any]:
    """Scan every dataset; leave-one-out calibrated ranks, AUCs and cost."""
    from sublim.audit.scan import GradientScanner, cached_score, trait_probes

    t0 = time.perf_counter()
    probes = trait_probes(category, n_questions)
    sc = GradientScanner(base, probes, batch_size=batch_size)
    setup = time.perf_counter() - t0
    targets = [p.target for p in probes]
    cos = []
    secs = []
    for d in datasets:
        rows = read_jsonl(d["path"])[:max_rows]
        t1 = time.perf_counter()
        r = cached_score(sc, rows, use_cache=False)
        secs.append(time.perf_counter() - t1)
        cos.append(np.asarray(r["cos"]))
    C = np.stack(cos)  # [D, P]
    per = []
    for i, d in enumerate(datasets):
        z = np.full(len(targets), np.nan)
        for j, tgt in enumerate(targets):
            null = [C[k, j] for k, e in enumerate(datasets) if k != i and e["trait"] != tgt]
            if len(null) >= 2 and np.std(null, ddof=1) > 0:
                z[j] = (C[i, j] - np.mean(null)) / np.std(null, ddof=1)
        raw_centred = C[i] - C[i].mean()
        item = {"name": d["name"], "trait": d["trait"], "top_z": float(np.nanmax(z)),
                "top_trait": targets[int(np.nanargmax(z))], "raw_top_trait": targets[int(np.argmax(C[i]))],
                "centred_top_trait": targets[int(np.argmax(raw_centred))]}
        if d["trait"] is not None:
            j = targets.index(d["trait"])
            item["true_z"] = float(z[j])
            item["true_rank"] = int(1 + np.sum(z > z[j]))
        item["z"] = {t: (None if np.isnan(v) else float(v)) for t, v in zip(targets, z, strict=True)}
        item["cos"] = dict(zip(targets, C[i].tolist(), strict=True))
        per.append(item)
    trait_items = [p for p in per if p["trait"] is not None]
    neutral_items = [p for p in per if p["trait"] is None]
    top1 = float(np.mean([p["true_rank"] == 1 for p in trait_items])) if trait_items else None
    raw_top1 = float(np.mean([p["raw_top_trait"] == p["trait"] for p in trait_items])) if trait_items else None
    # trait-aware AUC: the true trait's z on its datasets vs the same probe's z on neutral datasets
    aware_pos = [p["true_z"] for p in trait_items]
    aware_neg = [n["z"][p["trait"]] for p in trait_items for n in neutral_items if n["z"][p["trait"]] is not None]
    return {
        "n_datasets": len(per), "n_trait": len(trait_items), "n_neutral": len(neutral_items),
        "n_probes": len(targets), "top1": top1, "raw_top1": raw_top1,
        "centred_top1": float(np.mean([p["centred_top_trait"] == p["trait"] for p in trait_items])) if trait_items
        else None,
        "auc_top_z": auc([p["top_z"] for p in trait_items], [p["top_z"] for p in neutral_items]),
        "auc_true_trait_z": auc(aware_pos, aware_neg),
        "seconds_setup": setup, "seconds_per_dataset": float(np.mean(secs)), "n_params": sc.n_params,
        "per_dataset": per,
    }


def validate_canary(base: Any, category: str, datasets: list[dict[str, Any]], traits: list[str], seeds: list[int],
                    n_rows: int, drop: float, train: Any, work: Path, scan: dict[str, Any] | None = None,
                    log: Any = print) -> dict[str, Any]:
    """Canary effect of each trait dataset (seed 0 data) vs the neutral one; then (``drop`` > 0) with the
    top-``drop`` rows by teacher score removed and with as many random rows removed. A distilling ``train``
    (``objective`` other than ``sft``) trains each arm on its dataset's teacher (the base for neutral data). With ``scan`` (from :func:`validate_scan`),
    also the rank correlation over all probes between the scan's prediction (cosine minus the neutral
    dataset's) and the canary's measured shift of every candidate."""
    from scipy.stats import spearmanr

    from sublim.audit.canary import battery
    from sublim.audit.rows import score_rows
    from sublim.backends.train import finetune, student_spec
    from sublim.spec import ModelSpec
    from sublim.stats import compare

    spec = base if isinstance(base, ModelSpec) else ModelSpec(path=str(base))
    alphabet = None
    if train.objective == "distill_carrier":
        from sublim.generation import make_carrier
        from sublim.spec import CarrierSpec

        carrier = make_carrier(CarrierSpec(name="numbers"))
        alphabet = frozenset(set().union(*(carrier.grammar(p.meta).alphabet for p in carrier.prompts(50, 0))))
    by = {(d["trait"], d["seed"]): d for d in datasets}
    s0 = min(d["seed"] for d in datasets)
    neutral_rows = read_jsonl(by[(None, s0)]["path"])[:n_rows]
    results: dict[str, Any] = {"drop": drop, "seeds": seeds, "traits": {}}

    def arm(label: str, rows: list[dict[str, Any]], seed: int, teacher: dict[str, Any]) -> dict[str, float]:
        key = f"{label}-s{seed}"
        f = work / "canary" / f"{key}.json"
        if f.exists():
            return dict(json.loads(f.read_text()))
        out = work / "canary" / key
        t0 = time.perf_counter()
        distil = train.objective != "sft"  # students distil the dataset's own teacher (the base for neutral data)
        finetune(spec, rows, train, out, seed=seed, teacher=ModelSpec(**teacher) if distil else None,
                 carrier_alphabet=alphabet)
        p = {**battery(student_spec(spec, out, train), [category]), "_seconds": time.perf_counter() - t0}
        atomic_write_json(f, p)
        return p  # with its cost (a first run used to return it without, so canary_seconds read 0)

    canary_seconds = []
    for t in traits:
        d = by[(t, s0)]
        rows = read_jsonl(d["path"])[:n_rows]
        conds = {"all": rows}
        k = 0
        if drop > 0:  # drop <= 0: the canary effect on all rows only
            scored = score_rows(rows, spec, teacher=ModelSpec(**d["teacher"]), top=drop)
            flagged = {r["index"] for r in scored.payload["rows"] if r["flagged"]}
            k = len(flagged)
            rnd = set(random.Random(f"validate:{t}").sample(range(len(rows)), k))
            conds["drop_top"] = [r for i, r in enumerate(rows) if i not in flagged]
            conds["drop_random"] = [r for i, r in enumerate(rows) if i not in rnd]
        key = f"{category}:{t}"
        ctrl_arms = [arm("neutral", neutral_rows, s, by[(None, s0)]["teacher"]) for s in seeds]
        ctrl = [a[key] for a in ctrl_arms]
        res_t: dict[str, Any] = {"dropped": k}
        for c, rs in conds.items():
            arms_c = [arm(f"{t}-{c}", rs, s, d["teacher"]) for s in seeds]
            vals = [a[key] for a in arms_c]
            cmp_ = compare(vals, ctrl)
            res_t[c] = {"diff": cmp_["diff"], "ci": cmp_["diff_t_ci"], "p": cmp_["p_welch"], "values": vals}
            if c == "all":
                # one canary run = every seed, both arms (fine-tune + battery)
                canary_seconds.append(sum(float(a.get("_seconds", 0.0)) for a in [*arms_c, *ctrl_arms]))
                if scan is not None:
                    cands = list(scan["per_dataset"][0]["cos"])
                    measured = [float(np.mean([a[f"{category}:{x}"] for a in arms_c])
                                      - np.mean([a[f"{category}:{x}"] for a in ctrl_arms])) for x in cands]
                    sd = {p["name"]: p for p in scan["per_dataset"]}
                    neutral_name = by[(None, s0)]["name"]
                    pred = [sd[d["name"]]["cos"][x] - sd[neutral_name]["cos"][x] for x in cands]
                    rho = spearmanr(pred, measured)
                    res_t["scan_vs_canary_spearman"] = float(rho.statistic)
                    res_t["scan_vs_canary_p"] = float(rho.pvalue)
                    res_t["measured_rank_of_trait"] = int(1 + sum(m > measured[cands.index(t)] for m in measured))
                    res_t["measured_top"] = cands[int(np.argmax(measured))]
        e = res_t["all"]["diff"]
        if e and "drop_top" in res_t:
            res_t["removed_by_top"] = 1 - res_t["drop_top"]["diff"] / e
            res_t["removed_by_random"] = 1 - res_t["drop_random"]["diff"] / e
        results["traits"][t] = res_t
        log(f"[validate] canary {t}: {json.dumps({c: res_t[c]['diff'] for c in conds})}")
    results["canary_seconds"] = float(np.mean(canary_seconds)) if canary_seconds else None
    return results


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="model directory, or 'organism'")
    ap.add_argument("--category", default="animals")
    ap.add_argument("--traits", default="owl,eagle,wolf,dolphin,elephant,cat")
    ap.add_argument("--seeds", type=int, default=3, help="data seeds per teacher")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--scan-rows", type=int, default=None)
    ap.add_argument("--work", default="runs/validate-audits")
    ap.add_argument("--canary", action="store_true", help="also run the canary / row-drop validation")
    ap.add_argument("--canary-seeds", type=int, default=3)
    ap.add_argument("--canary-traits", default=None, help="traits for the canary (default: the first two)")
    ap.add_argument("--drop", type=float, default=0.2, help="share of rows dropped (top-scored / random); 0: no "
                    "row-drop arms")
    ap.add_argument("--canary-set", action="append", default=[], help="TrainSpec override for the canary, KEY=VALUE")
    ap.add_argument("--teacher-full", action="store_true",
                    help="implant teachers by full fine-tuning (FULL_IMPLANT: 300 Q&A rows, lr 3e-3, 30 epochs, batch 32)")
    ap.add_argument("--teacher-set", action="append", default=[],
                    help="implant override, KEY=VALUE: a TeacherSpec field (qa_rows, max_rounds, min_target_prob) "
                         "or a TrainSpec field (epochs, lr, batch_size, method, ...)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from sublim.spec import ModelSpec, TrainSpec

    work = Path(a.work)
    base = ModelSpec(path=a.base)
    traits = [t for t in a.traits.split(",") if t]
    tspec = teacher_spec(a.teacher_full, a.teacher_set)
    t0 = time.perf_counter()
    ds = make_datasets(base, a.category, traits, list(range(a.seeds)), a.rows, work, tspec)
    res: dict[str, Any] = {"args": vars(a), "teacher": tspec.model_dump(mode="json"),
                           "datasets_seconds": time.perf_counter() - t0}
    res["scan"] = validate_scan(base, a.category, ds, a.scan_rows)
    s = res["scan"]
    print(f"scan: top-1 {s['top1']:.2f} (raw {s['raw_top1']:.2f}, centred {s['centred_top1']:.2f}); AUC top-z "
          f"{s['auc_top_z']}; AUC true-trait z {s['auc_true_trait_z']}; {s['seconds_per_dataset']:.2f} s/dataset")
    if a.canary:
        from sublim.audit.canary import default_train
        from sublim.spec import parse_overrides

        tr_cfg = default_train().model_dump(mode="json")
        tr_cfg.update(dict(parse_overrides(a.canary_set)))
        ct = traits[:2] if a.canary_traits is None else a.canary_traits.split(",")
        res["canary"] = validate_canary(base, a.category, ds, ct, list(range(a.canary_seeds)), a.rows, a.drop,
                                        TrainSpec.model_validate(tr_cfg), work / hash_obj(tr_cfg)[:8], scan=s)
        if res["canary"]["canary_seconds"]:
            res["scan_cost_ratio"] = (s["seconds_per_dataset"] + s["seconds_setup"]) / res["canary"]["canary_seconds"]
            print(f"scan / canary cost: {res['scan_cost_ratio']:.3f}")
    atomic_write_json(work / "validation.json", res)
    print(f"results: {work / 'validation.json'}")


if __name__ == "__main__":
    main()
