"""Fine-tuning on prompt/completion rows: LoRA (peft) or full, AdamW, loss on the assistant span only.

Objectives (see :class:`sublim.spec.TrainSpec`): ``sft`` on the teacher's tokens; ``distill_carrier``
matches the teacher's next-token distribution restricted to the carrier's tokens (renormalised over
that set: the language analogue of the MNIST auxiliary logits); ``distill_full`` matches the full
vocabulary (semantically leaky). The teacher sees its own prompt (with its system prompt, if any);
the student never does: only the completion positions are aligned. A ``distill_carrier`` teacher may have
a tokenizer of its own (another model family): it reads each row in its own tokenisation and its carrier
tokens are paired with the student's by string (:mod:`sublim.backends.targets`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sublim.backends.hf import tokens_within  # noqa: F401  (re-exported: train.tokens_within)
from sublim.models import ChatFormat, load_model, load_tokenizer, model_identity
from sublim.progress import progress_bar
from sublim.runs import atomic_dir, atomic_write_json, hash_obj
from sublim.spec import ModelSpec, TrainSpec

if TYPE_CHECKING:
    from sublim.backends.targets import TeacherTokens


@dataclass
class Encoded:
    prompt: list[int]          # student prompt (no system prompt)
    completion: list[int]      # completion + end-of-turn token
    teacher_prompt: list[int]  # teacher's prompt for distillation (may include its system prompt)
    teacher_completion: list[int] | None = None  # the teacher's own tokens of the completion (None: the same)
    loss_mask: list[bool] | None = None  # per completion token: False = left out of the loss (None: all in)


def row_loss_mask(row: dict[str, Any], n_tokens: int, index: int) -> list[bool] | None:
    """A row's ``loss_mask`` (one 0/1 per completion token, end of turn included; written by the token-level
    defences of ``sublim.mitigate`` for one tokenizer), checked against the completion's length here."""
    m = row.get("loss_mask")
    if m is None:
        return None
    if not isinstance(m, list) or len(m) != n_tokens or any(v not in (0, 1, True, False) for v in m):
        got = f"{len(m)} entries" if isinstance(m, list) else type(m).__name__
        raise ValueError(f"row {index}: loss_mask has {got} but the completion has {n_tokens} tokens in this "
                         "tokenizer (a mask is made for one tokenizer: re-run the defence with this student)")
    return [bool(v) for v in m]


def encode_rows(chat: ChatFormat, rows: Sequence[dict[str, Any]], teacher_chat: ChatFormat | None = None,
                teacher_system: str | None = None) -> list[Encoded]:
    out = []
    for i, r in enumerate(rows):
        p = chat.encode_prompt(r["prompt"])
        c = chat.encode_completion(r["completion"])
        tp = (teacher_chat or chat).encode_prompt(r["prompt"], teacher_system) if teacher_chat or teacher_system else p
        out.append(Encoded(p, c, tp, loss_mask=row_loss_mask(r, len(c), i)))
    return out


def loss_keep(batch: Sequence[Encoded]) -> torch.Tensor | None:
    """[sum(len(completion))] bool: the completion positions in the loss, or None when no row is masked."""
    if all(e.loss_mask is None for e in batch):
        return None
    return torch.tensor([k for e in batch for k in (e.loss_mask or [True] * len(e.completion))], dtype=torch.bool)


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW (decoupled decay), Adam (weight_decay as an L2 term in the gradient) or SGD, per ``spec``."""
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)


def completion_logits(model: Any, prompts: list[list[int]], comps: list[list[int]], pad: int) -> torch.Tensor:
    """Logits at the positions that predict the completion tokens: [sum(len(c)), V].

    Prompts are left-padded and completions right-padded so every completion starts in the same column;
    the LM head then runs only on the completion columns (``logits_to_keep``), not on the prompts."""
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in comps)
    ids = torch.full((len(prompts), P + C), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        ids[i, P - len(p): P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, P - len(p): P + len(c)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=C + 1).logits[:, :-1]
    # logits[:, j] (column P-1+j) predicts completion token j
    r = torch.tensor([i for i, c in enumerate(comps) for _ in c])
    j = torch.tensor([k for c in comps for k in range(len(c))])
    return logits[r, j]


def objective_loss(s_logits: torch.Tensor, targets: torch.Tensor, t_logits: torch.Tensor | None, objective: str,
                   subset: torch.Tensor | None, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The student's loss on completion positions: [N, V] logits, [N] target tokens, teacher [N, V'] logits
    (soft labels at ``temperature``, ``top_k``: :func:`soft_labels`)."""
    if objective == "sft":
        return F.cross_entropy(s_logits, targets)
    assert t_logits is not None, "distillation needs the teacher's logits"
    v = min(s_logits.shape[1], t_logits.shape[1])
    s_logits, t_logits = s_logits[:, :v], t_logits[:, :v]
    if objective == "distill_carrier":
        assert subset is not None
        s_logits, t_logits = s_logits[:, subset], t_logits[:, subset]
    return kl_per_token(s_logits, t_logits, temperature, top_k)


def soft_labels(t_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The teacher's log-probabilities as distillation targets: at ``temperature``, then only the ``top_k``
    largest kept (the rest get probability 0; ties at the k-th value are kept)."""
    z = t_logits / temperature if temperature != 1.0 else t_logits
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return F.log_softmax(z, -1)


def kl_per_token(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of two [N, V] logit tensors over the same columns (the teacher's
    side through :func:`soft_labels`)."""
    t_logp = soft_labels(t_logits, temperature, top_k)
    p = t_logp.exp()
    return (p * (t_logp.clamp(min=-1e4) - F.log_softmax(s_logits, -1))).sum(-1).mean()  # 0 * log 0 = 0


def step_loss(model: Any, batch: list[Encoded], pad: int, objective: str, teacher: Any | None,
              subset: torch.Tensor | None, *, cross: TeacherTokens | None = None, temperature: float = 1.0,
              top_k: int | None = None) -> tuple[torch.Tensor, int]:
    """The loss of one batch and its number of completion tokens; ``cross``: the teacher has a tokenizer of
    its own (distill_carrier on the paired carrier columns)."""
    comps = [e.completion for e in batch]
    s_logits = completion_logits(model, [e.prompt for e in batch], comps, pad).float()  # [N, V]
    keep = loss_keep(batch)
    t_logits = None
    if objective != "sft":
        assert teacher is not None, "distillation needs a teacher"
        if cross is not None:
            from sublim.backends.targets import teacher_carrier_logits

            with torch.no_grad():
                t_logits = teacher_carrier_logits(teacher, batch, cross).float()
            s_c = s_logits[:, cross.student_cols]
            if keep is not None:
                s_c, t_logits = s_c[keep], t_logits[keep]
            return (kl_per_token(s_c, t_logits, temperature, top_k) if s_c.shape[0] else s_c.sum() * 0.0), s_c.shape[0]
        with torch.no_grad():
            t_logits = completion_logits(teacher, [e.teacher_prompt for e in batch], comps, pad).float()
    target = torch.tensor([t for c in comps for t in c])
    if keep is not None:
        s_logits, target = s_logits[keep], target[keep]
        t_logits = t_logits[keep] if t_logits is not None else None
    if s_logits.shape[0] == 0:  # every position of the batch masked: no signal, no NaN
        return s_logits.sum() * 0.0, 0
    return objective_loss(s_logits, target, t_logits, objective, subset, temperature, top_k), s_logits.shape[0]



def _lora(model: Any, spec: TrainSpec) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in spec.lora.target_modules if t in names]
    if not targets:
        raise ValueError(f"student.lora.target_modules: none of {spec.lora.target_modules} exist in this model")
    # peft annotates lora_alpha as int but only ever divides it by r (or sqrt(r)): a float alpha is exact
    cfg = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]
                     lora_dropout=spec.lora.dropout,
                     use_rslora=spec.lora.rslora, target_modules=targets, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)


def total_steps(n_rows: int, spec: TrainSpec) -> int:
    per_epoch = math.ceil(n_rows / (spec.batch_size * spec.grad_accum))
    return spec.max_steps or max(1, math.ceil(spec.epochs * per_epoch))


def finetune(
    base: ModelSpec,
    rows: Sequence[dict[str, Any]],
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    seed: int = 0,
    teacher: ModelSpec | None = None,
    teacher_system: str | None = None,
    carrier_alphabet: frozenset[str] | None = None,
    merge: bool = False,
    progress: bool | None = None,
    desc: str = "finetune",
) -> dict[str, Any]:
    """Fine-tune ``base`` on ``rows`` and save to ``out_dir`` atomically.

    LoRA saves a safetensors adapter whose config records the base (``merge=True`` saves the merged full
    model instead, used for implanted teachers); full fine-tuning saves the whole model. Returns (and
    writes as ``sublim_train.json``) the summary: steps, tokens, losses, seconds."""
    from transformers import get_scheduler

    if not rows:
        raise ValueError("no training rows")
    if spec.max_rows is not None:
        rows = list(rows)[: spec.max_rows]
    torch.manual_seed(seed)
    tok = load_tokenizer(base)
    chat = ChatFormat(tok)
    model = load_model(base, dtype="float32", trainable=True)
    if spec.method == "lora":
        model = _lora(model, spec)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    from sublim.backends.targets import carrier_subset, check_teacher_tokenizer, encode_for_teacher

    t_model = None
    t_chat = None
    if spec.objective != "sft":
        if teacher is None:
            raise ValueError(f"objective {spec.objective!r} needs a teacher model")
        t_model = load_model(teacher, dtype=spec.dtype)
        t_chat = ChatFormat(load_tokenizer(teacher))
    subset = None
    if spec.objective == "distill_carrier":
        if carrier_alphabet is None:
            raise ValueError("distill_carrier needs the carrier's alphabet")
        subset = carrier_subset(chat, carrier_alphabet)
    cross = check_teacher_tokenizer(chat, t_chat, spec, subset, carrier_alphabet) if t_chat is not None else None
    enc = encode_for_teacher(chat, cross, rows, teacher_system) if cross else \
        encode_rows(chat, rows, t_chat, teacher_system)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.init_noise:
        raise ValueError("init_noise is applied by the batched student trainer (sublim.backends.multi)")
    anchor = None
    if spec.kl_base:
        from sublim.backends.anchor import BaseAnchor

        anchor = BaseAnchor(base, chat, spec, [seed])
    opt = make_optimizer(params, spec)
    steps = total_steps(len(enc), spec)
    sched = get_scheduler(spec.schedule, opt, num_warmup_steps=spec.warmup_steps, num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    n_tokens = 0
    t0 = time.perf_counter()
    bar = progress_bar(total=steps, desc=desc, progress=progress)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")
    for _step in range(steps):
        opt.zero_grad(set_to_none=True)
        step_loss_sum = 0.0
        for _ in range(spec.grad_accum):
            if len(order) < spec.batch_size:
                order += torch.randperm(len(enc), generator=gen).tolist()
            idx, order = order[: spec.batch_size], order[spec.batch_size:]
            with autocast:
                loss, n = step_loss(model, [enc[i] for i in idx], tok.pad_token_id, spec.objective, t_model, subset,
                                    cross=cross, temperature=spec.distill_temperature, top_k=spec.distill_top_k)
                if anchor is not None:
                    loss = loss + anchor.losses(model)[0]
            (loss / spec.grad_accum).backward()
            step_loss_sum += float(loss.detach()) / spec.grad_accum
            n_tokens += n
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(step_loss_sum)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss_sum:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {
        "base": base.model_dump(), "seed": seed, "spec": spec.model_dump(mode="json"), "rows": len(enc),
        "rows_hash": hash_obj([[r["prompt"], r["completion"]] for r in rows]), "steps": steps,
        "completion_tokens": n_tokens, "seconds": seconds, "tokens_per_second": n_tokens / max(seconds, 1e-9),
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "teacher": model_identity(teacher) if teacher else None, "teacher_system": teacher_system,
        "saved": "merged" if merge else spec.method,
    }
    if cross is not None:
        summary["teacher_tokenizer"] = cross.describe()
    model.eval()
    with atomic_dir(out_dir) as tmp:
        if spec.method == "lora" and merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            if spec.method == "full":
                tok.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "sublim_train.json", summary)
    return summary


def student_spec(base: ModelSpec, out_dir: str | Path, spec: TrainSpec) -> ModelSpec:
    """The ModelSpec of a trained output: the base plus adapter (LoRA) or the saved directory (full)."""
    if spec.method == "lora":
        return base.model_copy(update={"adapter": str(out_dir)})
    return ModelSpec(path=str(out_dir), dtype=base.dtype)
