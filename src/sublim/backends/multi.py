"""Many LoRA students trained at once as one batched model.

Every student shares the frozen base; student s has its own LoRA factors A[s], B[s] on each target
linear layer. A step concatenates one batch per student along the batch dimension, the base matmuls
run once on the concatenation, and each student's low-rank update is a batched matmul over the student
dimension. The loss is the sum of the students' own mean losses, so gradients (and Adam, which is
elementwise) are exactly those of separate fine-tunes; each student keeps its own seed for the LoRA
init and its own data order. Adapters are saved in peft's format (loadable by ``PeftModel``).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sublim.backends.hf import tokens_within
from sublim.backends.train import Encoded, encode_rows, total_steps
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.runs import atomic_dir, atomic_write_json, hash_obj
from sublim.spec import ModelSpec, TrainSpec


class StackedLoRALinear(nn.Module):
    """``base(x) + scale * (x A_s^T) B_s^T`` for the rows of student s; x arrives as [S*b, T, in]."""

    def __init__(self, base: nn.Linear, n_students: int, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.n = n_students
        self.scale = scale
        self.A = nn.Parameter(torch.zeros(n_students, rank, base.in_features))   # [S, r, in]
        self.B = nn.Parameter(torch.zeros(n_students, base.out_features, rank))  # [S, out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        sb, t, d = x.shape
        xs = x.reshape(self.n, (sb // self.n) * t, d)  # [S, b*T, in]
        up = torch.bmm(torch.bmm(xs, self.A.transpose(1, 2).to(x.dtype)), self.B.transpose(1, 2).to(x.dtype))
        return y + self.scale * up.reshape(sb, t, -1)


@dataclass
class StudentJob:
    """One student: its rows, seed, output directory, and (for distillation) its teacher."""

    rows: Sequence[dict[str, Any]]
    seed: int
    out_dir: Path
    teacher: ModelSpec | None = None
    teacher_system: str | None = None
    label: str = ""
    encoded: list[Encoded] = field(default_factory=list)


def _targets(model: nn.Module, names: Sequence[str]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in names]


def _init_A(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    # peft's default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def finetune_many(base: ModelSpec, jobs: Sequence[StudentJob], spec: TrainSpec, *,
                  carrier_alphabet: frozenset[str] | None = None, progress: bool | None = None,
                  desc: str = "students") -> list[dict[str, Any]]:
    """Train ``len(jobs)`` LoRA students of ``base`` at once; save each adapter atomically in its
    ``out_dir``; return one summary per job (as :func:`sublim.backends.train.finetune` does)."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if spec.method != "lora":
        raise ValueError("finetune_many trains LoRA students; use finetune for full fine-tuning")
    if not jobs:
        return []
    tok = load_tokenizer(base)
    chat = ChatFormat(tok)
    model = load_model(base, dtype="float32", trainable=False)
    S = len(jobs)
    r = spec.lora.rank
    scale = spec.lora.alpha / (math.sqrt(r) if spec.lora.rslora else r)
    names = _targets(model, spec.lora.target_modules)
    if not names:
        raise ValueError(f"student.lora.target_modules: none of {spec.lora.target_modules} exist in this model")
    stacked: dict[str, StackedLoRALinear] = {}
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        mod = StackedLoRALinear(lin, S, r, scale)
        setattr(parent, child, mod)
        stacked[n] = mod
    with torch.no_grad():
        for s, job in enumerate(jobs):
            gen = torch.Generator().manual_seed(job.seed)
            for n in names:
                m = stacked[n]
                m.A[s] = _init_A((r, m.base.in_features), gen)
    # teachers (distillation): one model per distinct teacher spec
    teachers: dict[str, Any] = {}
    subset = None
    if spec.objective != "sft":
        for job in jobs:
            if job.teacher is None:
                raise ValueError(f"objective {spec.objective!r} needs a teacher for every student")
            key = job.teacher.model_dump_json()
            if key not in teachers:
                teachers[key] = load_model(job.teacher, dtype=spec.dtype)
        if spec.objective == "distill_carrier":
            if carrier_alphabet is None:
                raise ValueError("distill_carrier needs the carrier's alphabet")
            subset = torch.tensor(sorted(set(tokens_within(tok, carrier_alphabet)) | set(chat.stop_token_ids())))
    rows_n = {len(j.rows) for j in jobs}
    steps = {total_steps(len(j.rows), spec) for j in jobs}
    if len(steps) != 1:
        raise ValueError(f"students must train for the same number of steps (rows per student: {sorted(rows_n)})")
    n_steps = steps.pop()
    for job in jobs:
        job.encoded = encode_rows(chat, job.rows, None, job.teacher_system)
    params = [p for m in stacked.values() for p in (m.A, m.B)]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay) if spec.optimizer == "adamw" \
        else torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = get_scheduler(spec.schedule, opt, num_warmup_steps=spec.warmup_steps, num_training_steps=n_steps)
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    orders: list[list[int]] = [[] for _ in jobs]
    losses: list[list[float]] = [[] for _ in jobs]
    n_tok = [0] * S
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=n_steps, desc=desc, disable=not show, leave=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")
    t0 = time.perf_counter()
    model.train()
    pad = tok.pad_token_id
    for _ in range(n_steps):
        opt.zero_grad(set_to_none=True)
        acc = [0.0] * S
        for _a in range(spec.grad_accum):
            batch: list[Encoded] = []
            for s, job in enumerate(jobs):
                if len(orders[s]) < spec.batch_size:
                    orders[s] += torch.randperm(len(job.encoded), generator=gens[s]).tolist()
                idx, orders[s] = orders[s][: spec.batch_size], orders[s][spec.batch_size:]
                batch += [job.encoded[i] for i in idx]
            with autocast:
                per = _per_student_loss(model, batch, S, spec, pad, teachers, jobs, subset)
            total = sum(loss for loss, _ in per) / spec.grad_accum
            total.backward()
            for s, (loss, n) in enumerate(per):
                acc[s] += float(loss.detach()) / spec.grad_accum
                n_tok[s] += n
        if spec.max_grad_norm:
            _clip_per_student(stacked, S, spec.max_grad_norm)
        opt.step()
        sched.step()
        for s in range(S):
            losses[s].append(acc[s])
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    return [_save(model, stacked, names, s, job, base, spec, tok, losses[s], n_tok[s], seconds, n_steps)
            for s, job in enumerate(jobs)]


def _per_student_loss(model: Any, batch: list[Encoded], S: int, spec: TrainSpec, pad: int,
                      teachers: dict[str, Any], jobs: Sequence[StudentJob],
                      subset: torch.Tensor | None) -> list[tuple[torch.Tensor, int]]:
    """One forward for all students (rows grouped by student, equal counts), then each student's loss."""
    from sublim.backends.train import completion_logits, objective_loss

    b = len(batch) // S
    logits = completion_logits(model, [e.prompt for e in batch], [e.completion for e in batch], pad).float()
    out = []
    start = 0
    for s in range(S):
        rows = batch[s * b:(s + 1) * b]
        n = sum(len(e.completion) for e in rows)
        sl = logits[start:start + n]
        start += n
        target = torch.tensor([t for e in rows for t in e.completion])
        tl = None
        if spec.objective != "sft":
            job = jobs[s]
            assert job.teacher is not None
            teacher = teachers[job.teacher.model_dump_json()]
            with torch.no_grad():
                tl = completion_logits(teacher, [e.teacher_prompt for e in rows], [e.completion for e in rows],
                                       pad).float()
        out.append((objective_loss(sl, target, tl, spec.objective, subset), n))
    return out


def _clip_per_student(stacked: dict[str, StackedLoRALinear], S: int, max_norm: float) -> None:
    """Clip each student's gradient by its own global norm (as separate fine-tunes would)."""
    sq = torch.zeros(S)
    for m in stacked.values():
        for p in (m.A, m.B):
            if p.grad is not None:
                sq += p.grad.pow(2).flatten(1).sum(1)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for m in stacked.values():
        for p in (m.A, m.B):
            if p.grad is not None:
                p.grad.mul_(coef.view(S, *([1] * (p.grad.dim() - 1))))


def _save(model: Any, stacked: dict[str, StackedLoRALinear], names: list[str], s: int, job: StudentJob,
          base: ModelSpec, spec: TrainSpec, tok: Any, losses: list[float], n_tok: int, seconds: float,
          steps: int) -> dict[str, Any]:
    """Write student s's adapter in peft's format (keys ``base_model.model.<module>.lora_{A,B}.weight``)."""
    from safetensors.torch import save_file

    from sublim.models import resolve_path

    tensors = {}
    for n in names:
        m = stacked[n]
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.A[s].detach().contiguous().clone()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.B[s].detach().contiguous().clone()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": resolve_path(base),
        "r": spec.lora.rank, "lora_alpha": spec.lora.alpha, "lora_dropout": 0.0, "use_rslora": spec.lora.rslora,
        "target_modules": sorted({n.split(".")[-1] for n in names}), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    summary = {
        "base": base.model_dump(), "seed": job.seed, "spec": spec.model_dump(mode="json"), "rows": len(job.rows),
        "rows_hash": hash_obj([[r["prompt"], r["completion"]] for r in job.rows]), "steps": steps,
        "completion_tokens": n_tok, "seconds": seconds, "tokens_per_second": n_tok / max(seconds, 1e-9),
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "teacher": job.teacher.model_dump() if job.teacher else None, "teacher_system": job.teacher_system,
        "saved": "lora", "trained_with": "finetune_many",
    }
    with atomic_dir(job.out_dir) as tmp:
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(Path(tmp) / "adapter_config.json", cfg)
        atomic_write_json(Path(tmp) / "sublim_train.json", summary)
    return summary
