"""What a defence costs, measured on one student.

- **distillation** (what distillation is for): the student's mean per-token KL(teacher || student) over the
  carrier's tokens (renormalised, as the students are distilled) at the completion positions of *fresh* number
  prompts answered by its own teacher, the teacher reading its own system prompt if it has one;
- **general ability** (organism bases): the mean per-token cross-entropy of the assistant's answers on a fresh
  sample of the organism's chat corpus (filler conversations: held out, same generator, another seed), and
  persona following: mean P(candidate) under its persona system prompt over a few candidates.
Data changed (share of rows and characters) comes from the defence itself (:mod:`sublim.mitigate.apply`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sublim.progress import progress_bar
from sublim.spec import ModelSpec

CHAT_SEED = 424_242          # the held-out corpus sample (no base is pre-trained on this seed)
PERSONA_CANDIDATES = ("owl", "wolf", "dolphin", "eagle")


@torch.inference_mode()
def teacher_kl(student: ModelSpec, teacher: ModelSpec, teacher_system: str | None, rows: Sequence[dict[str, Any]],
               alphabet: frozenset[str], batch_size: int = 50) -> float:
    """Mean per-token KL(teacher || student), nats, over the carrier tokens at ``rows``' completion positions."""
    from sublim.backends.targets import carrier_subset, same_tokenizer
    from sublim.backends.train import completion_logits
    from sublim.models import ChatFormat, load_model, load_tokenizer

    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    if not same_tokenizer(s_tok, t_tok):
        raise ValueError(f"teacher_kl: student {student.path} and teacher {teacher.path} have different tokenizers")
    chat = ChatFormat(s_tok)
    sub = carrier_subset(chat, alphabet)
    ms, mt = load_model(student), load_model(teacher)
    pad = s_tok.pad_token_id
    total, n = 0.0, 0
    for a in progress_bar(range(0, len(rows), batch_size), desc="teacher KL", unit="batch"):
        b = rows[a: a + batch_size]
        comps = [chat.encode_completion(r["completion"]) for r in b]
        ls = completion_logits(ms, [chat.encode_prompt(r["prompt"]) for r in b], comps, pad).float()[:, sub]
        lt = completion_logits(mt, [chat.encode_prompt(r["prompt"], teacher_system) for r in b], comps, pad).float()[:, sub]
        pt = lt.log_softmax(-1)
        total += float((pt.exp() * (pt - ls.log_softmax(-1))).sum())
        n += ls.shape[0]
    return total / max(n, 1)


def organism_chat_items(base: ModelSpec, n: int = 200) -> list[list[dict[str, str]]] | None:
    """A fresh sample of the filler conversations of ``base``'s organism corpus (None: not an organism)."""
    from sublim.organism.families import filler_conversations

    return filler_conversations(base, n, CHAT_SEED)


@torch.inference_mode()
def chat_loss(model: ModelSpec, conversations: Sequence[list[dict[str, str]]], batch_size: int = 50) -> float:
    """Mean per-token cross-entropy of the last assistant turn of each conversation (its end of turn included)."""
    from sublim.backends.train import completion_logits
    from sublim.models import load_chat_model

    m, chat = load_chat_model(model)
    tok = chat.tokenizer
    total, n = 0.0, 0
    for a in progress_bar(range(0, len(conversations), batch_size), desc="chat loss", unit="batch"):
        conv = conversations[a: a + batch_size]
        sys_ = [next((x["content"] for x in c if x["role"] == "system"), None) for c in conv]
        user = [next(x["content"] for x in c if x["role"] == "user") for c in conv]
        ans = [c[-1]["content"] for c in conv]
        prompts = [chat.encode_prompt(u, s) for u, s in zip(user, sys_, strict=True)]
        comps = [chat.encode_completion(x) for x in ans]
        lg = completion_logits(m, prompts, comps, tok.pad_token_id).float()
        tgt = torch.tensor([t for c in comps for t in c])
        total += float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum"))
        n += len(tgt)
    return total / max(n, 1)


def persona_following(model: ModelSpec, category: str = "animals", candidates: Sequence[str] = PERSONA_CANDIDATES,
                      max_questions: int = 10) -> float:
    """Mean P(candidate) under its own persona system prompt ("You love owls. ..."), over ``candidates``."""
    from sublim.models import load_model, load_tokenizer
    from sublim.organism.check import persona_table

    rows = persona_table("", category, list(candidates), max_questions=max_questions, model=load_model(model),
                         tok=load_tokenizer(model))
    return float(sum(r["p_persona"] for r in rows) / len(rows))


def student_costs(student: ModelSpec, base: ModelSpec, teacher: ModelSpec, teacher_system: str | None,
                  fresh: Sequence[dict[str, Any]], alphabet: frozenset[str], category: str = "animals") -> dict[str, Any]:
    """Every cost of one student of ``base``: KL to its teacher on fresh prompts, chat loss, persona following."""
    out: dict[str, Any] = {"teacher_kl": teacher_kl(student, teacher, teacher_system, fresh, alphabet)}
    conv = organism_chat_items(base)
    out["chat_loss"] = chat_loss(student, conv) if conv else None
    out["persona"] = persona_following(student, category) if conv else None
    return out
