"""The batched MLP (parameters stacked along a model dimension), its losses and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sublim.toy.mnist.config import N_CLASSES, MnistConfig, Params


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
    """``enabled`` (MnistConfig.progress) means auto: a bar on a terminal, interval-limited lines off it."""
    from sublim.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="step", progress=None if enabled else False)


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
