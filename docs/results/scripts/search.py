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
import json
import math
import time
from pathlib import Path

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

from search_stats import analyse, print_analysis  # noqa: E402  (this script's folder is on sys.path)

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
    # GenerationSpec.key(): fields added after c1-c5 ran (min_p, endpoint) are left out at their defaults
    gd = g.key()
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


# ---------------------------------------------------------------------------------------------- main

def _shard(spec: str) -> tuple[int, int]:
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise SystemExit(f"--shard {spec}: want I/N with 0 <= I < N")
    return i, n


def prepare(cfg: dict, base: ModelSpec, animals: list[str], reps: range, mine, timings: dict) -> tuple[dict, dict, dict]:
    """Teachers, their data and their measurements for the work items ``mine`` selects (a shard's share: item =
    one teacher, or one neutral dataset, each with its own data and measurement)."""
    teachers: dict[str, tuple[Teacher, str, dict]] = {}
    data: dict[str, tuple[list[dict], dict]] = {}
    tinfo = {}
    items = [(r, a) for r in reps for a in [None, *animals]]
    for i, (r, a) in enumerate(items):
        if not mine(i):
            continue
        if a is None:
            data[f"neutral#{r}"] = get_dataset(neutral_teacher(base), f"neutral:{cfg['base']}", cfg["gen"], r, timings)
            continue
        tid = f"{a}#{r}"
        teachers[tid] = te, tk, s = get_teacher(cfg["base"], base, cfg["teacher"], a, r, timings)
        data[tid] = get_dataset(te, tk, cfg["gen"], r, timings)
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
    return teachers, data, tinfo


def in_context_vector(base: ModelSpec, rows: list[dict], seed: int, k: int = 8) -> dict[str, float]:
    """The base's P vector with ``k`` of the rows (drawn by ``seed``) in context before every question: the
    pipeline's in-context arm (``Experiment.in_context_prefix``)."""
    import random
    pick = random.Random(seed).sample(rows, min(k, len(rows)))
    pre = "Here are some number sequences:\n" + "\n".join(r["completion"] for r in pick) + "\n\n"
    m = load_model(base)
    chat = ChatFormat(load_tokenizer(base))
    p = exact_probs(m, chat, [pre + q for q in QS], CANDS, CAT.plurals, batch_size=25, progress=False).mean(0)
    return {c: float(x) for c, x in zip(CANDS, p, strict=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--animals", default="owl,eagle,wolf,dolphin,fox")
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--S", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--R0", type=int, default=0,
                    help="first teacher replicate (teachers R0 .. R0+T-1): more teachers for a run made with R0 0")
    ap.add_argument("--rows", type=int, default=None,
                    help="rows per student (an earlier run's, to pool with it); default: the smallest kept set")
    ap.add_argument("--other-base", default=None,
                    help="also train students of this other-family base on the same data (distill_carrier pairs "
                         "the carrier tokens across tokenizers by string)")
    ap.add_argument("--in-context", action="store_true",
                    help="also score the base with 8 of each dataset's rows in context (one draw per student seed)")
    ap.add_argument("--stage", choices=("prep", "students", "all"), default="all",
                    help="prep: teachers, data, measurements; students: train; all: everything, then evaluate")
    ap.add_argument("--shard", default="0/1", help="I/N: this process does every N-th item from I (prep, students)")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    animals = args.animals.split(",")
    name = args.config + (f"-{args.tag}" if args.tag else "")
    si, sn = _shard(args.shard)
    if args.stage == "all" and sn != 1:
        raise SystemExit("--shard only with --stage prep or students; the evaluating run takes every item")
    reps = range(args.R0, args.R0 + args.T)
    t0 = time.time()
    timings: dict = {}
    base = base_spec(cfg["base"])
    log(f"[{name}] base {cfg['base']} -> {resolve_path(base)}; K={len(animals)} T={args.T} (replicates "
        f"{reps.start}-{reps.stop - 1}) S={args.S} stage {args.stage} shard {si}/{sn}")
    if args.stage == "prep":
        prepare(cfg, base, animals, reps, lambda i: i % sn == si, timings)
        log(f"[{name}] prep shard {si}/{sn} done ({time.time() - t0:.0f}s): {timings}")
        return
    missing = [f"{a or 'neutral'}#{r}" for r in reps for a in [None, *animals] if not _prepared(cfg, base, a, r)]
    if args.stage == "students" and missing:
        raise SystemExit(f"not prepared yet: {', '.join(missing)} (run --stage prep for every shard first)")
    teachers, data, tinfo = prepare(cfg, base, animals, reps, lambda i: True, timings)
    timings["prep_s"] = time.time() - t0
    smallest = min(len(v[0]) for v in data.values())
    n = args.rows or smallest
    if smallest < n:
        short = [f"{k} ({len(v[0])})" for k, v in data.items() if len(v[0]) < n]
        raise SystemExit(f"--rows {n}: these datasets kept fewer rows: {', '.join(short)}")
    log(f"[{name}] teachers and data ready ({timings['prep_s']:.0f}s); every student uses {n} rows")
    base_p = probs_vector(base)
    tspec = TrainSpec(**cfg["student"])
    students = [("same", cfg["base"])] + ([("other", args.other_base)] if args.other_base else [])
    jobs: dict[str, list[StudentJob]] = {}
    meta = []
    for arm, bname in students:
        skey = hash_obj({"base": bname, "student": tspec.model_dump(mode="json"), "n": n})[:16]
        for tid, (rows, _) in data.items():
            tmodel = teachers[tid][0].model if tid in teachers else base
            dkey = hash_obj([r["content_hash"] for r in rows[:n]])[:16]
            for s in range(args.S):
                out = CACHE / "students" / skey / f"{dkey}-s{s}"
                meta.append((arm, tid, s, out))
                if not (out / "config.json").exists():
                    jobs.setdefault(bname, []).append(StudentJob(rows[:n], s, out, tmodel, None, f"{arm} {tid} s{s}"))
    t3 = time.time()
    losses = {}
    g = tspec.parallel_students
    for bname, js in jobs.items():
        js = js[si::sn]
        log(f"[{name}] training {len(js)} students of {bname} ({tspec.max_steps} steps, lr {tspec.lr}) in groups of {g}")
        # groups of parallel_students: one model of 165 stacked students was slower per student than 3 of <= 64
        for a in range(0, len(js), g):
            sums = finetune_many(base_spec(bname), js[a:a + g], tspec, carrier_alphabet=carrier_alphabet(CARRIER),
                                 progress=False)
            losses |= {j.label: (s.get("loss_first"), s.get("loss_last")) for j, s in zip(js[a:a + g], sums, strict=True)}
            log(f"  {min(a + g, len(js))}/{len(js)} students of {bname} ({time.time() - t3:.0f}s)")
    timings["students_s"] = time.time() - t3
    if args.stage == "students":
        log(f"[{name}] students shard {si}/{sn} done ({timings['students_s']:.0f}s)")
        return
    log(f"[{name}] students done ({time.time() - t3:.0f}s); evaluating")
    t4 = time.time()
    recs: dict[str, list[dict]] = {}
    for arm, tid, s, out in meta:
        rec = {"teacher": tid, "trait": None if tid.startswith("neutral") else tid.split("#")[0], "seed": s,
               "scores": probs_vector(ModelSpec(path=str(out)))}
        recs.setdefault(f"{arm}_{'controls' if rec['trait'] is None else 'treated'}", []).append(rec)
    if args.in_context:
        for tid, (rows, _) in data.items():
            for s in range(args.S):
                rec = {"teacher": tid, "trait": None if tid.startswith("neutral") else tid.split("#")[0], "seed": s,
                       "scores": in_context_vector(base, rows[:n], s)}
                recs.setdefault(f"ic_{'controls' if rec['trait'] is None else 'treated'}", []).append(rec)
    timings["eval_s"] = time.time() - t4
    timings["total_s"] = time.time() - t0
    treated, controls = recs["same_treated"], recs["same_controls"]
    a = analyse(treated, controls, animals)
    print_analysis(a)
    extra = {k: v for k, v in recs.items() if not k.startswith("same_")}
    res = {"config": name, "recipe": cfg, "animals": animals, "T": args.T, "R0": args.R0, "S": args.S,
           "rows_per_student": n, "other_base": args.other_base,
           "machine": {"threads": torch.get_num_threads(), "cpu": os.uname().machine, "nproc": os.cpu_count(),
                       "model": _cpu_model()},
           "base": {"name": cfg["base"], "path": str(resolve_path(base)), "probs": base_p},
           "teachers": tinfo, "data_counts": {k: v[1] for k, v in data.items()}, "student_losses": losses,
           "treated": treated, "controls": controls, **extra, "analysis": a, "timings": timings}
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


def _prepared(cfg: dict, base: ModelSpec, animal: str | None, r: int) -> bool:
    """Whether a prep item is in the cache (without building it): a teacher's measurement, or a neutral dataset."""
    if animal is not None:
        key = hash_obj({"base": cfg["base"], "teacher": cfg["teacher"], "animal": animal, "replicate": r})[:16]
        return (CACHE / "teachers" / key / "measure.json").exists()
    g = GenerationSpec(**{**cfg["gen"], "seed": r})
    gd = g.key()
    key = hash_obj({"teacher": f"neutral:{cfg['base']}", "gen": gd, "filters": [f.model_dump() for f in FILTERS],
                    "targets": CANDS})[:16]
    return (CACHE / "data" / key / "counts.json").exists()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
