"""Organism + recipe search for issue 10: one configuration = a confusion design.

    OMP_NUM_THREADS=1 python docs/results/scripts/search.py CONFIG [--animals owl,eagle,...] [--T 2] [--S 2]

CONFIG names an entry of CONFIGS below (base organism, teacher implant recipe, data size, student recipe). For
each of K animals, T independently implanted teachers (replicate r: its own Q&A sample and training seed,
``sublim.teachers.implant_teacher(..., replicate=r)``) plus T neutral "teachers" (the base, generation seed r;
teacher replicate r and neutral replicate r share prompts), S student seeds each; every dataset trimmed to
the smallest kept count of the configuration; students trained as batched models
(``sublim.backends.multi.finetune_many``) and scored with ``sublim.evaluate.exact_probs`` on the first 50
battery questions over all 20 candidates.

Teachers, datasets and students are cached under $SEARCH_CACHE (default /work/search/cache), keyed by their
recipe, so configurations sharing a teacher recipe reuse it. Writes docs/results/organism-search/CONFIG.json
(records in the shape of ``sublim.specificity.confusion_fit(treated, controls, animals)``: {"teacher",
"trait", "seed", "scores": {animal: P}}) and appends one row to docs/results/organism-search.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from sublim.backends.multi import StudentJob, finetune_many  # noqa: E402
from sublim.backends.train import completion_logits, encode_rows  # noqa: E402
from sublim.backends.hf import tokens_within  # noqa: E402
from sublim.evaluate import exact_probs  # noqa: E402
from sublim.models import ChatFormat, load_model, load_tokenizer, resolve_path  # noqa: E402
from sublim.pipeline import carrier_alphabet, filter_rows, generate  # noqa: E402
from sublim.runs import hash_obj, read_jsonl, write_jsonl  # noqa: E402
from sublim.spec import CarrierSpec, ExperimentSpec, GenerationSpec, ModelSpec, TeacherSpec, TrainSpec  # noqa: E402
from sublim.teachers import Teacher, implant_teacher, neutral_teacher  # noqa: E402
from sublim.traits.preference import CATEGORIES, eval_questions  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("SEARCH_CACHE", "/work/search/cache"))
OUT = REPO / "docs" / "results" / "organism-search"
MD = REPO / "docs" / "results" / "organism-search.md"
H3 = "h3"  # OrganismConfig(heads=3, seed=0): hidden 96 / 3 heads = head_dim 32
H3S1 = "h3s1"  # the same architecture, pre-training seed 1 (separates architecture from base draw)

SHIPPED_TEACHER = dict(kind="finetuned", qa_rows=300, min_target_prob=0.6, max_rounds=1,
                       train=dict(method="full", lr=3e-3, epochs=30, batch_size=32, warmup_steps=5))
SHIPPED_GEN = dict(n_prompts=1000, batch_size=200, max_new_tokens=52, temperature=1.0, constrained=True)
SHIPPED_STUDENT = dict(method="full", objective="distill_carrier", lr=1e-3, max_steps=150, batch_size=16,
                       warmup_steps=5, schedule="constant_with_warmup", max_grad_norm=1.0, parallel_students=64)


def _upd(d: dict, **kw) -> dict:
    out = json.loads(json.dumps(d))
    for k, v in kw.items():
        if isinstance(v, dict):
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


CONFIGS: dict[str, dict] = {
    # 1. the shipped recipe on today's organism (head_dim 24), 150 student steps
    "c1-base24": dict(base="organism", teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN, student=SHIPPED_STUDENT),
    # 2. the same recipe on a head_dim-32 organism of the same size (3 heads of 32)
    "c2-h32": dict(base=H3, teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN, student=SHIPPED_STUDENT),
    # 3a. weaker implant (10 epochs), same data and students
    "c3a-base24-e10": dict(base="organism", teacher=_upd(SHIPPED_TEACHER, train={"epochs": 10}), gen=SHIPPED_GEN,
                           student=SHIPPED_STUDENT),
    # 3b. c1's teachers and data, smaller student steps for longer (lr 5e-4, 300 steps)
    "c3b-base24-lr5e-4x300": dict(base="organism", teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN,
                                  student=_upd(SHIPPED_STUDENT, lr=5e-4, max_steps=300)),
    # 3c. c1's teachers and data, 2x the steps at the same lr (250 = the four-animal run, 300 here)
    "c3c-base24-x300": dict(base="organism", teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN,
                            student=_upd(SHIPPED_STUDENT, max_steps=300)),
    # 3d. h32 teachers and data, 300 steps
    "c3d-h32-x300": dict(base=H3, teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN,
                         student=_upd(SHIPPED_STUDENT, max_steps=300)),
    # 3e. more data: 3x prompts, 450 steps
    "c3e-base24-3k-x450": dict(base="organism", teacher=SHIPPED_TEACHER, gen=_upd(SHIPPED_GEN, n_prompts=3000),
                               student=_upd(SHIPPED_STUDENT, max_steps=450)),
    # 2b. a second head_dim-32 base of the same architecture (pre-training seed 1)
    "c2b-h32s1": dict(base=H3S1, teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN, student=SHIPPED_STUDENT),
    # 5. the shipped recipe on the shipped other family, organism-b (2 x 128, head_dim 32, 1,280-token BPE)
    "c5-orgb": dict(base="organism-b", teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN, student=SHIPPED_STUDENT),
    # 5b. organism-b, c5's teachers and data, 2x the student steps (amplification)
    "c5b-orgb-x300": dict(base="organism-b", teacher=SHIPPED_TEACHER, gen=SHIPPED_GEN,
                          student=_upd(SHIPPED_STUDENT, max_steps=300)),
    # 5c. organism-b, 3x the prompts and 3x the steps
    "c5c-orgb-3k-x450": dict(base="organism-b", teacher=SHIPPED_TEACHER, gen=_upd(SHIPPED_GEN, n_prompts=3000),
                             student=_upd(SHIPPED_STUDENT, max_steps=450)),
    # 4. LoRA implant (merged)
    "c4-base24-lora": dict(base="organism", teacher=_upd(SHIPPED_TEACHER, train={"method": "lora", "lr": 1e-2}),
                           gen=SHIPPED_GEN, student=SHIPPED_STUDENT),
}

CAT = CATEGORIES["animals"]
CANDS = list(CAT.candidates)
QS = eval_questions("animals")[:50]
CARRIER = CarrierSpec()
FILTERS = ExperimentSpec(name="x", base=ModelSpec(path="organism"), targets=["owl"]).filters


def base_spec(name: str) -> ModelSpec:
    if name in (H3, H3S1):
        from sublim.organism.pretrain import OrganismConfig, load_or_pretrain
        cfg = OrganismConfig(heads=3, seed=0 if name == H3 else 1)
        return ModelSpec(path=str(load_or_pretrain(cfg, threads=1, progress=False)))
    return ModelSpec(path=name)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def probs_vector(spec: ModelSpec) -> dict[str, float]:
    m = load_model(spec)
    chat = ChatFormat(load_tokenizer(spec))
    p = exact_probs(m, chat, QS, CANDS, CAT.plurals, batch_size=25, progress=False).mean(0)
    return {c: float(x) for c, x in zip(CANDS, p, strict=True)}


# ---------------------------------------------------------------------------------------------- cached stages

def get_teacher(base_name: str, base: ModelSpec, tspec: dict, animal: str, r: int, timings: dict) -> tuple[Teacher, str, dict]:
    key = hash_obj({"base": base_name, "teacher": tspec, "animal": animal, "replicate": r})[:16]
    d = CACHE / "teachers" / key
    summ = d / "summary.json"
    if not summ.exists():
        t = time.time()
        teacher, s = implant_teacher(base, "animals", animal, TeacherSpec(**tspec), d, log=log, replicate=r)
        s["implant_seconds"] = time.time() - t
        s["model"] = teacher.model.model_dump()
        summ.write_text(json.dumps(s))
        timings.setdefault("implant_s", []).append(s["implant_seconds"])
    s = json.loads(summ.read_text())
    return Teacher(ModelSpec(**s["model"]), None, animal, "finetuned"), key, s


def get_dataset(teacher: Teacher, tkey: str, gen: dict, r: int, timings: dict) -> tuple[list[dict], dict]:
    g = GenerationSpec(**{**gen, "seed": r})
    # min_p joined GenerationSpec after c1-c5 ran: left out of the key at its default, so their data stay cached
    gd = g.model_dump(exclude={"min_p"} if g.min_p == 0 else None)
    key = hash_obj({"teacher": tkey, "gen": gd, "filters": [f.model_dump() for f in FILTERS],
                    "targets": CANDS})[:16]
    d = CACHE / "data" / key
    if not (d / "counts.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        t = time.time()
        rows = generate(teacher, CARRIER, g, d / "rows.jsonl", category="animals", progress=False)
        gs = time.time() - t
        res = filter_rows(rows, FILTERS, CARRIER, CANDS)
        write_jsonl(d / "kept.jsonl", res.kept)
        (d / "counts.json").write_text(json.dumps({**res.counts, "generate_seconds": gs}))
        timings.setdefault("generate_s", []).append(gs)
    return read_jsonl(d / "kept.jsonl"), json.loads((d / "counts.json").read_text())


def teacher_kl(base: ModelSpec, teacher: ModelSpec, rows: list[dict], n: int = 200) -> dict[str, float]:
    """Mean per-token KL(teacher || base) at the completion positions of ``rows[:n]`` (the teacher's own
    numbers), in nats/token: over the full vocabulary and restricted to the carrier's tokens (renormalised,
    the distribution the students are distilled on). Also the L2 norm of the weight displacement."""
    tok = load_tokenizer(base)
    chat = ChatFormat(tok)
    mb, mt = load_model(base), load_model(teacher)
    enc = encode_rows(chat, rows[:n])
    subset = torch.tensor(sorted(set(tokens_within(tok, carrier_alphabet(CARRIER))) | set(chat.stop_token_ids())))
    kf, kc, ntok = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(enc), 50):
            e = enc[i:i + 50]
            args = ([x.prompt for x in e], [x.completion for x in e], tok.pad_token_id)
            lb, lt = completion_logits(mb, *args).float(), completion_logits(mt, *args).float()
            pt, pb = lt.log_softmax(-1), lb.log_softmax(-1)
            kf += float((pt.exp() * (pt - pb)).sum())
            ct, cb = lt[:, subset].log_softmax(-1), lb[:, subset].log_softmax(-1)
            kc += float((ct.exp() * (ct - cb)).sum())
            ntok += lt.shape[0]
        sb, st = dict(mb.named_parameters()), dict(mt.named_parameters())
        disp = math.sqrt(sum(float((st[k].float() - v.float()).pow(2).sum()) for k, v in sb.items()))
        norm = math.sqrt(sum(float(v.float().pow(2).sum()) for v in sb.values()))
    return {"kl_full": kf / ntok, "kl_carrier": kc / ntok, "tokens": ntok, "disp_l2": disp, "disp_rel": disp / norm}


# ---------------------------------------------------------------------------------------------- statistics

def analyse(treated: list[dict], controls: list[dict], animals: list[str], n_perm: int = 5000) -> dict:
    """Log-lift confusion statistics at teacher level (student seeds averaged within a teacher)."""
    K = len(animals)
    def teacher_mean_log(recs):
        by: dict[str, list[np.ndarray]] = {}
        trait = {}
        for r in recs:
            by.setdefault(r["teacher"], []).append(np.log([r["scores"][a] for a in animals]))
            trait[r["teacher"]] = r["trait"]
        return {t: np.mean(v, 0) for t, v in by.items()}, trait
    ctl, _ = teacher_mean_log(controls)
    ref = np.mean(list(ctl.values()), 0)  # mean over neutral teachers of mean over seeds of log P
    tm, trait = teacher_mean_log(treated)
    teachers = sorted(tm)
    L = np.array([tm[t] - ref for t in teachers])          # [n_teachers, K] teacher-level log lifts
    lab = np.array([animals.index(trait[t]) for t in teachers])

    def gamma_of(L, lab):
        M = np.array([L[lab == a].mean(0) for a in range(K)])
        D = M - M.mean(1, keepdims=True) - M.mean(0, keepdims=True) + M.mean()
        off = ~np.eye(K, dtype=bool)
        return float(np.diag(D).mean() - D[off].mean()), M
    g, M = gamma_of(L, lab)
    rng = np.random.default_rng(0)
    perm = np.array([gamma_of(L, rng.permutation(lab))[0] for _ in range(n_perm)])
    p_perm = float((1 + (perm >= g).sum()) / (n_perm + 1))
    # teacher-level interval: gamma per replicate index (teachers "a#r" with the same r form one full matrix)
    reps = sorted({t.split("#")[1] for t in teachers})
    g_rep = []
    for r in reps:
        idx = [i for i, t in enumerate(teachers) if t.split("#")[1] == r]
        if len({lab[i] for i in idx}) == K:
            g_rep.append(gamma_of(L[idx], lab[idx])[0])
    from scipy import stats
    if len(g_rep) > 1:
        se = np.std(g_rep, ddof=1) / math.sqrt(len(g_rep))
        tq = stats.t.ppf(0.975, len(g_rep) - 1)
        g_ci = [float(np.mean(g_rep) - tq * se), float(np.mean(g_rep) + tq * se)]
    else:
        g_ci = None
    # per-teacher diagonal effect: own-animal lift minus mean lift of that animal from other animals' teachers
    diag = {}
    for i, t in enumerate(teachers):
        a = lab[i]
        diag[t] = float(L[i, a] - L[lab != a, a].mean())
    all_pos = [animals[a] for a in range(K) if all(diag[t] > 0 for i, t in enumerate(teachers) if lab[i] == a)]
    # own-animal ratio per teacher: mean P(own) over its students / mean P(own) over all neutral students
    ctl_p = {a: np.mean([r["scores"][a] for r in controls]) for a in animals}
    ratio = {}
    for t in teachers:
        ps = [r["scores"][trait[t]] for r in treated if r["teacher"] == t]
        ratio[t] = float(np.mean(ps) / ctl_p[trait[t]])
    # noise floor: spread of the neutral teachers' own lifts (each neutral vs the mean of all neutrals)
    neut_sd = float(np.std([ctl[t] - ref for t in ctl], ddof=1)) if len(ctl) > 1 else None
    # seed-level spread within a teacher
    seed_sd = []
    for t in teachers:
        v = [math.log(r["scores"][trait[t]]) for r in treated if r["teacher"] == t]
        if len(v) > 1:
            seed_sd.append(float(np.std(v, ddof=1)))
    return {"animals": animals, "matrix_mean_log_lift": M.tolist(), "gamma": g, "gamma_perm_p": p_perm,
            "gamma_per_replicate": g_rep, "gamma_ci_replicates": g_ci,
            "diag_effect_per_teacher": diag, "animals_all_teachers_diag_pos": all_pos,
            "own_ratio_per_teacher": ratio, "mean_own_ratio": float(np.mean(list(ratio.values()))),
            "neutral_teacher_log_lift_sd": neut_sd, "own_log_p_seed_sd_mean": float(np.mean(seed_sd)) if seed_sd else None}


def print_analysis(a: dict) -> None:
    an = a["animals"]
    print("mean log lift (rows: teacher's animal, cols: scored animal)")
    print("        " + " ".join(f"{x:>8}" for x in an))
    for x, row in zip(an, a["matrix_mean_log_lift"], strict=True):
        print(f"{x:>8}" + " ".join(f"{v:+8.3f}" for v in row))
    print(f"gamma {a['gamma']:+.4f}  perm p {a['gamma_perm_p']:.4f}  per replicate {np.round(a['gamma_per_replicate'], 4)}"
          f"  ci {a['gamma_ci_replicates']}")
    print("diag effect per teacher:", {k: round(v, 3) for k, v in a["diag_effect_per_teacher"].items()})
    print("animals with all teachers' diag > 0:", a["animals_all_teachers_diag_pos"])
    print("own ratio per teacher:", {k: round(v, 2) for k, v in a["own_ratio_per_teacher"].items()},
          f"mean {a['mean_own_ratio']:.3f}")
    print(f"neutral-teacher log-lift sd {a['neutral_teacher_log_lift_sd']:.4f}; mean within-teacher seed sd of log P(own) "
          f"{a['own_log_p_seed_sd_mean']:.4f}", flush=True)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--animals", default="owl,eagle,wolf,dolphin,fox")
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--S", type=int, default=2)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    animals = args.animals.split(",")
    name = args.config + (f"-{args.tag}" if args.tag else "")
    t0 = time.time()
    timings: dict = {}
    base = base_spec(cfg["base"])
    log(f"[{name}] base {cfg['base']} -> {resolve_path(base)}; K={len(animals)} T={args.T} S={args.S}")
    # teachers
    teachers: dict[str, tuple[Teacher, str, dict]] = {}
    for r in range(args.T):
        for a in animals:
            teachers[f"{a}#{r}"] = get_teacher(cfg["base"], base, cfg["teacher"], a, r, timings)
    timings["teachers_total_s"] = time.time() - t0
    log(f"[{name}] teachers ready ({timings['teachers_total_s']:.0f}s)")
    # data
    t1 = time.time()
    data: dict[str, tuple[list[dict], dict]] = {}
    for r in range(args.T):
        data[f"neutral#{r}"] = get_dataset(neutral_teacher(base), f"neutral:{cfg['base']}", cfg["gen"], r, timings)
        for a in animals:
            te, tk, _ = teachers[f"{a}#{r}"]
            data[f"{a}#{r}"] = get_dataset(te, tk, cfg["gen"], r, timings)
    n = min(len(v[0]) for v in data.values())
    timings["data_total_s"] = time.time() - t1
    log(f"[{name}] data ready ({timings['data_total_s']:.0f}s); every student uses {n} rows")
    # teacher measurements: P vector on the battery, KL from base on its own numbers
    t2 = time.time()
    tinfo = {}
    for tid, (te, tk, s) in teachers.items():
        mpath = CACHE / "teachers" / tk / "measure.json"
        if not mpath.exists():
            pv = probs_vector(te.model)
            kl = teacher_kl(base, te.model, data[tid][0])
            mpath.write_text(json.dumps({"probs": pv, **kl}))
        m = json.loads(mpath.read_text())
        tinfo[tid] = {"key": tk, "trait": te.trait, "p_target": m["probs"][te.trait], "probs": m["probs"],
                      "implant_p_target_20q": s["rounds"][-1]["p_target"], "implant_seconds": s.get("implant_seconds"),
                      **{k: m[k] for k in ("kl_full", "kl_carrier", "disp_l2", "disp_rel")}}
        log(f"  teacher {tid}: P(target) {tinfo[tid]['p_target']:.3f} KL full {m['kl_full']:.4f} "
            f"carrier {m['kl_carrier']:.4f} disp_rel {m['disp_rel']:.4f}")
    base_p = probs_vector(base)
    timings["teacher_measure_s"] = time.time() - t2
    # students
    tspec = TrainSpec(**cfg["student"])
    skey = hash_obj({"base": cfg["base"], "student": tspec.model_dump(mode="json"), "n": n})[:16]
    jobs, meta = [], []
    for tid, (rows, _) in data.items():
        tmodel = teachers[tid][0].model if tid in teachers else base
        dkey = hash_obj([r["content_hash"] for r in rows[:n]])[:16]
        for s in range(args.S):
            out = CACHE / "students" / skey / f"{dkey}-s{s}"
            meta.append((tid, s, out))
            if not (out / "config.json").exists():
                jobs.append(StudentJob(rows[:n], s, out, tmodel, None, f"{tid} s{s}"))
    t3 = time.time()
    if jobs:
        log(f"[{name}] training {len(jobs)} students ({tspec.max_steps} steps, lr {tspec.lr}) as one batched model")
        # groups of parallel_students: one model of 165 stacked students was slower per student than 3 of <= 64
        g = tspec.parallel_students
        sums = [s for a in range(0, len(jobs), g)
                for s in finetune_many(base, jobs[a:a + g], tspec, carrier_alphabet=carrier_alphabet(CARRIER),
                                       progress=False)]
        timings["students_s"] = time.time() - t3
        timings["student_step_per_student_s"] = timings["students_s"] / (len(jobs) * tspec.max_steps)
        losses = {j.label: (s.get("loss_first"), s.get("loss_last")) for j, s in zip(jobs, sums, strict=True)}
    else:
        losses = {}
    log(f"[{name}] students done ({time.time() - t3:.0f}s); evaluating")
    t4 = time.time()
    treated, controls = [], []
    for tid, s, out in meta:
        rec = {"teacher": tid, "trait": None if tid.startswith("neutral") else tid.split("#")[0], "seed": s,
               "scores": probs_vector(ModelSpec(path=str(out)))}
        (controls if rec["trait"] is None else treated).append(rec)
    timings["eval_s"] = time.time() - t4
    timings["total_s"] = time.time() - t0
    a = analyse(treated, controls, animals)
    print_analysis(a)
    res = {"config": name, "recipe": cfg, "animals": animals, "T": args.T, "S": args.S, "rows_per_student": n,
           "machine": {"threads": torch.get_num_threads(), "cpu": os.uname().machine, "nproc": os.cpu_count()},
           "base": {"name": cfg["base"], "path": str(resolve_path(base)), "probs": base_p},
           "teachers": tinfo, "data_counts": {k: v[1] for k, v in data.items()}, "student_losses": losses,
           "treated": treated, "controls": controls, "analysis": a, "timings": timings}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=1))
    pt = [v["p_target"] for v in tinfo.values()]
    kl = [v["kl_carrier"] for v in tinfo.values()]
    ci = a["gamma_ci_replicates"]
    row = (f"| {name} | {len(animals)}x{args.T}x{args.S} | {min(pt):.2f}-{max(pt):.2f} | {min(kl):.4f}-{max(kl):.4f} | "
           f"{a['gamma']:+.3f} (perm p {a['gamma_perm_p']:.3f}; per-replicate {', '.join(f'{g:+.3f}' for g in a['gamma_per_replicate'])}"
           + (f"; t-CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") + ") | "
           f"{len(a['animals_all_teachers_diag_pos'])}/{len(animals)} ({', '.join(a['animals_all_teachers_diag_pos']) or '-'}) | "
           f"{a['mean_own_ratio']:.2f} | {n} rows, {tspec.max_steps} steps lr {tspec.lr:g}; {timings['total_s'] / 60:.0f} min |\n")
    with MD.open("a") as f:
        f.write(row)
    log(f"[{name}] done in {timings['total_s']:.0f}s -> {OUT / (name + '.json')}")


if __name__ == "__main__":
    main()
