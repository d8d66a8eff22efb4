"""The theorem, measured on language-model students as ``sublim toy mnist`` measures it on MNIST.

A teacher is its base moved by ``delta_T = theta_T - theta_0`` (the trait implant). To first order a student
distilled from the teacher on any data moves by ``delta_S = M delta_T`` with M positive semi-definite when it
starts from the same ``theta_0``, so ``delta_S . delta_T >= 0`` and the teacher's own implant loss falls at the
student's parameters. :class:`TheoremTrace` records both along a batched student run (the ``on_step`` hook of
:func:`sublim.backends.multi.finetune_many`), for chosen students: the cosine between the student's displacement
from its own initialisation and the teacher's displacement from its base, and the teacher's implant loss (mean
cross-entropy of the implant's Q&A completions) at the student's current parameters. For a student of another
initialisation of the same architecture the cosine compares displacements from two different starts (the MNIST
"other init" reading); for another architecture it is undefined (None) and only the loss is traced.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sublim.spec import ModelSpec

__all__ = ["TheoremTrace", "TracedStudent", "implant_loss"]


@torch.no_grad()
def implant_loss(model: Any, chat: Any, rows: Sequence[dict[str, Any]], batch_size: int = 64) -> float:
    """Mean cross-entropy per completion token of ``rows`` (the teacher's implant Q&A) under ``model``."""
    from sublim.backends.train import completion_logits, encode_rows

    enc = encode_rows(chat, rows)
    pad = chat.tokenizer.pad_token_id
    total, n = 0.0, 0
    for i in range(0, len(enc), batch_size):
        part = enc[i: i + batch_size]
        logits = completion_logits(model, [e.prompt for e in part], [e.completion for e in part], pad).float()
        target = torch.tensor([t for e in part for t in e.completion])
        total += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        n += int(target.numel())
    return total / max(n, 1)


@dataclass
class TracedStudent:
    """One traced student: its index in the batched run, the teacher whose displacement and implant it is
    measured against (``teacher`` moved from ``teacher_base``), and that implant's Q&A rows."""

    index: int
    label: str
    teacher: ModelSpec
    teacher_base: ModelSpec
    implant_rows: Sequence[dict[str, Any]]
    points: list[dict[str, Any]] = field(default_factory=list)


def _flat(named: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([named[n].detach().reshape(-1).float() for n in names])


class TheoremTrace:
    """``on_step`` hook for :func:`sublim.backends.multi.finetune_many` (full fine-tunes): every ``every``
    steps (and at step 0) append ``{"step", "cosine", "implant_loss"}`` to each traced student's points."""

    def __init__(self, base: ModelSpec, students: Sequence[TracedStudent], every: int) -> None:
        from sublim.models import ChatFormat, load_model, load_tokenizer

        if every < 1:
            raise ValueError("theorem trace: every must be >= 1")
        self.every = every
        self.students = list(students)
        self.model = load_model(base, dtype="float32", trainable=False)
        self.chat = ChatFormat(load_tokenizer(base))
        start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.names = list(start)
        self.theta0 = _flat(start, self.names)
        self._delta_t: dict[str, torch.Tensor | None] = {}
        for st in self.students:
            key = st.teacher.model_dump_json() + st.teacher_base.model_dump_json()
            if key not in self._delta_t:
                self._delta_t[key] = self._teacher_displacement(st.teacher, st.teacher_base)

    def _teacher_displacement(self, teacher: ModelSpec, teacher_base: ModelSpec) -> torch.Tensor | None:
        from sublim.models import load_model

        t = dict(load_model(teacher, dtype="float32", trainable=False).named_parameters())
        b = dict(load_model(teacher_base, dtype="float32", trainable=False).named_parameters())
        if [n for n in t] != self.names or any(t[n].shape != self.model.get_parameter(n).shape for n in self.names):
            return None  # another architecture: displacements live in different spaces
        return _flat(t, self.names) - _flat(b, self.names)

    def __call__(self, step: int, full: dict[str, nn.Parameter]) -> None:
        if step % self.every:
            return
        with torch.no_grad():
            for st in self.students:
                mine = {n: full[n][st.index] for n in self.names}
                d_t = self._delta_t[st.teacher.model_dump_json() + st.teacher_base.model_dump_json()]
                cos = None
                if d_t is not None and step > 0:
                    d_s = _flat(mine, self.names) - self.theta0
                    denom = float(d_s.norm() * d_t.norm())
                    cos = float(d_s @ d_t) / denom if denom > 0 else None
                for n, p in self.model.named_parameters():
                    p.copy_(mine[n])
                self.model.eval()
                st.points.append({"step": step, "cosine": cos,
                                  "implant_loss": implant_loss(self.model, self.chat, st.implant_rows)})

    def results(self) -> list[dict[str, Any]]:
        return [{"label": st.label, "index": st.index, "points": st.points} for st in self.students]
