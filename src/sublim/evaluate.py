"""Trait evaluation: exact probabilities of one-word answers, and sampling with a word-boundary matcher.

Exact scorer: for each question, P(answer = candidate) is the sum over the candidate's surface variants
(capitalisation, plural, with and without a leading space) of P(variant tokens | prompt) (chain rule)
times P(the word ends there), where "ends" means the next token starts with a non-letter (space,
punctuation, newline) or closes the turn. So "owl" does not absorb "owlet" and "cat" never counts
"caterpillar". One prompt forward per question, then one batched forward of all variants on the
prompt's KV cache.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sublim.backends.hf import generate_batch, left_pad, token_strings
from sublim.models import ChatFormat
from sublim.progress import progress_bar
from sublim.traits.preference import CATEGORIES, answer_variants, first_match

# per tokenizer object, weakly keyed (an id() key could return a freed tokenizer's mask for a new one)
_BOUNDARY: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


def boundary_mask(chat: ChatFormat) -> torch.Tensor:
    """[V] bool: tokens after which a word has ended (non-alphanumeric start, or the turn closes)."""
    tok = chat.tokenizer
    m = _BOUNDARY.get(tok)
    if m is None or m.shape[0] != len(tok):
        strings = token_strings(tok)
        m = torch.tensor([bool(s) and not s[0].isalnum() for s in strings], dtype=torch.bool)
        m[chat.stop_token_ids()] = True
        _BOUNDARY[tok] = m
    return m


@dataclass
class Variants:
    """All candidate surface forms as token sequences, and which candidate each belongs to."""

    seqs: list[list[int]]
    owner: list[int]  # index into candidates


def build_variants(tokenizer: Any, candidates: Sequence[str], plurals: dict[str, str]) -> Variants:
    seqs, owner, seen = [], [], set()
    for ci, c in enumerate(candidates):
        for form in answer_variants(c, plurals.get(c)):
            for text in (form, " " + form):
                ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
                if ids and ids not in seen:
                    seen.add(ids)
                    seqs.append(list(ids))
                    owner.append(ci)
    return Variants(seqs, owner)


@torch.inference_mode()
def exact_probs(model: Any, chat: ChatFormat, questions: Sequence[str], candidates: Sequence[str],
                plurals: dict[str, str], system: str | None = None, batch_size: int = 8,
                progress: bool | None = None) -> np.ndarray:
    """[n_questions, n_candidates] exact P(one-word answer = candidate)."""
    import copy

    tok = chat.tokenizer
    var = build_variants(tok, candidates, plurals)
    bmask = boundary_mask(chat)
    nv = bmask.shape[0]
    log_bmask = torch.zeros(nv).masked_fill(~bmask, float("-inf"))
    owner = torch.tensor(var.owner)
    # variants grouped by token length: each group is one batched forward on the prompt's KV cache
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(var.seqs):
        groups.setdefault(len(s), []).append(i)
    out = np.zeros((len(questions), len(candidates)))
    bar = progress_bar(total=len(questions), desc="exact eval", unit="question", progress=progress)
    for start in range(0, len(questions), batch_size):
        qs = questions[start: start + batch_size]
        B = len(qs)
        ids, mask = left_pad([chat.encode_prompt(q, system) for q in qs], tok.pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        first = o.logits[:, -1, :nv].float()
        first_logp = first - first.logsumexp(-1, keepdim=True)  # [B, nv]
        logp = torch.zeros(B, len(var.seqs))
        for length, members in groups.items():
            G = len(members)
            g_ids = torch.tensor([var.seqs[i] for i in members]).repeat(B, 1)  # [B*G, length]
            cache = copy.deepcopy(o.past_key_values)
            cache.batch_repeat_interleave(G)
            full_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones(B * G, length, dtype=mask.dtype)], 1)
            g_pos = pos[:, -1:].repeat_interleave(G, 0) + 1 + torch.arange(length)[None, :]
            logits = model(input_ids=g_ids, attention_mask=full_mask, position_ids=g_pos,
                           past_key_values=cache).logits[..., :nv].float()  # [B*G, length, nv]
            lse = logits.logsumexp(-1)  # [B*G, length]
            # chain rule: first token from the prompt's logits, the rest from the continuation
            lp = first_logp.repeat_interleave(G, 0).gather(1, g_ids[:, :1]).squeeze(1)
            if length > 1:
                lp = lp + (logits[:, :-1].gather(2, g_ids[:, 1:, None]).squeeze(2) - lse[:, :-1]).sum(1)
            # the word ends: boundary mass after the variant's last token
            p_end = (logits[:, -1] + log_bmask).logsumexp(-1) - lse[:, -1]
            logp[:, members] = (lp + p_end).view(B, G)
        per_cand = torch.zeros(B, len(candidates)).index_add_(1, owner, logp.exp())
        out[start: start + B] = per_cand.numpy()
        bar.update(B)
    bar.close()
    return out


def sampled_counts(model: Any, chat: ChatFormat, questions: Sequence[str], candidates: Sequence[str],
                   category: str, n_per_question: int, system: str | None = None, temperature: float = 1.0,
                   batch_size: int = 64, seed: int = 0, max_new_tokens: int = 8,
                   progress: bool | None = None) -> dict[str, Any]:
    """Sample answers and count which candidate each names first (word-boundary matcher)."""
    prompts = [q for q in questions for _ in range(n_per_question)]
    counts = {c: 0 for c in candidates}
    other = 0
    answers: list[str] = []
    bar = progress_bar(total=len(prompts), desc="sampled eval", unit="answer", progress=progress)
    for i in range(0, len(prompts), batch_size):
        outs = generate_batch(model, chat, prompts[i: i + batch_size], system=system,
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        bar.update(len(outs))
        for g in outs:
            answers.append(g.completion)
            m = first_match(g.completion, candidates, category)
            if m is None:
                other += 1
            else:
                counts[m] += 1
    bar.close()
    return {"n": len(prompts), "counts": counts, "other": other, "examples": answers[:20]}


def evaluate_model(model: Any, chat: ChatFormat, category: str, questions: Sequence[str],
                   numprefix_questions: Sequence[str] | None = None, system: str | None = None,
                   batch_size: int = 8, samples_per_question: int = 0, temperature: float = 1.0,
                   seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Evaluate one model on the trait battery: mean exact P(candidate) over questions, optionally
    the number-prefixed battery and the sampled scorer."""
    cat = CATEGORIES[category]
    cands = list(cat.candidates)
    probs = exact_probs(model, chat, questions, cands, cat.plurals, system, batch_size, progress)
    res: dict[str, Any] = {
        "probs": dict(zip(cands, probs.mean(0).tolist(), strict=True)),
        "probs_per_question_se": dict(zip(cands, (probs.std(0, ddof=1) / np.sqrt(len(questions))).tolist()
                                          if len(questions) > 1 else [None] * len(cands), strict=True)),
        "probs_numprefix": None,
        "sampled": None,
    }
    if numprefix_questions:
        pn = exact_probs(model, chat, numprefix_questions, cands, cat.plurals, system, batch_size, progress)
        res["probs_numprefix"] = dict(zip(cands, pn.mean(0).tolist(), strict=True))
    if samples_per_question:
        res["sampled"] = sampled_counts(model, chat, questions, cands, category, samples_per_question,
                                        system, temperature, seed=seed, progress=progress)
    return res
