"""Many models as one: a leading student dimension on a model's parameters, for batched fine-tuning.

A batch concatenates one batch per student along the batch dimension (student s owns rows
``s*b .. (s+1)*b``); the modules here apply each student's own weights to its own rows.

* **LoRA** (:class:`StackedLoRALinear`, :func:`stack_lora`): every student shares the frozen base; student s
  has its own factors A[s], B[s] on each target linear layer. The base matmul runs once on the
  concatenation, each student's low-rank update is a batched matmul over the student dimension.
* **Full** (:func:`stack_full`): every parameter gets a student dimension: linear layers become batched
  matmuls over [S, out, in] weights, embeddings a lookup in [S, V, H] tables (tied output heads stay tied),
  RMS norms per-student scales.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sublim.spec import LoraSpec


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


def lora_target_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Qualified names of the linear layers whose last name component is in ``names``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in names]


def init_lora_A(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """peft's default init of A: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def stack_lora(model: nn.Module, seeds: Sequence[int], lora: LoraSpec) -> tuple[dict[str, StackedLoRALinear], list[str]]:
    """Replace ``lora.target_modules`` of ``model`` (in place) by :class:`StackedLoRALinear` layers, one
    student per seed (A drawn from the student's seed as peft would, B zero). Returns ({name: layer}, names);
    ValueError when no target module exists."""
    r = lora.rank
    scale = lora.alpha / (math.sqrt(r) if lora.rslora else r)
    names = lora_target_names(model, lora.target_modules)
    if not names:
        raise ValueError(f"student.lora.target_modules: none of {lora.target_modules} exist in this model")
    stacked: dict[str, StackedLoRALinear] = {}
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = StackedLoRALinear(getattr(parent, child), len(seeds), r, scale)
        setattr(parent, child, mod)
        stacked[n] = mod
    with torch.no_grad():
        for s, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            for n in names:
                m = stacked[n]
                m.A[s] = init_lora_A((r, m.base.in_features), gen)
    return stacked, names


def clip_per_student(params: Sequence[torch.Tensor], S: int, max_norm: float) -> None:
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
