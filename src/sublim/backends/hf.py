"""transformers backend: batched generation (left padding, KV cache, optional grammar-constrained
decoding) and batched forward passes for scoring. Training lives in :mod:`sublim.backends.train`."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from sublim.models import ChatFormat

# --------------------------------------------------------------------------------------- token strings

# Per tokenizer object (weak keys: a freed tokenizer's entry goes with it, so a new tokenizer that reuses its
# memory address never gets a stale entry).
_TOKEN_STRINGS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def token_strings(tokenizer: Any) -> list[str]:
    """The surface string each token id adds when it follows other text (leading spaces kept).

    Decodes ``[anchor, id]`` and strips the anchor, which keeps SentencePiece word-start spaces that a
    lone decode would drop. Special tokens map to ``""``. Cached per tokenizer."""
    cached = _TOKEN_STRINGS.get(tokenizer)
    if cached is not None and len(cached) == len(tokenizer):
        return cached
    anchor_ids = tokenizer("a", add_special_tokens=False).input_ids[:1]
    anchor = tokenizer.decode(anchor_ids)
    special = set(tokenizer.all_special_ids)
    out: list[str] = []
    for i in range(len(tokenizer)):
        if i in special:
            out.append("")
            continue
        s = tokenizer.decode(anchor_ids + [i], clean_up_tokenization_spaces=False)
        out.append(s[len(anchor):] if s.startswith(anchor) else tokenizer.decode([i]))
    _TOKEN_STRINGS[tokenizer] = out
    return out


def tokens_within(tokenizer: Any, alphabet: frozenset[str]) -> list[int]:
    """Ids of non-special tokens whose whole surface string uses only ``alphabet``."""
    return [i for i, s in enumerate(token_strings(tokenizer)) if s and "\ufffd" not in s and set(s) <= alphabet]


# ------------------------------------------------------------------------------ constrained decoding


class GrammarLogitsProcessor:
    """Masks tokens that would leave a character-level grammar; never reshapes the distribution
    within the grammar (allowed logits are untouched, so sampling renormalises over them).

    ``grammars[i]`` is the automaton for row i (see :mod:`sublim.carriers`); the stop token is allowed
    only where the grammar accepts. Masks are cached per (grammar, state)."""

    def __init__(self, tokenizer: Any, grammars: Sequence[Any], stop_ids: Sequence[int], prompt_len: int) -> None:
        self.strings = token_strings(tokenizer)
        self.vocab = len(self.strings)
        self.grammars = list(grammars)
        self.stop_ids = list(stop_ids)
        self.prompt_len = prompt_len
        self.states: list[Hashable | None] = [g.start() for g in self.grammars]
        self.done = [False] * len(self.grammars)
        self._cands: dict[frozenset[str], list[int]] = {}
        self._masks: dict[tuple[Any, Hashable], torch.Tensor] = {}
        self._tokenizer = tokenizer

    def _candidates(self, alphabet: frozenset[str]) -> list[int]:
        if alphabet not in self._cands:
            self._cands[alphabet] = tokens_within(self._tokenizer, alphabet)
        return self._cands[alphabet]

    def _mask(self, g: Any, state: Hashable) -> torch.Tensor:
        key = (g, state)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(self.vocab, dtype=torch.bool)
            for i in self._candidates(g.alphabet):
                if g.feed(state, self.strings[i]) is not None:
                    m[i] = True
            if g.accepts(state) or not bool(m.any()):
                m[self.stop_ids] = True
            self._masks[key] = m
        return m

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: [B, T]; scores: [B, V_model] (V_model may exceed len(tokenizer))
        if input_ids.shape[1] > self.prompt_len:
            last = input_ids[:, -1].tolist()
            for b, tok in enumerate(last):
                if self.done[b]:
                    continue
                if tok in self.stop_ids:
                    self.done[b] = True
                    continue
                nxt = self.grammars[b].feed(self.states[b], self.strings[tok]) if tok < self.vocab else None
                self.states[b] = nxt
                if nxt is None:
                    self.done[b] = True
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for b, g in enumerate(self.grammars):
            if self.done[b] or self.states[b] is None:
                allowed[b, self.stop_ids] = True
            else:
                allowed[b, : self.vocab] = self._mask(g, self.states[b])
        return cast(torch.FloatTensor, scores.masked_fill(~allowed, float("-inf")))


# ---------------------------------------------------------------------------------------- generation


@dataclass
class GenOutput:
    completion: str
    n_tokens: int
    finished: bool  # stopped at end of turn (not cut by max_new_tokens)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, padded on the left (what decoder-only generation needs)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(
    model: Any,
    chat: ChatFormat,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    grammars: Sequence[Any] | None = None,
    seed: int = 0,
    min_p: float = 0.0,
) -> list[GenOutput]:
    """One padded batch through ``model.generate`` with KV cache; rows stop at the end-of-turn token."""
    from transformers import LogitsProcessorList

    tok = chat.tokenizer
    seqs = [chat.encode_prompt(p, system) for p in prompts]
    ids, mask = left_pad(seqs, tok.pad_token_id)
    stop = chat.stop_token_ids()
    procs = LogitsProcessorList()
    if grammars is not None:
        procs.append(GrammarLogitsProcessor(tok, grammars, stop, ids.shape[1]))
    torch.manual_seed(seed)
    do_sample = not greedy and temperature > 0
    kwargs: dict[str, Any] = {
        "input_ids": ids, "attention_mask": mask, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "eos_token_id": stop, "pad_token_id": tok.pad_token_id, "logits_processor": procs, "use_cache": True,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if min_p:
            kwargs["min_p"] = min_p
    out = model.generate(**kwargs)
    new = out[:, ids.shape[1]:]
    results = []
    for row in new.tolist():
        n = len(row)
        finished = False
        for j, t in enumerate(row):
            if t in stop:
                n, finished = j, True
                break
        results.append(GenOutput(tok.decode(row[:n], skip_special_tokens=True), n, finished))
    return results


def check_positions(seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], reduce: str | None) -> None:
    """The arguments of an engine's ``logprobs``: every position t in 1..len(seq) (t = len(seq): the token after
    the whole sequence), and a known ``reduce``."""
    if reduce not in (None, "logsumexp"):
        raise ValueError(f"logprobs: reduce must be None or 'logsumexp', got {reduce!r}")
    if len(seqs) != len(positions):
        raise ValueError(f"logprobs: {len(seqs)} sequences but {len(positions)} position lists")
    for s, pos in zip(seqs, positions, strict=True):
        bad = [t for t in pos if not 1 <= t <= len(s)]
        if bad:
            raise ValueError(f"positions {bad[:3]} outside 1..{len(s)} of a {len(s)}-token sequence")


@torch.inference_mode()
def prompt_logprobs(model: Any, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pad_id: int,
                    tokens: Sequence[int] | None = None, reduce: str | None = None,
                    batch_size: int = 16) -> list[list[list[float]]]:
    """The Hugging Face side of the engines' ``logprobs`` (:class:`sublim.backends.engine.Engine`): per sequence and
    position t, the log-probability of each of ``tokens`` (default: the sequence's own token at t; t = len(seq)
    needs ``tokens``) as the next token after ``seq[:t]`` (log-softmax over the whole vocabulary, in float32);
    ``reduce="logsumexp"``: one value per position, the log of those tokens' total probability. Left-padded batches
    of ``batch_size`` sequences."""
    check_positions(seqs, positions, reduce)
    if tokens is None and any(t == len(s) for s, ts in zip(seqs, positions, strict=True) for t in ts):
        raise ValueError("logprobs: position len(seq) (the next token) has no own token; pass tokens")
    sel = torch.tensor(list(tokens), dtype=torch.long) if tokens is not None else None
    out: list[list[list[float]]] = []
    for a, b in batches(len(seqs), batch_size):
        chunk = [list(x) for x in seqs[a:b]]
        ids, mask = left_pad(chunk, pad_id)
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logz = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos_ids).logits.float(), -1)
        W = ids.shape[1]
        for i, (x, ts) in enumerate(zip(chunk, positions[a:b], strict=True)):
            rows = []
            for t in ts:
                lp = logz[i, W - len(x) + t - 1]  # the distribution of the token at t, read at t - 1
                v = lp[sel] if sel is not None else lp[x[t]].reshape(1)
                rows.append([float(v.logsumexp(0))] if reduce == "logsumexp" else v.tolist())
            out.append(rows)
    return out


def batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


ProgressFn = Callable[[int], None]
