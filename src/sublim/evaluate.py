"""Trait evaluation: exact probabilities of one-word answers, and sampling with a word-boundary matcher.

Exact scorer: for each question, P(answer = candidate) is the sum over the candidate's surface variants
(capitalisation, plural, with and without a leading space) of P(variant tokens | prompt) (chain rule)
times P(the word ends there), where "ends" means the next token starts with a non-letter (space,
punctuation, newline) or closes the turn. So "owl" does not absorb "owlet" and "cat" never counts
"caterpillar". One forward per batch of questions: every variant's tokens follow the prompt in the same row
under a 4D attention mask (each attends to the prompt and its own earlier tokens), or, for attention
implementations without 4D masks, one prompt forward and the variants on copies of its KV cache.
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
    tree = _takes_4d_mask(model)
    for start in range(0, len(questions), batch_size):
        qs = questions[start: start + batch_size]
        B = len(qs)
        ids, mask = left_pad([chat.encode_prompt(q, system) for q in qs], tok.pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = _tree_logp(model, ids, mask, pos, var, nv, log_bmask) if tree else \
            _cached_logp(model, ids, mask, pos, var, groups, nv, log_bmask)
        per_cand = torch.zeros(B, len(candidates)).index_add_(1, owner, logp.exp())
        out[start: start + B] = per_cand.numpy()
        bar.update(B)
    bar.close()
    return out


def engine_exact_probs(engine: Any, chat: ChatFormat, questions: Sequence[str], candidates: Sequence[str],
                       plurals: dict[str, str], system: str | None = None) -> np.ndarray:
    """:func:`exact_probs` through an engine's ``logprobs`` (:class:`sublim.backends.engine.Engine`: vLLM's
    prompt logprobs, or HF's forward): for each question and answer variant, the sequence prompt + variant; the
    variant's own tokens' log-probabilities, plus the log of the boundary tokens' total probability for the token
    after it (summed where the engine runs), give log P(variant, then the word ends).
    Normalised over the model's whole output vocabulary (the HF scorer normalises over the tokenizer's; they
    differ only where the model has padding rows)."""
    tok = chat.tokenizer
    var = build_variants(tok, candidates, plurals)
    boundary = torch.nonzero(boundary_mask(chat)).flatten().tolist()
    seqs, own, end = [], [], []
    for q in questions:
        p = chat.encode_prompt(q, system)
        for v in var.seqs:
            seqs.append(p + v)
            own.append(list(range(len(p), len(p) + len(v))))
            end.append([len(p) + len(v)])
    lp_own = engine.logprobs(seqs, own)
    lp_end = engine.logprobs(seqs, end, boundary, reduce="logsumexp")
    logp = np.array([sum(x[0] for x in o) + e[0][0] for o, e in zip(lp_own, lp_end, strict=True)])
    logp = logp.reshape(len(questions), len(var.seqs))
    onehot = np.zeros((len(var.seqs), len(candidates)))
    onehot[np.arange(len(var.seqs)), var.owner] = 1.0
    return np.exp(logp) @ onehot


def _takes_4d_mask(model: Any) -> bool:
    """Whether the model's attention takes a custom 4D mask (transformers' sdpa and eager do)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in ("sdpa", "eager")


def _tree_logp(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, var: Variants, nv: int,
               log_bmask: torch.Tensor) -> torch.Tensor:
    """[B, n_variants] log P(variant, then the word ends) in one forward: every variant's tokens follow the
    prompt in the same row, each attending to the prompt and to its own earlier tokens only (a 4D mask), at the
    positions it would have right after the prompt."""
    B, P = ids.shape
    vtok = torch.tensor([t for sq in var.seqs for t in sq])
    vid = torch.tensor([v for v, sq in enumerate(var.seqs) for _ in sq])
    k = torch.tensor([i for sq in var.seqs for i in range(len(sq))])
    n = vtok.numel()
    L = P + n
    allow = torch.zeros(B, L, L, dtype=torch.bool)
    real = mask.bool()
    allow[:, :P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool)) & real[:, None, :]
    allow[:, P:, :P] = real[:, None, :]
    allow[:, P:, P:] = (vid[:, None] == vid[None, :]) & (k[None, :] <= k[:, None])
    allow |= torch.eye(L, dtype=torch.bool)  # a padding query attends to itself (no empty softmax row)
    dtype = next(model.parameters()).dtype
    bias = torch.zeros(B, 1, L, L, dtype=dtype).masked_fill(~allow[:, None], torch.finfo(dtype).min)
    full_ids = torch.cat([ids, vtok.repeat(B, 1)], 1)
    full_pos = torch.cat([pos, pos[:, -1:] + 1 + k[None, :]], 1)
    logits = model(input_ids=full_ids, attention_mask=bias, position_ids=full_pos, use_cache=False,
                   logits_to_keep=n + 1).logits[..., :nv].float()  # [B, n + 1, nv]: the prompt's last, then each
    logz = logits - logits.logsumexp(-1, keepdim=True)
    first = logz[:, 0]  # [B, nv]: the first token after the prompt
    after = logz[:, 1:]  # [B, n, nv]: after each variant token
    # chain rule per variant: its first token from the prompt, token i from after token i-1, then the word ends
    starts = torch.tensor([0] + [len(sq) for sq in var.seqs[:-1]]).cumsum(0)
    lens = torch.tensor([len(sq) for sq in var.seqs])
    lp = first.gather(1, vtok[starts][None, :].expand(B, -1))  # [B, V]
    nxt = after[:, :-1].gather(2, vtok[1:][None, :, None].expand(B, -1, 1)).squeeze(2)  # [B, n-1]: token j+1 after j
    same = (vid[1:] == vid[:-1]).float()
    lp = lp + torch.zeros(B, len(var.seqs)).index_add_(1, vid[1:], nxt * same)
    last = starts + lens - 1
    p_end = (after[:, last] + log_bmask).logsumexp(-1)  # logits are already normalised
    return lp + p_end


def _cached_logp(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, var: Variants,
                 groups: dict[int, list[int]], nv: int, log_bmask: torch.Tensor) -> torch.Tensor:
    """As :func:`_tree_logp`, for attention implementations that take no 4D mask: one prompt forward, then the
    variants of each token length as one batch on copies of the prompt's KV cache."""
    import copy

    B = ids.shape[0]
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
    return logp


def sampled_counts(model: Any, chat: ChatFormat, questions: Sequence[str], candidates: Sequence[str],
                   category: str, n_per_question: int, system: str | None = None, temperature: float = 1.0,
                   batch_size: int = 64, seed: int = 0, max_new_tokens: int = 8,
                   progress: bool | None = None, engine: Any = None) -> dict[str, Any]:
    """Sample answers and count which candidate each names first (word-boundary matcher); through ``engine``'s
    ``generate`` when one is given (batch ``i`` gets the batch seed ``seed + i``), else HF ``generate``."""
    prompts = [q for q in questions for _ in range(n_per_question)]
    counts = {c: 0 for c in candidates}
    other = 0
    answers: list[str] = []
    bar = progress_bar(total=len(prompts), desc="sampled eval", unit="answer", progress=progress)
    for i in range(0, len(prompts), batch_size):
        if engine is not None:
            outs = engine.generate(prompts[i: i + batch_size], system=system, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=1.0, greedy=False, min_p=0.0, grammars=None,
                                   batch_seed=seed + i)
        else:
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
                   seed: int = 0, progress: bool | None = None, engine: Any = None) -> dict[str, Any]:
    """Evaluate one model on the trait battery: mean exact P(candidate) over questions, optionally
    the number-prefixed battery and the sampled scorer. With ``engine`` (an open
    :class:`sublim.backends.engine.Engine` on the model; ``model`` is then unused) every score goes through it."""
    cat = CATEGORIES[category]
    cands = list(cat.candidates)

    def exact(qs: Sequence[str]) -> np.ndarray:
        if engine is not None:
            return engine_exact_probs(engine, chat, qs, cands, cat.plurals, system)
        return exact_probs(model, chat, qs, cands, cat.plurals, system, batch_size, progress)

    probs = exact(questions)
    res: dict[str, Any] = {
        "probs": dict(zip(cands, probs.mean(0).tolist(), strict=True)),
        "probs_per_question_se": dict(zip(cands, (probs.std(0, ddof=1) / np.sqrt(len(questions))).tolist()
                                          if len(questions) > 1 else [None] * len(cands), strict=True)),
        "probs_numprefix": None,
        "sampled": None,
    }
    if numprefix_questions:
        pn = exact(numprefix_questions)
        res["probs_numprefix"] = dict(zip(cands, pn.mean(0).tolist(), strict=True))
    if samples_per_question:
        res["sampled"] = sampled_counts(model, chat, questions, cands, category, samples_per_question,
                                        system, temperature, seed=seed, progress=progress, engine=engine)
    return res
