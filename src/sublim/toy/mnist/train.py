"""Training the teachers and the students (batched), with the theorem measured along the students' training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sublim.toy.mnist.config import N_CLASSES, STUDENT_ARMS, MnistConfig, Params
from sublim.toy.mnist.inits import _gen, model_seed
from sublim.toy.mnist.model import BatchedMLP, _progress, evaluate
from sublim.toy.mnist.optim import _optimizer


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
