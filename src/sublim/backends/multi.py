"""Many students trained at once as one batched model.

A step concatenates one batch per student along the batch dimension (student s owns rows
``s*b .. (s+1)*b``), on a model whose parameters carry a student dimension
(:mod:`sublim.backends.stacked`): LoRA students share the frozen base and have their own factors; full
students have their own copy of every parameter. LoRA adapters are saved in peft's format (loadable by
``PeftModel``), full students as ordinary model directories.

The loss is the sum of the students' own mean losses, so gradients (and Adam, which is elementwise) are
exactly those of separate fine-tunes; each student keeps its own seed and its own data order, and its
gradient is clipped by its own norm.

For distillation the teacher's targets are computed once per (teacher, row) and shared by every student
that trains on the row (:mod:`sublim.backends.targets`, which also maps a ``distill_carrier`` teacher of
another tokenizer onto the student's carrier tokens).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sublim.backends.carrier_head import carrier_head as _carrier_head
from sublim.backends.carrier_head import carrier_losses as _carrier_losses
from sublim.backends.stacked import (
    StackedEmbedding,
    StackedLinear,
    StackedLoRALinear,
    StackedRMSNorm,
    clip_per_student,
    stack_full,
    stack_lora,
)
from sublim.backends.targets import (
    TARGET_CACHE_BYTES,
    TeacherTokens,
    carrier_positions,
    carrier_subset,
    check_teacher_tokenizer,
    encode_for_teacher,
    position_logits,
    teacher_carrier_logits,
    teacher_targets,
)
from sublim.backends.train import Encoded, encode_rows, loss_keep, make_optimizer, total_steps
from sublim.models import ChatFormat, load_model, load_tokenizer, model_identity
from sublim.progress import progress_bar
from sublim.runs import atomic_dir, atomic_write_json, hash_obj
from sublim.spec import ModelSpec, TrainSpec

__all__ = [
    "TARGET_CACHE_BYTES", "StackedEmbedding", "StackedLinear", "StackedLoRALinear", "StackedRMSNorm", "StudentJob",
    "carrier_positions", "finetune_many", "position_logits", "stack_full",
]


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
    teacher_tokens: TeacherTokens | None = None  # set when the teacher has a tokenizer of its own


def finetune_many(base: ModelSpec, jobs: Sequence[StudentJob], spec: TrainSpec, *,
                  carrier_alphabet: frozenset[str] | None = None, progress: bool | None = None,
                  desc: str = "students",
                  on_step: Callable[[int, dict[str, nn.Parameter]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``len(jobs)`` students of ``base`` at once (LoRA or full, as ``spec.method`` says); save each
    atomically in its ``out_dir``; return one summary per job (as :func:`sublim.backends.train.finetune`).

    ``on_step(step, stacked)`` (full fine-tunes only) is called before the first step (step 0) and after every
    optimiser step with the stacked parameters ({name: [S, ...]}), e.g. :class:`sublim.theorem.TheoremTrace`."""
    from transformers import get_scheduler

    if not jobs:
        return []
    tok = load_tokenizer(base)
    chat = ChatFormat(tok)
    model = load_model(base, dtype="float32", trainable=False)
    S = len(jobs)
    stacked: dict[str, StackedLoRALinear] = {}
    names: list[str] = []
    full: dict[str, nn.Parameter] = {}
    if spec.method == "lora":
        stacked, names = stack_lora(model, [job.seed for job in jobs], spec.lora)
        params = [p for m in stacked.values() for p in (m.A, m.B)]
    else:
        full = stack_full(model, S)
        params = list({id(p): p for p in full.values()}.values())
        if spec.init_noise:
            add_init_noise(params, [job.seed for job in jobs], spec.init_noise)
    if spec.init_noise and spec.method != "full":
        raise ValueError("init_noise needs full fine-tunes (student.method: full)")
    teachers, cross, subset = _load_teachers(jobs, spec, chat, carrier_alphabet)
    rows_n = {len(j.rows) for j in jobs}
    steps = {total_steps(len(j.rows), spec) for j in jobs}
    if len(steps) != 1:
        raise ValueError(f"students must train for the same number of steps (rows per student: {sorted(rows_n)})")
    n_steps = steps.pop()
    for job in jobs:
        tt = job.teacher_tokens = cross.get(job.teacher.model_dump_json()) if job.teacher is not None else None
        job.encoded = encode_for_teacher(chat, tt, job.rows, job.teacher_system) if tt is not None else \
            encode_rows(chat, job.rows, None, job.teacher_system)
    # per student: its columns of the carrier subset (all of it, or those paired with another tokenizer's)
    cols = [_student_cols(job, subset) for job in jobs]
    positions = None
    if spec.distill_positions == "carrier" and any(e.loss_mask is not None for job in jobs for e in job.encoded):
        raise ValueError("loss_mask rows need distill_positions 'completion' (a mask names completion tokens)")
    if spec.distill_positions == "carrier":
        assert subset is not None
        allowed = set(subset.tolist())
        positions = [[carrier_positions(e, allowed) for e in job.encoded] for job in jobs]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")
    targets = teacher_targets(jobs, teachers, subset, spec, tok.pad_token_id, autocast, positions, cross,
                              progress)
    if targets is not None:
        teachers.clear()  # every target is cached: the teacher models are not needed while training
    anchor = None
    if spec.kl_base:
        from sublim.backends.anchor import BaseAnchor

        anchor = BaseAnchor(base, chat, spec, [job.seed for job in jobs])
    opt = make_optimizer(params, spec)
    sched = get_scheduler(spec.schedule, opt, num_warmup_steps=spec.warmup_steps, num_training_steps=n_steps)
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    orders: list[list[int]] = [[] for _ in jobs]
    losses: list[list[float]] = [[] for _ in jobs]
    n_tok = [0] * S
    bar = progress_bar(total=n_steps, desc=desc, progress=progress)
    if on_step is not None and spec.method != "full":
        raise ValueError("on_step traces full fine-tunes (student.method: full)")
    t0 = time.perf_counter()
    model.train()
    pad = tok.pad_token_id
    if on_step is not None:
        on_step(0, full)
    for step in range(n_steps):
        opt.zero_grad(set_to_none=True)
        acc = [0.0] * S
        for _a in range(spec.grad_accum):
            batch: list[tuple[int, int]] = []
            for s, job in enumerate(jobs):
                if len(orders[s]) < spec.batch_size:
                    orders[s] += torch.randperm(len(job.encoded), generator=gens[s]).tolist()
                idx, orders[s] = orders[s][: spec.batch_size], orders[s][spec.batch_size:]
                batch += [(s, i) for i in idx]
            with autocast:
                per = _per_student_loss(model, batch, S, spec, pad, jobs, targets, subset, teachers, positions,
                                        cols)
                if anchor is not None:
                    per = [(loss + a, n) for (loss, n), a in zip(per, anchor.losses(model), strict=True)]
            total = torch.stack([loss for loss, _ in per]).sum() / spec.grad_accum
            total.backward()
            for s, (loss, count) in enumerate(per):
                acc[s] += float(loss.detach()) / spec.grad_accum
                n_tok[s] += count
        if spec.max_grad_norm:
            clip_per_student(params, S, spec.max_grad_norm)
        opt.step()
        sched.step()
        for s in range(S):
            losses[s].append(acc[s])
        if on_step is not None:
            on_step(step + 1, full)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    if spec.method == "lora":
        return [_save(model, stacked, names, s, job, base, spec, tok, losses[s], n_tok[s], seconds, n_steps)
                for s, job in enumerate(jobs)]
    return [_save_full(full, s, job, base, spec, tok, losses[s], n_tok[s], seconds, n_steps)
            for s, job in enumerate(jobs)]


def _load_teachers(jobs: Sequence[StudentJob], spec: TrainSpec, chat: ChatFormat,
                   alphabet: frozenset[str] | None) -> tuple[dict[str, Any], dict[str, TeacherTokens],
                                                              torch.Tensor | None]:
    """(one model per distinct teacher spec, the teachers with a tokenizer of their own and how they pair
    with the student's carrier tokens, the student's carrier subset for distill_carrier)."""
    teachers: dict[str, Any] = {}
    cross: dict[str, TeacherTokens] = {}
    subset = None
    if spec.objective == "sft":
        return teachers, cross, subset
    for job in jobs:
        if job.teacher is None:
            raise ValueError(f"objective {spec.objective!r} needs a teacher for every student")
    if spec.objective == "distill_carrier":
        if alphabet is None:
            raise ValueError("distill_carrier needs the carrier's alphabet")
        subset = carrier_subset(chat, alphabet)
    for job in jobs:
        assert job.teacher is not None
        key = job.teacher.model_dump_json()
        if key not in teachers:
            tt = check_teacher_tokenizer(chat, ChatFormat(load_tokenizer(job.teacher)), spec, subset, alphabet)
            if tt is not None:
                cross[key] = tt
            teachers[key] = load_model(job.teacher, dtype=spec.dtype)
    return teachers, cross, subset


def add_init_noise(params: Sequence[nn.Parameter], seeds: Sequence[int], share: float) -> None:
    """In place: student s's slice of every stacked parameter [S, ...] gets Gaussian noise with sd ``share`` x
    that tensor's RMS, drawn from the student's own seed (so a student's start does not depend on its batch)."""
    with torch.no_grad():
        for s, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(10_007 * seed + 17)
            for p in params:
                w = p[s]
                rms = float(w.pow(2).mean().sqrt())
                w.add_(torch.randn(w.shape, generator=g) * (share * rms))


def _student_cols(job: StudentJob, subset: torch.Tensor | None) -> torch.Tensor | None:
    return job.teacher_tokens.student_cols if job.teacher_tokens is not None else subset


def _per_student_loss(model: Any, batch: list[tuple[int, int]], S: int, spec: TrainSpec, pad: int,
                      jobs: Sequence[StudentJob], targets: list[list[torch.Tensor]] | None,
                      subset: torch.Tensor | None, teachers: dict[str, Any] | None = None,
                      positions: list[list[list[int]]] | None = None,
                      cols: Sequence[torch.Tensor | None] | None = None) -> list[tuple[torch.Tensor, int]]:
    """One forward for all students (rows grouped by student, equal counts), then each student's loss.
    ``batch`` holds (student, row index) pairs; ``positions`` (distill_positions 'carrier') the distilled
    indices of each row; ``cols[s]`` student s's carrier columns (``subset``, or those paired with its
    teacher's tokenizer when that teacher has one of its own)."""
    from sublim.backends.train import completion_logits, kl_per_token, objective_loss

    enc = [jobs[s].encoded[i] for s, i in batch]
    soft = (spec.distill_temperature, spec.distill_top_k)
    b = len(batch) // S
    fast = _carrier_head(model, spec, targets, cols, batch, jobs)
    if fast is not None and targets is not None:
        return _carrier_losses(model, fast, enc, batch, S, b, pad, targets, positions, soft)
    if positions is None:
        logits = completion_logits(model, [e.prompt for e in enc], [e.completion for e in enc], pad).float()
        counts = [len(e.completion) for e in enc]
    else:
        pos = [positions[s][i] for s, i in batch]
        logits = position_logits(model, [e.prompt + e.completion for e in enc], pos, pad).float()
        counts = [len(p) for p in pos]
    out = []
    # one split, not a slice per student: a slice's backward writes a zero tensor the size of all students'
    # logits, so S slices cost S^2 / S times the memory traffic of one split (measured: benchmarks/RESULTS.md)
    sizes = [sum(counts[s * b:(s + 1) * b]) for s in range(S)]
    parts = torch.split(logits, sizes)
    for s in range(S):
        rows = enc[s * b:(s + 1) * b]
        n = sizes[s]
        sl = parts[s]
        target = torch.tensor([t for e in rows for t in e.completion])
        keep = loss_keep(rows) if positions is None else None
        tl = None
        sub = cols[s] if cols is not None else subset
        if spec.objective != "sft":
            if targets is not None:
                tl = torch.cat([targets[s][i] for _, i in batch[s * b:(s + 1) * b]])
                if keep is not None:
                    sl, tl, target, n = sl[keep], tl[keep], target[keep], int(keep.sum())
                if n == 0:  # every position of this student's batch masked out: no signal
                    out.append((sl.sum() * 0.0, 0))
                    continue
                if sub is not None:  # already restricted: objective_loss must not index it again
                    out.append((kl_per_token(sl[:, sub], tl, *soft), n))
                    continue
            else:
                job = jobs[s]
                assert job.teacher is not None and teachers is not None
                teacher = teachers[job.teacher.model_dump_json()]
                if job.teacher_tokens is not None:  # a tokenizer of its own: its paired carrier columns
                    with torch.no_grad():
                        tl = teacher_carrier_logits(teacher, rows, job.teacher_tokens).float()
                    sc = sl[:, job.teacher_tokens.student_cols]
                    if keep is not None:
                        sc, tl, n = sc[keep], tl[keep], int(keep.sum())
                    out.append((kl_per_token(sc, tl, *soft) if n else sc.sum() * 0.0, n))
                    continue
                with torch.no_grad():
                    tl = completion_logits(teacher, [e.teacher_prompt for e in rows],
                                           [e.completion for e in rows], pad).float()
        if keep is not None and targets is None:
            sl, target, n = sl[keep], target[keep], int(keep.sum())
            tl = tl[keep] if tl is not None else None
        if n == 0:
            out.append((sl.sum() * 0.0, 0))
            continue
        out.append((objective_loss(sl, target, tl, spec.objective, subset, *soft), n))
    return out


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
    summary = _summary(job, base, spec, losses, n_tok, seconds, steps, "lora")
    with atomic_dir(job.out_dir) as tmp:
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(Path(tmp) / "adapter_config.json", cfg)
        atomic_write_json(Path(tmp) / "sublim_train.json", summary)
    return summary


def _summary(job: StudentJob, base: ModelSpec, spec: TrainSpec, losses: list[float], n_tok: int, seconds: float,
             steps: int, saved: str) -> dict[str, Any]:
    return {
        "base": base.model_dump(), "seed": job.seed, "spec": spec.model_dump(mode="json"), "rows": len(job.rows),
        "rows_hash": hash_obj([[r["prompt"], r["completion"]] for r in job.rows]), "steps": steps,
        "completion_tokens": n_tok, "seconds": seconds, "tokens_per_second": n_tok / max(seconds, 1e-9),
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "teacher": model_identity(job.teacher) if job.teacher else None, "teacher_system": job.teacher_system,
        "saved": saved, "trained_with": "finetune_many",
    } | ({"teacher_tokenizer": job.teacher_tokens.describe()} if job.teacher_tokens is not None else {})


def _save_full(full: dict[str, nn.Parameter], s: int, job: StudentJob, base: ModelSpec, spec: TrainSpec, tok: Any,
               losses: list[float], n_tok: int, seconds: float, steps: int) -> dict[str, Any]:
    """Write student s as an ordinary full model directory (the base's config, student s's weights)."""
    model = load_model(base, dtype="float32", trainable=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full[name][s].to(p.dtype))
    summary = _summary(job, base, spec, losses, n_tok, seconds, steps, "full")
    with atomic_dir(job.out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "sublim_train.json", summary)
    return summary
