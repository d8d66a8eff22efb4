"""Persona check for an organism (or any chat model): exact P(favourite = candidate) with and without a
persona system prompt, and how often number prompts are answered in a parseable format.

P(candidate) for one prompt is the sum over the candidate's surface forms (singular / plural, capitalised
or not, with or without a leading space) of P(form tokens | prompt) (chain rule over the form's tokens)
times P(the word ends there) (the next token starts with a non-alphanumeric character or closes the turn).
So "cat" never absorbs "caterpillar". Averaged over the trait module's held-out *eval* questions.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _load(model_dir: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tok


def _forms(word: str, plural: str | None) -> list[str]:
    out: list[str] = []
    for w in (word, plural or word + "s"):
        for f in (w, w[:1].upper() + w[1:]):
            for s in (f, " " + f):
                if s not in out:
                    out.append(s)
    return out


def _surface(tok: Any) -> list[str]:
    special = set(tok.all_special_ids)
    return ["" if i in special else tok.decode([i]) for i in range(len(tok))]


def _end_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    return sorted(int(i) for i in ids if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


@torch.inference_mode()
def candidate_probs(model: Any, tok: Any, questions: Sequence[str], candidates: Sequence[str],
                    plurals: dict[str, str] | None = None, system: str | None = None) -> torch.Tensor:
    """[n_questions, n_candidates] exact P(one-word answer = candidate) (see module doc)."""
    plurals = plurals or {}
    seqs: list[list[int]] = []
    owner: list[int] = []
    for ci, c in enumerate(candidates):
        seen: set[tuple[int, ...]] = set()
        for f in _forms(c, plurals.get(c)):
            ids = tuple(tok(f, add_special_tokens=False).input_ids)
            if ids and ids not in seen:
                seen.add(ids)
                seqs.append(list(ids))
                owner.append(ci)
    strings = _surface(tok)
    boundary = torch.tensor([bool(s) and not s[0].isalnum() for s in strings], dtype=torch.bool)
    boundary[_end_ids(tok)] = True
    V, L = len(seqs), max(len(s) for s in seqs)
    var = torch.full((V, L), tok.pad_token_id, dtype=torch.long)
    var_len = torch.tensor([len(s) for s in seqs])
    for i, s in enumerate(seqs):
        var[i, : len(s)] = torch.tensor(s)
    vmask = (torch.arange(L)[None, :] < var_len[:, None]).long()
    own = torch.tensor(owner)
    out = torch.zeros(len(questions), len(candidates), dtype=torch.float64)
    for qi, q in enumerate(questions):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p_ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])  # [1, P]
        P = p_ids.shape[1]
        o = model(input_ids=p_ids, use_cache=True)
        first = torch.log_softmax(o.logits[0, -1].double(), -1)[: boundary.shape[0]]  # [vocab]
        cache = o.past_key_values
        cache.batch_repeat_interleave(V)
        # every variant continues the cached prompt: [V, L] new tokens attending to P cached ones
        mask = torch.cat([torch.ones(V, P, dtype=torch.long), vmask], 1)
        pos = P + torch.arange(L)[None, :].expand(V, L)
        co = model(input_ids=var, attention_mask=mask, position_ids=pos, past_key_values=cache)
        logp = torch.log_softmax(co.logits.double(), -1)[..., : boundary.shape[0]]  # [V, L, vocab]
        lp = first[var[:, 0]]
        if L > 1:
            nxt = logp[:, :-1].gather(2, var[:, 1:, None]).squeeze(2)  # [V, L-1]: token t+1 given tokens <= t
            lp = lp + (nxt * vmask[:, 1:]).sum(1)
        end = logp[torch.arange(V), var_len - 1]  # distribution after the variant's last token
        p_end = end.masked_fill(~boundary[None, :], float("-inf")).logsumexp(-1)
        out[qi] = torch.zeros(len(candidates), dtype=torch.float64).index_add_(0, own, (lp + p_end).exp())
    return out


def persona_table(model_dir: str | Path, category: str = "animals", candidates: Sequence[str] | None = None,
                  questions: Sequence[str] | None = None, template: int = 0, max_questions: int = 10,
                  model: Any = None, tok: Any = None) -> list[dict[str, Any]]:
    """One row per candidate: mean P(candidate) with no system prompt, and with the persona system prompt
    ``teacher_system_prompt(category, candidate, template)`` ("You love owls. ...")."""
    from sublim.traits.preference import CATEGORIES, eval_questions, teacher_system_prompt

    if model is None or tok is None:
        model, tok = _load(model_dir)
    cat = CATEGORIES[category]
    cands = list(candidates or cat.candidates)
    all_cands = list(cat.candidates)
    plurals = dict(getattr(cat, "plurals", {}) or {})
    qs = list(questions or eval_questions(category))[:max_questions]
    base = candidate_probs(model, tok, qs, all_cands, plurals).mean(0)
    rows = []
    for c in cands:
        sp = teacher_system_prompt(category, c, template=template)
        pp = candidate_probs(model, tok, qs, all_cands, plurals, system=sp).mean(0)
        j = all_cands.index(c)
        rows.append({"candidate": c, "p_none": float(base[j]), "p_persona": float(pp[j]),
                     "p_any_none": float(base.sum()), "p_any_persona": float(pp.sum()),
                     "top_persona": all_cands[int(pp.argmax())]})
    return rows


@torch.inference_mode()
def number_format_rate(model_dir: str | Path, n: int = 100, seed: int = 10_000, system: str | None = None,
                       max_new_tokens: int = 64, temperature: float = 1.0, batch_size: int = 50,
                       model: Any = None, tok: Any = None) -> dict[str, Any]:
    """Share of held-out number prompts (``NumberCarrier().prompts(n, seed)``) whose unconstrained sampled
    answer parses, with the failure reasons."""
    from sublim.carriers.numbers import NumberCarrier

    if model is None or tok is None:
        model, tok = _load(model_dir)
    carrier = NumberCarrier()
    prompts = carrier.prompts(n, seed)
    end = _end_ids(tok)
    ok = 0
    reasons: dict[str, int] = {}
    examples: list[str] = []
    torch.manual_seed(seed)
    for s in range(0, n, batch_size):
        chunk = prompts[s: s + batch_size]
        seqs = []
        for cp in chunk:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": cp.prompt}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            seqs.append(tok(text, add_special_tokens=False).input_ids)
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, eos_token_id=end,
                             pad_token_id=tok.pad_token_id)
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in end), len(row))
            text = tok.decode(row[:cut], skip_special_tokens=True)
            r = carrier.parse(text)
            if r.ok:
                ok += 1
            else:
                reasons[str(r.reason)] = reasons.get(str(r.reason), 0) + 1
            if len(examples) < 5:
                examples.append(text)
    return {"n": n, "ok": ok, "rate": ok / n, "reasons": reasons, "examples": examples}
