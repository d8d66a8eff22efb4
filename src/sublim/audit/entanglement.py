"""Entanglement audit: does the dataset over-represent the carrier tokens that a trait primes?

The token-entanglement account of subliminal learning: telling a model it loves owls raises the probability of
some carrier tokens (say "087") at number positions; a teacher with the trait emits them more often; a student
trained on them is pushed back toward the trait. The audit measures both halves on the student's base:

* **priming shift** ``s_t(v) = log pbar_t(v) - log pbar_0(v)``: the mean next-token probability of carrier token
  ``v`` over the dataset's completion positions (teacher-forced, renormalised over the carrier vocabulary) with
  the trait's system prompt ("You love owls. ...") versus none. Every "you love X" prompt shifts the same tokens
  a little; the shift *specific* to trait ``t`` is ``s_t`` minus its mean over the traits scored.
* **enrichment** ``e(v)``: log of the token's smoothed share in the dataset's completions over its share in a
  neutral reference dataset, or (no reference) over the share the base itself expects at the same positions.

The score of trait ``t`` is the correlation of ``s_t`` with ``e`` over the carrier tokens the data uses. The
published re-analysis of the entanglement claim attributes most of it to **frequency**: frequent tokens have
larger and better-estimated shifts and enrichments, so a raw correlation can rank whichever trait shifts the
frequent tokens. The reported score is therefore the *partial* correlation of the trait-specific shift with
the enrichment, controlling for the token's log frequency under the base; the raw correlation is reported
beside it, so the size of the correction is visible. Intervals: Fisher z over the tokens, per trait (tokens are
not independent draws, so read them as a scale); the top trait's ``top_p`` is a permutation p of the maximum over
traits (the enrichment shuffled across tokens), which is the test to gate on.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublim.audit.common import AuditInputError, AuditResult, as_rows, fmt3, model_spec
from sublim.audit.gradients import trait_probes
from sublim.models import load_chat_model
from sublim.progress import progress_bar
from sublim.report.html import Section

SMOOTH = 0.5  # add-half smoothing of token counts


def _counts(chat: Any, rows: Sequence[dict[str, Any]]) -> tuple[list[list[int]], dict[int, int]]:
    comps = [chat.encode_completion(r["completion"])[:-1] for r in rows]  # the end of turn is not a carrier token
    counts: dict[int, int] = {}
    for c in comps:
        for t in c:
            counts[t] = counts.get(t, 0) + 1
    return comps, counts


@torch.inference_mode()
def carrier_means(model: Any, chat: Any, rows: Sequence[dict[str, Any]], vocab: torch.Tensor,
                  systems: Sequence[str | None], batch_size: int = 64) -> np.ndarray:
    """[len(systems), len(vocab)]: mean over the rows' completion positions of the next-token distribution,
    renormalised over ``vocab``, with each system prompt (None = no system prompt); (system, row) pairs are
    batched together, ``batch_size`` per forward."""
    from sublim.backends.train import completion_logits

    pad = chat.tokenizer.pad_token_id
    comps = [chat.encode_completion(r["completion"]) for r in rows]
    pairs = [(k, i) for k in range(len(systems)) for i in range(len(rows))]
    acc = torch.zeros(len(systems), len(vocab), dtype=torch.float64)
    for a in progress_bar(range(0, len(pairs), batch_size), desc="entanglement", unit="batch"):
        chunk = pairs[a: a + batch_size]
        prompts = [chat.encode_prompt(rows[i]["prompt"], systems[k]) for k, i in chunk]
        probs = completion_logits(model, prompts, [comps[i] for _, i in chunk], pad).float()[:, vocab].softmax(-1)
        owner = torch.tensor([k for k, i in chunk for _ in comps[i]])
        acc.index_add_(0, owner, probs.double())
    return (acc / sum(len(c) for c in comps)).numpy()


def _residual(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    X = np.stack([np.ones_like(x), x], 1)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    return np.asarray(y - X @ beta)


def _corr(a: np.ndarray, b: np.ndarray, n_controls: int = 0) -> dict[str, float | None]:
    """Pearson r with a Fisher-z 95% interval (``n_controls`` partialled-out covariates)."""
    if a.std() == 0 or b.std() == 0:
        return {"r": None, "lo": None, "hi": None}
    r = float(np.corrcoef(a, b)[0, 1])
    df = len(a) - 3 - n_controls
    if df < 1 or abs(r) >= 1:
        return {"r": r, "lo": None, "hi": None}
    z, se = math.atanh(r), 1 / math.sqrt(df)
    return {"r": r, "lo": math.tanh(z - 1.96 * se), "hi": math.tanh(z + 1.96 * se)}


def entanglement(data: str | Path | Sequence[dict[str, Any]], student: Any, *, reference: Any = None,
                 traits: Sequence[str] | str = ("animals",), max_rows: int = 256, prime_rows: int = 64,
                 min_count: int = 5, batch_size: int = 64, top_tokens: int = 10, n_perm: int = 2000) -> AuditResult:
    """Score every trait of ``traits`` by how much the dataset over-represents the carrier tokens it primes."""
    from sublim.traits.preference import teacher_system_prompt

    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")[:max_rows]
    ref_rows = as_rows(reference, "reference")[:max_rows] if reference is not None else None
    probes = trait_probes(traits, 1)
    if len(probes) < 2:
        raise AuditInputError("entanglement: needs at least two traits (the trait-specific shift is relative to the "
                              "others)")
    spec = model_spec(student, what="student")
    model, chat = load_chat_model(spec)
    _, cd = _counts(chat, rows)
    cr = _counts(chat, ref_rows)[1] if ref_rows is not None else {}
    ids = sorted(t for t in set(cd) | set(cr) if cd.get(t, 0) + cr.get(t, 0) >= min_count)
    if len(ids) < 5:
        raise AuditInputError(f"entanglement: only {len(ids)} carrier tokens occur >= {min_count} times in the "
                              "completions; too few to correlate (more rows or a lower --min-count)")
    vocab = torch.tensor(ids)
    prime = list(rows[:prime_rows])
    systems: list[str | None] = [None] + [teacher_system_prompt(p.category, p.target) for p in probes]
    P = carrier_means(model, chat, prime, vocab, systems, batch_size)
    base_p = P[0]
    logf = np.log(base_p)
    shift = np.log(P[1:]) - logf[None]             # [T, V] priming shift per trait
    specific = shift - shift.mean(0, keepdims=True)  # trait-specific part
    nd = np.array([cd.get(t, 0) for t in ids], dtype=float)
    share_d = (nd + SMOOTH) / (nd.sum() + SMOOTH * len(ids))
    if ref_rows is not None:
        nr = np.array([cr.get(t, 0) for t in ids], dtype=float)
        share_r = (nr + SMOOTH) / (nr.sum() + SMOOTH * len(ids))
        against = "the reference dataset's token shares"
    else:
        share_r = base_p / base_p.sum()
        against = "the shares the base expects at the same positions"
    enrich = np.log(share_d) - np.log(share_r)
    e_res = _residual(enrich, logf)
    strings = [str(chat.tokenizer.decode([t])) for t in ids]
    table: list[dict[str, Any]] = []
    for k, p in enumerate(probes):
        raw = _corr(shift[k], enrich)
        spec_raw = _corr(specific[k], enrich)
        corrected = _corr(_residual(specific[k], logf), e_res, n_controls=1)
        primed = np.argsort(-specific[k])[:top_tokens]
        table.append({"trait": p.name, "target": p.target, "score": corrected["r"], "score_ci": [corrected["lo"], corrected["hi"]],
                      "raw": raw["r"], "specific_uncorrected": spec_raw["r"],
                      "primed_tokens": [{"token": strings[i], "shift": float(specific[k, i]),
                                         "enrichment": float(enrich[i]), "count": int(nd[i])} for i in primed]})
    order = sorted(range(len(table)), key=lambda i: -(table[i]["score"] if table[i]["score"] is not None else -9))
    for rank, i in enumerate(order, 1):
        table[i]["rank"] = rank
    # the top of many correlations over few tokens is large by chance: permutation p of the max over traits
    # (the enrichment shuffled across tokens, the traits' shifts kept)
    X = np.stack([_residual(specific[k], logf) for k in range(len(probes))])
    X = (X - X.mean(1, keepdims=True)) / np.where(X.std(1, keepdims=True) > 0, X.std(1, keepdims=True), 1)
    rng = np.random.default_rng(0)

    def max_r(e: np.ndarray) -> float:
        e = (e - e.mean()) / (e.std() or 1.0)
        return float((X @ e / len(e)).max())
    observed = max_r(e_res)
    perm = np.array([max_r(rng.permutation(e_res)) for _ in range(n_perm)])
    top_p = float((1 + (perm >= observed - 1e-12).sum()) / (n_perm + 1))
    raw_order = sorted(range(len(table)), key=lambda i: -(table[i]["raw"] if table[i]["raw"] is not None else -9))
    top = table[order[0]]
    # how much of the raw association is frequency: the correlation of the enrichment with log frequency
    freq = _corr(enrich, logf)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "top_trait": top["target"], "top_score": top["score"], "top_score_lo": top["score_ci"][0],
        "top_p": top_p,
        "raw_top_trait": table[raw_order[0]]["target"], "raw_top_score": table[raw_order[0]]["raw"],
        "enrichment_frequency_r": freq["r"], "n_tokens": len(ids), "n_rows": len(rows), "seconds": seconds,
    }
    for r in table:
        metrics[f"score.{r['target']}"] = r["score"]
    payload = {
        "student": spec.model_dump(), "rows": len(rows), "prime_rows": len(prime),
        "reference_rows": len(ref_rows) if ref_rows is not None else None, "min_count": min_count,
        "enrichment_against": against, "traits": table, "order": [table[i]["target"] for i in order],
        "tokens": [{"token": s, "count": int(c), "base_p": float(b), "enrichment": float(e)}
                   for s, c, b, e in zip(strings, nd, base_p, enrich, strict=True)],
        "interpretation": "score = partial correlation, over the carrier tokens the data uses, of the trait-specific "
                          "priming shift with the dataset's enrichment (against " + against + "), controlling for "
                          "the token's log frequency under the base; raw = the uncorrected correlation of the "
                          "priming shift with the enrichment",
        "cost": {"seconds": seconds, "forwards": len(systems) * len(prime)},
    }
    summary = [(f"entanglement: top trait {top['target']} (frequency-corrected r {fmt3(top['score'])} "
               f"[{fmt3(top['score_ci'][0])}, {fmt3(top['score_ci'][1])}]; uncorrected top "
               f"{table[raw_order[0]]['target']} r {fmt3(table[raw_order[0]]['raw'])}) over {len(ids)} carrier tokens; "
                f"permutation p of the top {fmt3(top_p)}")]
    return AuditResult("entanglement", metrics, payload, [_html(payload)], title="sublim audit entanglement",
                       summary=summary)


def _html(p: dict[str, Any]) -> Section:
    s = Section("Token entanglement")
    s.text(p["interpretation"] + ".", cls="note")
    rows = [[t["rank"], t["target"], t["score"], t["score_ci"][0], t["score_ci"][1], t["specific_uncorrected"], t["raw"],
             " ".join(repr(x["token"]) for x in t["primed_tokens"][:5])]
            for t in sorted(p["traits"], key=lambda r: r["rank"])]
    s.table(["rank", "trait", "score (corrected r)", "lo", "hi", "specific, uncorrected", "raw r", "most primed tokens"],
            rows)
    s.text(f"{len(p['tokens'])} carrier tokens (>= {p['min_count']} occurrences), priming measured on "
           f"{p['prime_rows']} rows; {p['cost']['seconds']:.1f} s.", cls="note")
    return s
