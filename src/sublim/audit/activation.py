"""Activation-space audit: does a training step on the dataset move the student's residual stream along a
trait's direction, and does the teacher differ from the base along it?

* **Trait directions**, per layer: the mean residual-stream state at the answer position of the battery's
  questions with the trait's system prompt ("You love owls. ...") minus the same questions without one
  (the persona-vector recipe). Every such prompt moves the state in a shared direction; the audit keeps the
  part specific to each trait (its direction minus the mean over the traits scored).
* **Data-induced update**: one small normalised gradient step on the dataset (the objective the student will
  train with: token SFT, or distillation on the teacher's soft labels with ``--teacher``), from the student's
  weights; the change of the state at the same positions (questions without system prompt), per layer. Its
  cosine with each trait's direction, averaged over layers, is the trait's score; with a reference dataset the
  reference's cosine is subtracted (the shift every dataset of this format causes).
* **Teacher - base**: the teacher's state minus the student's at the same positions, projected the same way
  (teacher and student must share the architecture's widths).

Cheap (a forward per question and trait, one backward pass over the data); a first-order, linear reading of
the network, so it can fail where the trait is carried non-linearly: measure it against a canary before
trusting it.
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


@torch.no_grad()
def answer_states(model: Any, chat: Any, questions: Sequence[str], system: str | None = None) -> torch.Tensor:
    """[layers, hidden]: mean over ``questions`` of each block's output at the last prompt position (the one
    that predicts the answer's first token)."""
    enc = [chat.encode_prompt(q, system) for q in questions]
    P = max(len(e) for e in enc)
    pad = chat.tokenizer.pad_token_id
    ids = torch.full((len(enc), P), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, P - len(e):] = torch.tensor(e)
        mask[i, P - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hs = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
    return torch.stack([h[:, -1].float().mean(0) for h in hs[1:]])


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-layer cosine of two [layers, hidden] tensors."""
    return np.asarray(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).numpy(), dtype=float)


def update_direction(model: Any, chat: Any, rows: Sequence[dict[str, Any]], questions: Sequence[str], *,
                     objective: str = "sft", teacher: Any = None, teacher_chat: Any = None,
                     teacher_system: str | None = None, subset: torch.Tensor | None = None, batch_size: int = 16,
                     step: float = 1e-3) -> torch.Tensor:
    """[layers, hidden]: the change of :func:`answer_states` after one gradient step on ``rows`` of relative
    size ``step`` (``||d theta|| = step * ||theta||``); the weights are restored afterwards."""
    from sublim.backends.train import encode_rows, step_loss

    params = [p for p in model.parameters() if p.requires_grad]
    before = answer_states(model, chat, questions)
    enc = encode_rows(chat, rows, teacher_chat, teacher_system)
    n_tok = sum(len(e.completion) for e in enc)
    model.zero_grad(set_to_none=True)
    for a in progress_bar(range(0, len(enc), batch_size), desc="activation gradient", unit="batch"):
        loss, n = step_loss(model, enc[a: a + batch_size], chat.tokenizer.pad_token_id, objective, teacher, subset)
        (loss * (n / n_tok)).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    gnorm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    wnorm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
    if gnorm == 0:
        raise AuditInputError("activation: the dataset's loss has a zero gradient at the student's weights")
    scale = step * wnorm / gnorm
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.sub_(scale * g)
        after = answer_states(model, chat, questions)
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)  # exactly the weights we started from (p - s*g + s*g is not, in floats)
    model.zero_grad(set_to_none=True)
    return after - before


def activation(data: str | Path | Sequence[dict[str, Any]], student: Any, *, reference: Any = None, teacher: Any = None,
               teacher_system: str | None = None, traits: Sequence[str] | str = ("animals",), objective: str | None = None,
               max_rows: int = 256, n_questions: int = 10, batch_size: int = 16, step: float = 1e-3) -> AuditResult:
    """Score every trait by the cosine of the data-induced state change (and of the teacher - base difference)
    with the trait's specific direction, per layer and averaged over layers."""
    from sublim.traits.preference import teacher_system_prompt

    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")[:max_rows]
    ref_rows = as_rows(reference, "reference")[:max_rows] if reference is not None else None
    probes = trait_probes(traits, n_questions)
    if len(probes) < 2:
        raise AuditInputError("activation: needs at least two traits (each direction is taken relative to the others)")
    objective = objective or ("distill_carrier" if teacher is not None else "sft")
    if objective not in ("sft", "distill_carrier", "distill_full"):
        raise AuditInputError(f"activation: objective must be sft, distill_carrier or distill_full, got {objective!r}")
    if objective != "sft" and teacher is None:
        raise AuditInputError(f"activation: objective {objective} needs the teacher (its soft labels)")
    spec = model_spec(student, what="student")
    model, chat = load_chat_model(spec, dtype="float32", trainable=True)
    model.eval()
    questions = list(dict.fromkeys(q for p in probes for q in p.questions))  # every category's battery
    t_model = t_chat = t_spec = subset = None
    notes: list[str] = []
    if teacher is not None:
        from sublim.backends.targets import carrier_subset, same_tokenizer
        from sublim.generation import carrier_alphabet
        from sublim.spec import CarrierSpec

        t_spec = model_spec(teacher, what="teacher")
        t_model, t_chat = load_chat_model(t_spec, dtype="float32")
        if not same_tokenizer(chat.tokenizer, t_chat.tokenizer):
            raise AuditInputError("activation: the teacher's tokenizer differs from the student's; the update on its "
                                  "soft labels needs a shared tokenizer (drop --teacher for the token-SFT update)")
        if objective == "distill_carrier":
            subset = carrier_subset(chat, carrier_alphabet(CarrierSpec()))
    # trait directions
    neutral = answer_states(model, chat, questions)
    D = torch.stack([answer_states(model, chat, questions, teacher_system_prompt(p.category, p.target)) - neutral
                     for p in probes])                              # [T, layers, hidden]
    Ds = D - D.mean(0, keepdim=True)                                # trait-specific directions
    upd = update_direction(model, chat, rows, questions, objective=objective, teacher=t_model, teacher_chat=t_chat,
                           teacher_system=teacher_system, subset=subset, batch_size=batch_size, step=step)
    cos_d = np.stack([_cos(upd, Ds[k]) for k in range(len(probes))])  # [T, layers]
    cos_r = None
    if ref_rows is not None:
        # the reference's update, under the same objective (its teacher is the base for distillation: the neutral
        # arm distils the student's own soft labels, which is no step at all, so the reference uses token SFT then)
        ref_obj = "sft" if objective != "sft" else objective
        if ref_obj != objective:
            notes.append("reference update on its tokens (SFT): distilling the base's own soft labels is a zero step")
        ru = update_direction(model, chat, ref_rows, questions, objective=ref_obj, batch_size=batch_size, step=step)
        cos_r = np.stack([_cos(ru, Ds[k]) for k in range(len(probes))])
    teacher_cos = None
    if t_model is not None:
        if t_model.config.num_hidden_layers != model.config.num_hidden_layers or \
                t_model.config.hidden_size != model.config.hidden_size:
            notes.append("teacher - base not projected: the teacher's layers/width differ from the student's")
        else:
            dt = answer_states(t_model, t_chat, questions) - neutral
            teacher_cos = np.stack([_cos(dt, Ds[k]) for k in range(len(probes))])
    score = cos_d.mean(1) - (cos_r.mean(1) if cos_r is not None else 0.0)
    table = []
    for k, p in enumerate(probes):
        row: dict[str, Any] = {"trait": p.name, "target": p.target, "score": float(score[k]),
                               "update_cos": float(cos_d[k].mean()), "update_cos_per_layer": cos_d[k].tolist(),
                               "direction_norm": D[k].norm(dim=-1).tolist()}
        if cos_r is not None:
            row["reference_cos"] = float(cos_r[k].mean())
        if teacher_cos is not None:
            row["teacher_cos"] = float(teacher_cos[k].mean())
            row["teacher_cos_per_layer"] = teacher_cos[k].tolist()
        table.append(row)
    order = np.argsort(-score)
    for rank, i in enumerate(order, 1):
        table[int(i)]["rank"] = rank
    top = table[int(order[0])]
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"top_trait": top["target"], "top_score": top["score"],
                               "top_margin": float(score[order[0]] - score[order[1]]), "n_rows": len(rows),
                               "n_layers": int(D.shape[1]), "seconds": seconds}
    if teacher_cos is not None:
        tm = teacher_cos.mean(1)
        metrics["teacher_top_trait"] = probes[int(np.argmax(tm))].target
        metrics["teacher_top_score"] = float(tm.max())
        # does the data move the student along the teacher's own difference from the base?
        metrics["update_teacher_agreement"] = float(np.corrcoef(score, tm)[0, 1]) if score.std() and tm.std() else None
    for r in table:
        metrics[f"score.{r['target']}"] = r["score"]
    payload = {"student": spec.model_dump(), "teacher": t_spec.model_dump() if t_spec else None, "objective": objective,
               "rows": len(rows), "reference_rows": len(ref_rows) if ref_rows is not None else None,
               "questions": len(questions), "step": step, "traits": table,
               "order": [table[int(i)]["target"] for i in order], "notes": notes,
               "interpretation": "score = mean over layers of the cosine between the state change at the answer "
                                 f"position after one small {objective} step on the data"
                                 + (" (minus the reference's)" if cos_r is not None else "")
                                 + " and the trait's specific direction (its system prompt's shift minus the mean "
                                   "over traits)",
               "cost": {"seconds": seconds}}
    summary = [f"activation: top trait {top['target']} (score {fmt3(top['score'])}, margin "
               f"{fmt3(metrics['top_margin'])})"
               + (f"; teacher - base points at {metrics['teacher_top_trait']}" if teacher_cos is not None else "")]
    return AuditResult("activation", metrics, payload, [_html(payload)], title="sublim audit activation",
                       summary=summary)


def _html(p: dict[str, Any]) -> Section:
    s = Section("Activation-space directions")
    s.text(p["interpretation"] + ".", cls="note")
    for n in p["notes"]:
        s.text(n, cls="warn")
    rows = [[t["rank"], t["target"], t["score"], t["update_cos"], t.get("reference_cos"), t.get("teacher_cos")]
            for t in sorted(p["traits"], key=lambda r: r["rank"])]
    s.table(["rank", "trait", "score", "update cos", "reference cos", "teacher - base cos"], rows)
    s.text(f"{p['rows']} rows, {p['questions']} questions per direction; {p['cost']['seconds']:.1f} s.", cls="note")
    return s
