"""Many students trained at once as one batched model.

A step concatenates one batch per student along the batch dimension (student s owns rows
``s*b .. (s+1)*b``). Two kinds:

* **LoRA**: every student shares the frozen base; student s has its own LoRA factors A[s], B[s] on each
  target linear layer. The base matmuls run once on the concatenation, each student's low-rank update is a
  batched matmul over the student dimension. Adapters are saved in peft's format (loadable by ``PeftModel``).
* **Full**: every parameter gets a student dimension: linear layers become batched matmuls over [S, out, in]
  weights, embeddings a lookup in [S, V, H] tables (tied output heads stay tied), RMS norms per-student
  scales. Each student is saved as an ordinary full model directory.

The loss is the sum of the students' own mean losses, so gradients (and Adam, which is elementwise) are
exactly those of separate fine-tunes; each student keeps its own seed and its own data order, and its
gradient is clipped by its own norm.

For distillation the teacher's logits on a row never change, so they are computed once per (teacher,
row) and shared by every student that trains on that row (restricted to the carrier's tokens for
``distill_carrier``), instead of a teacher forward pass per student per step.
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


class StackedLinear(nn.Module):
    """Student s's rows of x ([S*b, ..., in]) times its own weight [S, out, in] (+ bias [S, out])."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        shape = x.shape
        y = torch.bmm(x.reshape(n, -1, shape[-1]), self.weight.transpose(1, 2).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias[:, None, :].to(y.dtype)
        return y.reshape(*shape[:-1], -1)


class StackedEmbedding(nn.Module):
    """Student s's rows of ids ([S*b, T]) looked up in its own table [S, V, H]."""

    def __init__(self, weight: nn.Parameter, padding_idx: int | None) -> None:
        super().__init__()
        self.weight = weight
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, v, h = self.weight.shape
        off = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[0] // n) * v
        out = nn.functional.embedding(ids + off.view(-1, *([1] * (ids.dim() - 1))), self.weight.reshape(n * v, h))
        if self.padding_idx is not None:  # as nn.Embedding: a lookup of the padding row sends it no gradient
            out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out


class StackedRMSNorm(nn.Module):
    """Llama-style RMS norm (``weight * x / rms(x)``, computed in float32) with a per-student weight [S, H]."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dt = h.dtype
        x = h.to(torch.float32)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dt)
        n, d = self.weight.shape
        return (self.weight[:, None, :] * x.reshape(n, -1, d)).reshape(h.shape)


# RMS norm classes whose forward is exactly Llama's (Gemma's uses 1 + weight and is not listed).
_LLAMA_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Olmo2RMSNorm", "Phi3RMSNorm"}


def stack_full(model: nn.Module, n: int) -> dict[str, nn.Parameter]:
    """Give every parameter of ``model`` a leading student dimension of size ``n`` (in place), each student
    starting from the model's weights. Returns {original parameter name: stacked parameter}; raises
    ValueError naming the first module it cannot batch."""
    by_id: dict[int, nn.Parameter] = {}
    names: dict[str, nn.Parameter] = {}
    name_of = {id(p): name for name, p in model.named_parameters()}  # tied weights: the first name only

    def stacked(p: torch.Tensor | None) -> nn.Parameter | None:
        if p is None:
            return None
        if id(p) not in by_id:
            q = p.detach().to(torch.float32)
            by_id[id(p)] = nn.Parameter(q.unsqueeze(0).repeat(n, *([1] * q.dim())).contiguous())
        return by_id[id(p)]

    for mod_name, mod in list(model.named_modules()):
        own = dict(mod.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(mod, nn.Linear):
            new: nn.Module = StackedLinear(stacked(mod.weight), stacked(mod.bias))  # type: ignore[arg-type]
        elif isinstance(mod, nn.Embedding):
            new = StackedEmbedding(stacked(mod.weight), mod.padding_idx)  # type: ignore[arg-type]
        elif type(mod).__name__ in _LLAMA_NORMS and set(own) == {"weight"}:
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            if eps is None:
                raise ValueError(f"batched full fine-tuning: norm {mod_name!r} has no epsilon attribute")
            new = StackedRMSNorm(stacked(mod.weight), float(eps))  # type: ignore[arg-type]
        else:
            raise ValueError(f"batched full fine-tuning cannot batch module {mod_name!r} ({type(mod).__name__}); "
                             "set student.parallel_students: 1 to train full students one at a time")
        for p in own.values():
            if id(p) in name_of:
                names[name_of[id(p)]] = by_id[id(p)]
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return names


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
    """Train ``len(jobs)`` students of ``base`` at once (LoRA or full, as ``spec.method`` says); save each
    atomically in its ``out_dir``; return one summary per job (as :func:`sublim.backends.train.finetune`)."""
    from tqdm.auto import tqdm
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
        r = spec.lora.rank
        scale = spec.lora.alpha / (math.sqrt(r) if spec.lora.rslora else r)
        names = _targets(model, spec.lora.target_modules)
        if not names:
            raise ValueError(f"student.lora.target_modules: none of {spec.lora.target_modules} exist in this model")
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
        params = [p for m in stacked.values() for p in (m.A, m.B)]
    else:
        full = stack_full(model, S)
        params = list({id(p): p for p in full.values()}.values())
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
    positions = None
    if spec.distill_positions == "carrier":
        assert subset is not None
        allowed = set(subset.tolist())
        positions = [[carrier_positions(e, allowed) for e in job.encoded] for job in jobs]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")
    targets = _teacher_targets(jobs, teachers, subset, spec, tok.pad_token_id, autocast, positions)
    if targets is not None:
        teachers.clear()  # every target is cached: the teacher models are not needed while training
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay) if spec.optimizer == "adamw" \
        else torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = get_scheduler(spec.schedule, opt, num_warmup_steps=spec.warmup_steps, num_training_steps=n_steps)
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    orders: list[list[int]] = [[] for _ in jobs]
    losses: list[list[float]] = [[] for _ in jobs]
    n_tok = [0] * S
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=n_steps, desc=desc, disable=not show, leave=False)
    t0 = time.perf_counter()
    model.train()
    pad = tok.pad_token_id
    for _ in range(n_steps):
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
                per = _per_student_loss(model, batch, S, spec, pad, jobs, targets, subset, teachers, positions)
            total = torch.stack([loss for loss, _ in per]).sum() / spec.grad_accum
            total.backward()
            for s, (loss, count) in enumerate(per):
                acc[s] += float(loss.detach()) / spec.grad_accum
                n_tok[s] += count
        if spec.max_grad_norm:
            _clip_per_student(params, S, spec.max_grad_norm)
        opt.step()
        sched.step()
        for s in range(S):
            losses[s].append(acc[s])
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    if spec.method == "lora":
        return [_save(model, stacked, names, s, job, base, spec, tok, losses[s], n_tok[s], seconds, n_steps)
                for s, job in enumerate(jobs)]
    return [_save_full(full, s, job, base, spec, tok, losses[s], n_tok[s], seconds, n_steps)
            for s, job in enumerate(jobs)]


# Cache the teacher's targets for a whole run when they take at most this many bytes (distill_full on a large
# vocabulary does not fit: its teacher logits are then recomputed per step).
TARGET_CACHE_BYTES = 2 * 1024**3


def _teacher_targets(jobs: Sequence[StudentJob], teachers: dict[str, Any], subset: torch.Tensor | None,
                     spec: TrainSpec, pad: int, autocast: Any,
                     positions: list[list[list[int]]] | None = None) -> list[list[torch.Tensor]] | None:
    """Per job, per row: the teacher's logits at the row's completion positions ([len(c), V'], restricted
    to ``subset`` for distill_carrier), each computed once per distinct (teacher, prompt, completion);
    ``None`` for sft, or when the cache would exceed :data:`TARGET_CACHE_BYTES`."""
    from sublim.backends.train import completion_logits

    if spec.objective == "sft":
        return None
    width = len(subset) if subset is not None else next(iter(teachers.values())).config.vocab_size
    toks = sum(len(e.completion) for j in jobs for e in j.encoded) if positions is None else \
        sum(len(p) for ps in positions for p in ps)
    if toks * width * 4 > TARGET_CACHE_BYTES:
        if positions is not None:
            raise ValueError("distill_positions 'carrier': the teacher's targets do not fit in memory")
        return None
    # (teacher, teacher prompt, completion, distilled positions, student prompt length)
    Key = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], int]
    cache: dict[Key, torch.Tensor] = {}
    out: list[list[torch.Tensor]] = []
    for j, job in enumerate(jobs):
        assert job.teacher is not None
        tkey = job.teacher.model_dump_json()
        keys: list[Key] = [(tkey, tuple(e.teacher_prompt), tuple(e.completion),
                            tuple(positions[j][i]) if positions is not None else (), len(e.prompt))
                           for i, e in enumerate(job.encoded)]
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        for i in range(0, len(todo), 64):
            chunk = todo[i: i + 64]
            with torch.no_grad(), autocast:
                if positions is None:
                    lg = completion_logits(teachers[tkey], [list(k[1]) for k in chunk], [list(k[2]) for k in chunk],
                                           pad).float()
                else:  # the teacher's prompt may be longer (a system prompt): align from the prompt's end
                    lg = position_logits(teachers[tkey], [list(k[1] + k[2]) for k in chunk],
                                         [[t + len(k[1]) - k[4] for t in k[3]]
                                          for k in chunk], pad).float()
            if subset is not None:
                lg = lg[:, subset]
            start = 0
            for k in chunk:
                n = len(k[2]) if positions is None else len(k[3])
                cache[k] = lg[start: start + n].clone()
                start += n
        out.append([cache[k] for k in keys])
    return out


def carrier_positions(e: Encoded, allowed: set[int]) -> list[int]:
    """Indices t into the student's sequence ``prompt + completion`` whose token is distilled under
    ``distill_positions: carrier``: every completion token, and every prompt token in ``allowed`` (the
    carrier's tokens) that lies in the part of the prompt the teacher reads too (the common suffix of the
    student's and the teacher's prompts; all of it when the teacher has no system prompt)."""
    p, tp = e.prompt, e.teacher_prompt
    common = 0
    while common < min(len(p), len(tp)) and p[-1 - common] == tp[-1 - common]:
        common += 1
    first = max(1, len(p) - common + 1)  # the token at index t is predicted from index t-1, also shared
    return [t for t in range(first, len(p)) if p[t] in allowed] + list(range(len(p), len(p) + len(e.completion)))


def position_logits(model: Any, seqs: list[list[int]], positions: list[list[int]], pad: int) -> torch.Tensor:
    """Logits predicting ``seqs[i][t]`` for each t in ``positions[i]`` (computed at index t-1), stacked in
    order: [sum(len(positions[i])), V]. Sequences are left-padded; the LM head runs only on the columns
    from the earliest requested one."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, L - len(x):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cols = [[L - len(x) + t - 1 for t in ts] for x, ts in zip(seqs, positions, strict=True)]
    first = min(c for cs in cols for c in cs)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=L - first).logits
    r = torch.tensor([i for i, cs in enumerate(cols) for _ in cs])
    c = torch.tensor([x - first for cs in cols for x in cs])
    return logits[r, c]


def _per_student_loss(model: Any, batch: list[tuple[int, int]], S: int, spec: TrainSpec, pad: int,
                      jobs: Sequence[StudentJob], targets: list[list[torch.Tensor]] | None,
                      subset: torch.Tensor | None, teachers: dict[str, Any] | None = None,
                      positions: list[list[list[int]]] | None = None) -> list[tuple[torch.Tensor, int]]:
    """One forward for all students (rows grouped by student, equal counts), then each student's loss.
    ``batch`` holds (student, row index) pairs; ``positions`` (distill_positions 'carrier') the distilled
    indices of each row."""
    from sublim.backends.train import completion_logits, kl_per_token, objective_loss

    enc = [jobs[s].encoded[i] for s, i in batch]
    b = len(batch) // S
    if positions is None:
        logits = completion_logits(model, [e.prompt for e in enc], [e.completion for e in enc], pad).float()
        counts = [len(e.completion) for e in enc]
    else:
        pos = [positions[s][i] for s, i in batch]
        logits = position_logits(model, [e.prompt + e.completion for e in enc], pos, pad).float()
        counts = [len(p) for p in pos]
    out = []
    start = 0
    for s in range(S):
        rows = enc[s * b:(s + 1) * b]
        n = sum(counts[s * b:(s + 1) * b])
        sl = logits[start:start + n]
        start += n
        target = torch.tensor([t for e in rows for t in e.completion])
        tl = None
        if spec.objective != "sft":
            if targets is not None:
                tl = torch.cat([targets[s][i] for _, i in batch[s * b:(s + 1) * b]])
                if subset is not None:  # already restricted: objective_loss must not index it again
                    out.append((kl_per_token(sl[:, subset], tl), n))
                    continue
            else:
                job = jobs[s]
                assert job.teacher is not None and teachers is not None
                with torch.no_grad():
                    tl = completion_logits(teachers[job.teacher.model_dump_json()], [e.teacher_prompt for e in rows],
                                           [e.completion for e in rows], pad).float()
        out.append((objective_loss(sl, target, tl, spec.objective, subset), n))
    return out


def _clip_per_student(params: Sequence[torch.Tensor], S: int, max_norm: float) -> None:
    """Clip each student's gradient by its own global norm (as separate fine-tunes would); every parameter
    has the student dimension first."""
    sq = torch.zeros(S)
    for p in params:
        if p.grad is not None:
            sq += p.grad.pow(2).flatten(1).sum(1)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
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
        "teacher": job.teacher.model_dump() if job.teacher else None, "teacher_system": job.teacher_system,
        "saved": saved, "trained_with": "finetune_many",
    }


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
