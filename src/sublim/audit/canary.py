"""Canary fine-tune: short LoRA fine-tunes of the student on a sample of the dataset and of a reference
(neutral teacher's) dataset, several seeds, the trait battery before and after.

The unit of replication is the fine-tune seed: each seed draws its own row sample and trains one student
per arm; each student is scored by the exact probability of every candidate answer, averaged over the
question battery; arms are compared per trait with :func:`sublim.stats.compare` (seed-level Welch
interval, permutation p). This is the ground truth the cheaper audits (scan, rows) are checked against.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def canary(data: str | Path | Sequence[dict[str, Any]], student: Any, reference: str | Path | Sequence[dict[str, Any]],
           *, traits: Sequence[str] | str = ("animals",), n_rows: int = 256, seeds: Sequence[int] = (0, 1, 2),
           train: Any = None, n_questions: int | None = None, work_dir: str | Path | None = None,
           log: Any = None) -> AuditResult:
    """Fine-tune ``len(seeds)`` students per arm (data, reference) on ``n_rows`` sampled rows; compare the
    trait battery across seeds. Adapters go to ``work_dir`` (kept) or a temporary directory (removed)."""
    from sublim.backends.train import finetune, student_spec
    from sublim.stats import compare

    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")
    ref_rows = as_rows(reference, "reference")
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
        arms: dict[str, list[dict[str, float]]] = {"data": [], "reference": []}
        train_seconds = 0.0
        steps = 0
        for seed in seeds:
            for arm, src in (("data", rows), ("reference", ref_rows)):
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
    table = []
    for name in before:
        t = [a[name] for a in arms["data"]]
        c = [a[name] for a in arms["reference"]]
        cmp_ = compare(t, c)
        table.append({"trait": name, "target": name.split(":", 1)[1], "before": before[name],
                      "data": cmp_["treatment"], "reference": cmp_["control"], "diff": cmp_["diff"],
                      "diff_ci": cmp_["diff_t_ci"], "p": cmp_["p_welch"], "p_perm": cmp_["p_perm"],
                      "ratio": cmp_["ratio"], "per_seed_data": t, "per_seed_reference": c})
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
    for r in table:
        metrics[f"diff.{r['target']}"] = r["diff"]
    payload = {"student": spec.model_dump(), "train": tr.model_dump(mode="json"), "seeds": list(seeds),
               "n_rows": metrics["n_rows"], "reference_rows": min(n_rows, len(ref_rows)), "categories": cats,
               "traits": table, "order": [table[k]["target"] for k in order],
               "cost": {"seconds": seconds, "train_seconds": train_seconds, "steps": steps}}
    lo = top["diff_ci"][0]
    summary = [(f"canary: largest shift {top['trait']} {top['diff']:+.4f} (95% CI {fmt3(lo)} .. "
                f"{fmt3(top['diff_ci'][1])}, p {fmt3(top['p'])}, {len(seeds)} seeds per arm) vs reference")]
    return AuditResult("canary", metrics, payload, [_html(payload)], title="sublim audit canary", summary=summary)


def _html(p: dict[str, Any]) -> Section:
    s = Section("Trait battery after short fine-tunes")
    s.text(f"{len(p['seeds'])} seeds per arm; each seed trains one student on {p['n_rows']} sampled dataset rows "
           f"and one on {p['reference_rows']} reference rows ({p['train']['method']}, {p['train']['epochs']} epoch(s), "
           f"lr {p['train']['lr']}). Intervals are across seeds.")
    rows = []
    for t in sorted(p["traits"], key=lambda r: r["rank"])[:40]:
        rows.append([t["rank"], t["trait"], t["before"], t["data"]["mean"], t["reference"]["mean"], t["diff"],
                     t["diff_ci"][0], t["diff_ci"][1], t["p"]])
    s.table(["rank", "trait", "P before", "P data", "P reference", "diff", "lo", "hi", "p (Welch)"], rows)
    s.text(f"Cost: {p['cost']['seconds']:.1f} s ({p['cost']['train_seconds']:.1f} s training, {p['cost']['steps']} "
           "steps).", cls="note")
    return s

