"""KL-to-base regularisation: a student-side defence that anchors the student to its base on neutral text.

The student's loss gains ``kl_base x KL(base || student)``, the mean per-token KL over the full vocabulary at the
completion positions of neutral rows (``TrainSpec.kl_base_data``, or for an organism base its filler chat
conversations, drawn with a seed no cost measurement uses). The base's log-probabilities are computed once; each
step every student sees ``kl_base_batch`` neutral rows in its own seeded order. Works for one student
(:func:`sublim.backends.train.finetune`) and for batched students (rows grouped by student, equal counts).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sublim.models import ChatFormat, load_model
from sublim.spec import ModelSpec, TrainSpec

ANCHOR_SEED = 626262  # the organism's filler conversations for the anchor (the chat-loss cost uses another seed)


def neutral_rows(base: ModelSpec, spec: TrainSpec) -> list[dict[str, Any]]:
    """The anchor's rows: ``kl_base_data`` (JSONL of prompt/completion) or the organism's filler conversations."""
    if spec.kl_base_data is not None:
        from pathlib import Path

        from sublim.audit.common import load_rows

        return load_rows(Path(spec.kl_base_data), what="kl_base_data")[: spec.kl_base_rows]
    from sublim.organism.families import filler_conversations

    convs = filler_conversations(base, spec.kl_base_rows, ANCHOR_SEED)
    if convs is None:
        raise ValueError(f"kl_base: {base.path} is not an organism; give student.kl_base_data (a JSONL of neutral "
                         "prompt/completion rows)")
    out = []
    for msgs in convs:
        user = [m["content"] for m in msgs if m["role"] == "user"]
        reply = [m["content"] for m in msgs if m["role"] == "assistant"]
        if user and reply:
            out.append({"prompt": user[-1], "completion": reply[-1]})
    return out[: spec.kl_base_rows]


class BaseAnchor:
    """The base's next-token log-probs on the neutral rows, and each student's KL to them."""

    def __init__(self, base: ModelSpec, chat: ChatFormat, spec: TrainSpec, seeds: Sequence[int]) -> None:
        from sublim.backends.train import completion_logits, encode_rows

        rows = neutral_rows(base, spec)
        if not rows:
            raise ValueError("kl_base: no neutral rows")
        self.weight = spec.kl_base
        self.batch = spec.kl_base_batch
        self.pad = chat.tokenizer.pad_token_id
        self.enc = encode_rows(chat, rows)
        model = load_model(base, dtype="float32")
        with torch.no_grad():
            self.targets = [completion_logits(model, [e.prompt], [e.completion], self.pad).float().log_softmax(-1)
                            for e in self.enc]
        del model
        self.gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
        self.orders: list[list[int]] = [[] for _ in seeds]

    def _next(self, s: int) -> list[int]:
        if len(self.orders[s]) < self.batch:
            self.orders[s] += torch.randperm(len(self.enc), generator=self.gens[s]).tolist()
        idx, self.orders[s] = self.orders[s][: self.batch], self.orders[s][self.batch:]
        return idx

    def losses(self, model: Any) -> list[torch.Tensor]:
        """One forward of every student's next neutral rows (grouped by student); ``kl_base`` x each student's
        mean per-token KL(base || student)."""
        from sublim.backends.train import completion_logits

        S = len(self.gens)
        picks = [self._next(s) for s in range(S)]
        enc = [self.enc[i] for p in picks for i in p]
        logits = completion_logits(model, [e.prompt for e in enc], [e.completion for e in enc], self.pad).float()
        out, start = [], 0
        for p in picks:
            t = torch.cat([self.targets[i] for i in p])
            sl = logits[start: start + t.shape[0]]
            start += t.shape[0]
            out.append(self.weight * (t.exp() * (t - F.log_softmax(sl, -1))).sum(-1).mean())
        return out
