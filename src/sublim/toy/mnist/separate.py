"""The reference implementation: one model and one optimiser at a time (what the tests compare against)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sublim.toy.mnist.config import N_CLASSES, STUDENT_ARMS, MnistConfig, Params
from sublim.toy.mnist.inits import _gen, derangement, init_mlp, layer_sizes, model_seed, stack, student_init
from sublim.toy.mnist.model import _autocast
from sublim.toy.mnist.train import _pixels
from sublim.toy.mnist_data import Digits


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
