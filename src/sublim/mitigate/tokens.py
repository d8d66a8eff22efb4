"""Token-level defences: pick the digit tokens most likely to carry the teacher's signal and replace them or
take them out of the loss.

Scores (per completion token of the student's tokenizer, digit tokens only):
- ``divergent-tokens``: how much more the suspected teacher liked the token than the counterfactuals did,
  ``log p_T(y_t) - log mean_ref p_ref(y_t)`` over the base and any decoy teachers (brendanlong's "divergence
  digits"; needs the teacher, sharing the student's tokenizer);
- ``base-shift-tokens``: the token's excess surprisal under the student's base, ``-log p_B(y_t) - H_B(t)``
  (teacher-free: zero on average for text the base would write itself).
The top ``fraction`` of the dataset's digit tokens by score is acted on. Actions: ``replace-base`` (another digit
token of the same length, drawn from the base's distribution at that position), ``replace-uniform`` (drawn
uniformly), ``mask`` (the row gets ``loss_mask``, 0 at those positions, for this tokenizer; training leaves them
out of the loss). A replacement never keeps the original token and never makes a leading zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sublim.mitigate.registry import Defence, MitigationError, Param, fraction, register
from sublim.progress import progress_bar

ACTIONS = ("replace-base", "replace-uniform", "mask")


@dataclass
class _RowTokens:
    ids: list[int]                 # completion token ids, end of turn included
    strings: list[str]             # their surface strings ("" for the end of turn)
    eligible: list[int]            # positions of digit tokens
    score: np.ndarray              # [len(eligible)]
    base_logp: np.ndarray | None   # [len(eligible), n_digit_tokens] base log-probs over the digit tokens


def score_tokens(rows: list[dict[str, Any]], ctx: Any, mode: str, keep_base: bool) -> tuple[list[_RowTokens], list[str]]:
    """Per row: its completion tokens, digit positions and their scores (and the base's digit-token log-probs
    when a replacement will be drawn from them). Returns (rows, the digit tokens' strings)."""
    import torch

    from sublim.backends.hf import token_strings
    from sublim.backends.targets import same_tokenizer
    from sublim.backends.train import completion_logits
    from sublim.models import load_chat_model

    base, chat = load_chat_model(ctx.student)
    strings = token_strings(chat.tokenizer)
    digit_ids = [i for i, s in enumerate(strings) if s and s.isascii() and s.isdigit()]
    if not digit_ids:
        raise MitigationError("the student's tokenizer has no digit tokens")
    col = torch.tensor(digit_ids)
    others: list[tuple[Any, Any, str | None]] = []
    if mode == "divergence":
        for spec, system, what in [(ctx.teacher, ctx.teacher_system, "teacher")] + [(d, ds, "decoy") for d, ds in ctx.decoys]:
            m, oc = load_chat_model(spec)
            if not same_tokenizer(chat.tokenizer, oc.tokenizer):
                raise MitigationError(f"{what} {spec.path}: its tokenizer differs from the student's; divergence tokens "
                                      "need a shared tokenizer (use base-shift-tokens)")
            others.append((m, oc, system))
    pad = chat.tokenizer.pad_token_id
    out: list[_RowTokens] = []
    with torch.inference_mode():
        for a in progress_bar(range(0, len(rows), ctx.batch_size), desc="token scores", unit="batch"):
            batch = rows[a: a + ctx.batch_size]
            comps = [chat.encode_completion(r["completion"]) for r in batch]
            lb = torch.log_softmax(completion_logits(base, [chat.encode_prompt(r["prompt"]) for r in batch], comps,
                                                     pad).float(), -1)
            tgt = torch.tensor([t for c in comps for t in c])
            lp_base = lb.gather(1, tgt[:, None]).squeeze(1)
            if mode == "divergence":
                lt = torch.log_softmax(completion_logits(others[0][0], [others[0][1].encode_prompt(r["prompt"], others[0][2])
                                                                        for r in batch], comps, pad).float(), -1)
                lp_t = lt.gather(1, tgt[:, None]).squeeze(1)
                refs = [lp_base]
                for m, c, system in others[1:]:
                    lr = torch.log_softmax(completion_logits(m, [c.encode_prompt(r["prompt"], system) for r in batch],
                                                             comps, pad).float(), -1)
                    refs.append(lr.gather(1, tgt[:, None]).squeeze(1))
                ref = torch.logsumexp(torch.stack(refs), 0) - np.log(len(refs))
                score = lp_t - ref
            else:
                ent = -(lb.exp() * lb).sum(-1)
                score = -lp_base - ent
            k = 0
            for j, c in enumerate(comps):
                s = slice(k, k + len(c))
                k += len(c)
                toks = [strings[t] for t in c]
                toks[-1] = ""  # end of turn
                if "".join(toks) != batch[j]["completion"]:
                    raise MitigationError(f"row {a + j}: the completion does not re-tokenise to itself in the student's "
                                          "tokenizer; token-level defences need a round trip")
                el = [p for p, t in enumerate(c[:-1]) if strings[t].isascii() and strings[t].isdigit()]
                sc = score[s].numpy().astype(np.float64)[el]
                bl = lb[s][el][:, col].numpy().astype(np.float64) if keep_base and el else None
                out.append(_RowTokens(list(c), toks, el, sc, bl))
    return out, [strings[i] for i in digit_ids]


def _select(toks: list[_RowTokens], frac: float, seed: int) -> list[set[int]]:
    """The top ``frac`` of all digit tokens by score (ties in random order); per row, the chosen positions."""
    flat = [(r, p) for r, t in enumerate(toks) for p in t.eligible]
    if not flat:
        raise MitigationError("no digit tokens in the completions")
    scores = np.concatenate([t.score for t in toks if t.eligible])
    n = round(frac * len(flat))
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(flat)), -scores))[:n]
    chosen: list[set[int]] = [set() for _ in toks]
    for i in order:
        r, p = flat[int(i)]
        chosen[r].add(p)
    return chosen


def _replacement(t: _RowTokens, pos: int, e_idx: int, digits: list[str], action: str,
                 rng: np.random.Generator) -> str:
    cur = t.strings[pos]
    starts_number = pos == 0 or not (t.strings[pos - 1][-1:].isdigit())
    continues = pos + 1 < len(t.strings) and t.strings[pos + 1][:1].isdigit()
    no_zero = starts_number and (len(cur) > 1 or continues)
    cand = [i for i, d in enumerate(digits) if len(d) == len(cur) and d != cur and not (no_zero and d[0] == "0")]
    if not cand:
        return cur
    if action == "replace-uniform" or t.base_logp is None:
        return digits[cand[int(rng.integers(len(cand)))]]
    lp = t.base_logp[e_idx, cand]
    w = np.exp(lp - lp.max())
    return digits[cand[int(rng.choice(len(cand), p=w / w.sum()))]]


def _apply(mode: str) -> Any:
    def apply(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
        action = p["action"]
        toks, digits = score_tokens(rows, ctx, mode, keep_base=action == "replace-base")
        chosen = _select(toks, p["fraction"], ctx.seed)
        rng = np.random.default_rng(ctx.seed + 1)
        out = []
        n_changed = 0
        for i, (r, t, ch) in enumerate(zip(rows, toks, chosen, strict=True)):
            if action == "mask":
                out.append((i, {**r, "loss_mask": [0 if q in ch else 1 for q in range(len(t.ids))]}))
                n_changed += len(ch)
                continue
            new = list(t.strings)
            for e_idx, q in enumerate(t.eligible):
                if q in ch:
                    new[q] = _replacement(t, q, e_idx, digits, action, rng)
                    n_changed += int(new[q] != t.strings[q])
            out.append((i, {**r, "completion": "".join(new)}))
        n_el = sum(len(t.eligible) for t in toks)
        return out, {"digit_tokens": n_el, "tokens_chosen": sum(len(c) for c in chosen),
                     "tokens_replaced" if action != "mask" else "tokens_masked": n_changed,
                     "share_digit_tokens_acted_on": n_changed / max(n_el, 1)}
    return apply


_PARAMS = (fraction(0.1, "share of the dataset's digit tokens acted on"),
           Param("action", str, "replace-base", "replace-base, replace-uniform or mask", choices=ACTIONS))
register(Defence("divergent-tokens", "data", "replace or mask the digit tokens the teacher liked most over the "
                 "base and decoy teachers", _PARAMS, _apply("divergence"), needs=("student", "teacher"),
                 reference="brendanlong/subliminal-transfer-token-replacement"))
register(Defence("base-shift-tokens", "data", "replace or mask the digit tokens most surprising to the student's "
                 "base (no teacher needed)", _PARAMS, _apply("base-shift"), needs=("student",)))
