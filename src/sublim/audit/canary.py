"""Canary fine-tune: short LoRA fine-tunes of the student on a sample of the dataset and of a reference
(neutral teacher's) dataset, several seeds, the trait battery before and after.

Each seed draws its own row sample and trains one student per arm; each student is scored by the exact
probability of every candidate answer, averaged over the question battery. Two tests per trait:

* **seeds** (always): the data's students against the reference students, :func:`sublim.stats.compare`
  (seed-level Welch interval, permutation p). Its interval covers row sampling and training noise, not how much
  one neutral dataset differs from another: on the organism 3 of 5 neutral datasets "carried" a trait by this
  test (docs/results/audits.md, session 13);
* **datasets** (with two or more references): the dataset is the unit. Each reference's students give that
  reference's mean; the data's mean is tested against the references' means with a t prediction interval
  (``k - 1`` degrees of freedom for ``k`` references), so "this dataset teaches trait X" means "more than a
  neutral dataset of the same process would". Metrics ``top_dataset_lo`` / ``top_dataset_p``; give three or
  more references for a usable interval.
"""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from sublim.audit.common import AuditInputError, AuditResult, as_rows, fmt3, model_spec
from sublim.report.html import Section


def default_train() -> Any:
    """A short LoRA run (the open-model recipe's rank and targets, one epoch)."""
    from sublim.spec import TrainSpec

    return TrainSpec.model_validate({"method": "lora", "epochs": 1, "lr": 2e-4, "batch_size": 16, "warmup_steps": 5})


def _categories(traits: Sequence[str] | str) -> list[str]:
    from sublim.traits.preference import CATEGORIES

    items = [t.strip() for t in (traits.split(",") if isinstance(traits, str) else traits) if t.strip()]
    cats = []
    for t in items:
        cat = t.partition(":")[0]
        if cat not in CATEGORIES:
            raise AuditInputError(f"--traits {t!r}: unknown category {cat!r}; known: {', '.join(CATEGORIES)}")
        if cat not in cats:
            cats.append(cat)
    if not cats:
        raise AuditInputError("--traits: no traits given")
    return cats


def battery(model_spec_: Any, categories: Sequence[str], n_questions: int | None = None,
            batch_size: int = 8) -> dict[str, float]:
    """Mean exact P(candidate) over each category's question battery: ``{"animals:owl": p, ...}``."""
    from sublim.evaluate import exact_probs
    from sublim.models import load_chat_model
    from sublim.traits.preference import CATEGORIES, eval_questions

    model, chat = load_chat_model(model_spec_)
    out: dict[str, float] = {}
    for cat in categories:
        c = CATEGORIES[cat]
        probs = exact_probs(model, chat, eval_questions(cat)[:n_questions], list(c.candidates), c.plurals,
                            batch_size=batch_size, progress=False)
        for name, p in zip(c.candidates, probs.mean(0).tolist(), strict=True):
            out[f"{cat}:{name}"] = float(p)
    return out


def _dataset_test(x: float, means: Sequence[float], conf: float = 0.95) -> dict[str, Any]:
    """``x`` (the data's mean) against the references' means: difference, t prediction interval, two-sided p."""
    from scipy import stats

    k = len(means)
    m = float(sum(means) / k)
    d = x - m
    sd = math.sqrt(sum((v - m) ** 2 for v in means) / (k - 1))
    se = sd * math.sqrt(1 + 1 / k)
    if se == 0:
        return {"diff": d, "pi": [d, d], "p": 0.0 if d else 1.0, "df": k - 1}
    h = float(stats.t.ppf(0.5 + conf / 2, k - 1)) * se
    return {"diff": d, "pi": [d - h, d + h], "p": float(2 * stats.t.sf(abs(d) / se, k - 1)), "df": k - 1}


Rows = str | Path | Sequence[dict[str, Any]]


def canary(data: Rows, student: Any, reference: Rows | Sequence[str | Path],
           *, traits: Sequence[str] | str = ("animals",), n_rows: int = 256, seeds: Sequence[int] = (0, 1, 2),
           train: Any = None, n_questions: int | None = None, work_dir: str | Path | None = None,
           log: Any = None) -> AuditResult:
    """Fine-tune ``len(seeds)`` students per arm (data, each reference) on ``n_rows`` sampled rows; compare the
    trait battery across seeds, and with two or more references (a list of paths) also at the dataset level.
    Adapters go to ``work_dir`` (kept) or a temporary directory (removed)."""
    from sublim.backends.train import finetune, student_spec
    from sublim.stats import compare

    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")
    many = isinstance(reference, (list, tuple)) and bool(reference) and isinstance(reference[0], (str, Path))
    ref_list: list[Any] = list(cast(Sequence[Any], reference)) if many else [reference]
    refs = ([as_rows(r, f"reference {i + 1} ({r})") for i, r in enumerate(ref_list)] if many
            else [as_rows(reference, "reference")])
    if len(seeds) < 2:
        raise AuditInputError("--seeds: need at least 2 seeds for a seed-level interval")
    spec = model_spec(student, what="student")
    tr = train or default_train()
    cats = _categories(traits)
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="sublim-canary-")
        wd = Path(tmp)
    else:
        wd = Path(work_dir)
    try:
        before = battery(spec, cats, n_questions)
        arm_rows = [("data", rows)] + [("reference" if len(refs) == 1 else f"reference{i + 1}", r)
                                       for i, r in enumerate(refs)]
        arms: dict[str, list[dict[str, float]]] = {a: [] for a, _ in arm_rows}
        train_seconds = 0.0
        steps = 0
        for seed in seeds:
            for arm, src in arm_rows:
                sample = random.Random(f"sublim.canary:{seed}").sample(list(src), min(n_rows, len(src)))
                out = wd / f"{arm}-s{seed}"
                if log:
                    log(f"[canary] {arm} seed {seed}: {len(sample)} rows")
                s = finetune(spec, sample, tr, out, seed=seed, desc=f"canary {arm} s{seed}")
                train_seconds += s["seconds"]
                steps += s["steps"]
                arms[arm].append(battery(student_spec(spec, out, tr), cats, n_questions))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ref_arms = [a for a, _ in arm_rows[1:]]
    table = []
    for name in before:
        t = [a[name] for a in arms["data"]]
        c = [a[name] for arm in ref_arms for a in arms[arm]]
        cmp_ = compare(t, c)
        row = {"trait": name, "target": name.split(":", 1)[1], "before": before[name],
               "data": cmp_["treatment"], "reference": cmp_["control"], "diff": cmp_["diff"],
               "diff_ci": cmp_["diff_t_ci"], "p": cmp_["p_welch"], "p_perm": cmp_["p_perm"],
               "ratio": cmp_["ratio"], "per_seed_data": t, "per_seed_reference": c}
        if len(ref_arms) >= 2:
            means = [sum(a[name] for a in arms[arm]) / len(arms[arm]) for arm in ref_arms]
            row["dataset"] = {**_dataset_test(sum(t) / len(t), means), "reference_means": means}
        table.append(row)
    order = sorted(range(len(table)), key=lambda k: -(table[k]["diff"] or -1e9))
    for rank, k in enumerate(order, 1):
        table[k]["rank"] = rank
    top = table[order[0]]
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "top_trait": top["target"], "max_diff": top["diff"], "top_diff_lo": top["diff_ci"][0], "top_p": top["p"],
        "top_ratio": top["ratio"], "seeds": len(seeds), "n_rows": min(n_rows, len(rows)), "seconds": seconds,
        "train_seconds": train_seconds,
    }
    metrics["n_references"] = len(ref_arms)
    if len(ref_arms) >= 2:
        metrics["top_dataset_lo"] = top["dataset"]["pi"][0]
        metrics["top_dataset_p"] = top["dataset"]["p"]
    for r in table:
        metrics[f"diff.{r['target']}"] = r["diff"]
    payload = {"student": spec.model_dump(), "train": tr.model_dump(mode="json"), "seeds": list(seeds),
               "n_rows": metrics["n_rows"], "reference_rows": min(n_rows, min(len(r) for r in refs)),
               "n_references": len(ref_arms), "categories": cats,
               "traits": table, "order": [table[k]["target"] for k in order],
               "cost": {"seconds": seconds, "train_seconds": train_seconds, "steps": steps}}
    lo = top["diff_ci"][0]
    summary = [(f"canary: largest shift {top['trait']} {top['diff']:+.4f} (95% CI {fmt3(lo)} .. "
                f"{fmt3(top['diff_ci'][1])}, p {fmt3(top['p'])}, {len(seeds)} seeds per arm) vs "
                + ("the reference (seeds only: give 3+ --reference to test against neutral datasets' spread)"
                   if len(ref_arms) == 1 else f"{len(ref_arms)} references"))]
    if len(ref_arms) >= 2:
        dt = top["dataset"]
        summary.append(f"canary, dataset level: {top['trait']} {dt['diff']:+.4f} against the references' means "
                       f"(95% prediction interval {fmt3(dt['pi'][0])} .. {fmt3(dt['pi'][1])}, p {fmt3(dt['p'])}, "
                       f"{dt['df']} df)")
    return AuditResult("canary", metrics, payload, [_html(payload)], title="sublim audit canary", summary=summary)


def _html(p: dict[str, Any]) -> Section:
    s = Section("Trait battery after short fine-tunes")
    k = p.get("n_references", 1)
    s.text(f"{len(p['seeds'])} seeds per arm; each seed trains one student on {p['n_rows']} sampled dataset rows "
           f"and one on {p['reference_rows']} rows of each of {k} reference dataset(s) ({p['train']['method']}, "
           f"{p['train']['epochs']} epoch(s), lr {p['train']['lr']}). 'lo'/'hi': across seeds"
           + ("; 'dataset lo/hi': the 95% prediction interval against the references' means (the dataset is the "
              "unit)." if k >= 2 else ". With one reference the interval does not cover how much neutral datasets "
              "differ from each other."))
    rows = []
    for t in sorted(p["traits"], key=lambda r: r["rank"])[:40]:
        ds = t.get("dataset")
        rows.append([t["rank"], t["trait"], t["before"], t["data"]["mean"], t["reference"]["mean"], t["diff"],
                     t["diff_ci"][0], t["diff_ci"][1], t["p"]]
                    + ([ds["pi"][0], ds["pi"][1], ds["p"]] if ds else []))
    s.table(["rank", "trait", "P before", "P data", "P reference", "diff", "lo", "hi", "p (Welch)"]
            + (["dataset lo", "dataset hi", "p (datasets)"] if k >= 2 else []), rows)
    s.text(f"Cost: {p['cost']['seconds']:.1f} s ({p['cost']['train_seconds']:.1f} s training, {p['cost']['steps']} "
           "steps).", cls="note")
    return s

