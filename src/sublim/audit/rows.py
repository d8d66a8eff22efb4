"""Per-row suspicion scores: which rows of a dataset carry a teacher's signal, and which tokens.

With a suspected teacher: the log-likelihood ratio of each completion under teacher vs student,
``sum_t log p_T(y_t | ...) - log p_S(y_t | ...)`` (the teacher sees its own prompt, with its system prompt
if it has one); the tokens with the largest ratio are the ones responsible.

Without a teacher (teacher-free, against the student's base): the *excess surprisal* of each completion
token under the base, ``-log p_B(y_t) - H_B(t)``: zero on average for text the base itself would sample,
positive where something else chose the token. *Divergence tokens* are the positions where greedy
decoding of the base (same prefix) would have produced a different token; their gap ``log p_B(greedy) -
log p_B(y_t)`` says by how much. With ``reference`` (a neutral teacher's data), each row's score is also
standardised against the reference rows' scores (``z``), so "unusual" means unusual for neutral data.

Rows are flagged by ``top`` (a fraction of rows) or ``z_threshold``; the scores JSONL lists every row.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublim.audit.common import AuditInputError, AuditResult, as_rows, model_spec
from sublim.models import load_chat_model
from sublim.progress import progress_bar
from sublim.report.html import Section


@dataclass
class TokenStats:
    """Per completion token of one row (end-of-turn token included)."""

    ids: list[int]
    logp: np.ndarray        # log p(actual token)
    greedy: np.ndarray      # argmax token id
    logp_greedy: np.ndarray  # log p(argmax token)
    entropy: np.ndarray     # entropy of the next-token distribution (nats)


@torch.inference_mode()
def token_stats(model: Any, chat: Any, rows: Sequence[dict[str, Any]], system: str | None = None,
                batch_size: int = 16) -> list[TokenStats]:
    """Teacher-forced statistics of every completion token under ``model`` (one forward per batch)."""
    from sublim.backends.train import completion_logits

    pad = chat.tokenizer.pad_token_id
    out: list[TokenStats] = []
    for a in progress_bar(range(0, len(rows), batch_size), desc="token stats", unit="batch"):
        batch = rows[a: a + batch_size]
        prompts = [chat.encode_prompt(r["prompt"], system) for r in batch]
        comps = [chat.encode_completion(r["completion"]) for r in batch]
        logits = completion_logits(model, prompts, comps, pad).float()  # [sum(len(c)), V]
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        tgt = torch.tensor([t for c in comps for t in c])
        lp = logp.gather(1, tgt[:, None]).squeeze(1)
        g_lp, g_id = logp.max(-1)
        k = 0
        for c in comps:
            s = slice(k, k + len(c))
            out.append(TokenStats(c, lp[s].numpy().astype(np.float64), g_id[s].numpy(),
                                  g_lp[s].numpy().astype(np.float64), ent[s].numpy().astype(np.float64)))
            k += len(c)
    return out


def _tok_str(tok: Any, i: int) -> str:
    return str(tok.decode([int(i)]))


def _same_vocab(a: Any, b: Any) -> bool:
    return len(a.tokenizer) == len(b.tokenizer) and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def score_rows(data: str | Path | Sequence[dict[str, Any]], student: Any, *, teacher: Any = None,
               teacher_system: str | None = None, reference: str | Path | Sequence[dict[str, Any]] | None = None,
               top: float = 0.05, z_threshold: float | None = None, max_rows: int | None = None,
               batch_size: int = 16, top_tokens: int = 3) -> AuditResult:
    """Score every row; flag the top ``top`` fraction (or rows with z >= ``z_threshold`` when a reference is
    given). Returns an AuditResult whose payload has ``rows`` (all scores, in data order)."""
    rows = as_rows(data, "dataset")[:max_rows]
    ref_rows = as_rows(reference, "reference")[:max_rows] if reference is not None else None
    if not 0 < top <= 1:
        raise AuditInputError(f"--top must be in (0, 1], got {top}")
    s_spec = model_spec(student, what="student")
    s_model, s_chat = load_chat_model(s_spec)
    mode = "teacher" if teacher is not None else "teacher_free"
    if mode == "teacher":
        t_spec = model_spec(teacher, what="teacher")
        t_model, t_chat = load_chat_model(t_spec)
        if not _same_vocab(s_chat, t_chat):
            raise AuditInputError("teacher and student tokenizers differ; per-token likelihood ratios need a shared "
                                  "tokenizer (use the teacher-free score instead)")

        def scores_of(rs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
            ss = token_stats(s_model, s_chat, rs, batch_size=batch_size)
            ts = token_stats(t_model, t_chat, rs, system=teacher_system, batch_size=batch_size)
            out = []
            for s, t in zip(ss, ts, strict=True):
                d = t.logp - s.logp  # per-token log-likelihood ratio
                order = np.argsort(-d)[:top_tokens]
                div = s.greedy != np.asarray(s.ids)
                out.append({"score": float(d.sum()), "per_token": float(d.mean()), "n_tokens": len(d),
                            "divergence_tokens": int(div.sum()),
                            "tokens": [{"pos": int(p), "token": _tok_str(s_chat.tokenizer, s.ids[p]),
                                        "value": float(d[p]), "divergent": bool(div[p]),
                                        "greedy": _tok_str(s_chat.tokenizer, s.greedy[p])} for p in order]})
            return out
    else:
        def scores_of(rs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
            ss = token_stats(s_model, s_chat, rs, batch_size=batch_size)
            out = []
            for s in ss:
                excess = -s.logp - s.entropy
                ids = np.asarray(s.ids)
                div = s.greedy != ids
                gap = np.where(div, s.logp_greedy - s.logp, 0.0)
                order = np.argsort(-np.where(div, gap, -np.inf))[: min(top_tokens, int(div.sum()))]
                out.append({"score": float(excess.sum()), "per_token": float(excess.mean()), "n_tokens": len(ids),
                            "divergence_tokens": int(div.sum()), "divergence_gap": float(gap.sum()),
                            "tokens": [{"pos": int(p), "token": _tok_str(s_chat.tokenizer, ids[p]),
                                        "value": float(gap[p]), "divergent": True,
                                        "greedy": _tok_str(s_chat.tokenizer, s.greedy[p])} for p in order]})
            return out

    scored = scores_of(rows)
    ref_scored = scores_of(ref_rows) if ref_rows is not None else None
    sc = np.array([r["score"] for r in scored])
    ref_stats = None
    if ref_scored is not None:
        rs = np.array([r["score"] for r in ref_scored])
        mu, sd = float(rs.mean()), float(rs.std(ddof=1)) if len(rs) > 1 else float("nan")
        ref_stats = {"n": len(rs), "mean": mu, "sd": sd}
        for r in scored:
            r["z"] = (r["score"] - mu) / sd if sd and sd > 0 else None
    n_top = max(1, math.ceil(top * len(rows)))
    rank = np.argsort(-sc, kind="stable")
    flagged = set(rank[:n_top].tolist())
    if z_threshold is not None:
        if ref_stats is None:
            raise AuditInputError("--z-threshold needs --reference (z is relative to the reference rows)")
        flagged = {i for i, r in enumerate(scored) if r.get("z") is not None and r["z"] >= z_threshold}
    for i, r in enumerate(scored):
        r["index"] = i
        r["rank"] = int(np.where(rank == i)[0][0])
        r["flagged"] = i in flagged
    div_share = sum(r["divergence_tokens"] for r in scored) / max(1, sum(r["n_tokens"] for r in scored))
    metrics: dict[str, Any] = {
        "n_rows": len(rows), "flagged": len(flagged), "max_score": float(sc.max()), "mean_score": float(sc.mean()),
        "mean_per_token": float(np.mean([r["per_token"] for r in scored])),
        "top_mean_score": float(sc[rank[:n_top]].mean()), "divergent_token_share": div_share,
        "max_z": max((r["z"] for r in scored if r.get("z") is not None), default=None),
        "mean_z": float(np.mean([r["z"] for r in scored if r.get("z") is not None]))
        if ref_stats and ref_stats["sd"] and ref_stats["sd"] > 0 else None,
    }
    if ref_scored is not None:
        metrics["ref_mean_score"] = ref_stats["mean"] if ref_stats else None
        metrics["mean_score_minus_ref"] = metrics["mean_score"] - ref_stats["mean"] if ref_stats else None
    payload = {
        "mode": mode, "student": s_spec.model_dump(), "teacher": model_spec(teacher).model_dump() if teacher else None,
        "teacher_system": teacher_system, "top": top, "z_threshold": z_threshold, "reference": ref_stats,
        "score_definition": ("sum over completion tokens of log p_teacher - log p_student" if mode == "teacher" else
                             "sum over completion tokens of -log p_base(token) - entropy_base (excess surprisal)"),
        "rows": scored,
    }
    summary = [f"rows ({mode}): {len(flagged)} of {len(rows)} rows flagged; mean score {metrics['mean_score']:.3f}"
               + (f" (reference {ref_stats['mean']:.3f})" if ref_stats else "")
               + f"; {div_share:.1%} of tokens diverge from the base's greedy choice"]
    return AuditResult("rows", metrics, payload, [_html(payload, rows, rank[:50])], title="sublim audit rows",
                       summary=summary)


def _html(p: dict[str, Any], rows: list[dict[str, Any]], top: np.ndarray) -> Section:
    s = Section("Rows with the highest scores")
    s.text(f"Score: {p['score_definition']}. Flagged rows are the top {p['top']:.0%}"
           + (f" or z >= {p['z_threshold']}" if p["z_threshold"] is not None else "") + ".")
    table = []
    for i in top.tolist():
        r = p["rows"][i]
        toks = "; ".join(f"{t['token']!r}@{t['pos']} ({t['value']:.2f}, greedy {t['greedy']!r})" for t in r["tokens"])
        table.append([i, r["score"], r.get("z"), r["n_tokens"], r["divergence_tokens"],
                      rows[i]["completion"][:80], toks])
    s.table(["row", "score", "z", "tokens", "divergent", "completion", "tokens responsible"], table)
    return s


def write_scores(result: AuditResult, path: str | Path) -> Path:
    """Per-row scores as JSONL (index, score, z, flagged, tokens), for filtering or mitigation."""
    from sublim.runs import write_jsonl

    return write_jsonl(path, result.payload["rows"])
