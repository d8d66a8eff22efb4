"""Adam on stacked parameters: elementwise, so one step equals N separate Adams."""

from __future__ import annotations

import torch

from sublim.toy.mnist.config import MnistConfig
from sublim.toy.mnist.model import BatchedMLP, _Piece


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
