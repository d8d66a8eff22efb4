"""Benchmark: the batched MNIST auxiliary-logit trainer vs two baselines, same N, data and epochs, one run.

Implementations timed (teacher training + the four student arms, no evaluation):

- ``batched``: ``sublim.toy.mnist`` (stacked parameters, ``torch.baddbmm`` over the model dimension, a
  hand-written backward into buffers allocated once, the fused Adam kernel for all models run piece by
  piece with the bf16 weight copy refreshed in place, gathered batches), fp32; and the same with bf16
  matmuls and fp32 master weights (skip it with ``--skip bf16``).
- ``loop``: ``sublim.toy.mnist.train_separately``: one ``nn.Sequential`` MLP and one Adam per model,
  trained one after another (the plain way to get N models).
- ``einsum``: a straightforward batched implementation: stacked parameters with ``torch.einsum`` per layer,
  default (foreach) Adam, and a Python-loop data loader that gathers each model's batch with
  ``index_select`` and ``torch.stack`` (the reference implementation's loader).

Also measured in the same run: this machine's matmul peak (2048^3 fp32 and bf16 GEMM), from which the
achieved GFLOP/s of each implementation is put in proportion. FLOPs are counted analytically per sample:
forward 2*sum(in*out) per layer; backward 2*sum(in*out) for weight grads + 2*sum(in*out) for input grads of
all but the first layer; the teacher's forward pass on the students' noise is counted once per step.

Usage::

    python benchmarks/bench_mnist.py --models 25 --epochs 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from sublim.runs import cpu_features, cpu_model
from sublim.toy import mnist as M
from sublim.toy.mnist_data import load_digits


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n x n GEMM (best of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops(cfg: M.MnistConfig, sizes: list[int], n_train: int) -> dict[str, float]:
    """Analytic FLOPs of teacher training and student training (all four arms) for ``cfg.models`` models."""
    mac = [i * o for i, o in itertools.pairwise(sizes)]
    fwd = 2 * sum(mac)
    bwd = 2 * sum(mac) + 2 * sum(mac[1:])
    n_noise = cfg.noise_samples or n_train
    teacher = cfg.models * cfg.epochs * n_train * (fwd + bwd)
    students = cfg.models * (cfg.student_epochs or 0) * n_noise * (len(M.STUDENT_ARMS) * (fwd + bwd) + fwd)
    return {"teacher": float(teacher), "students": float(students), "total": float(teacher + students)}


def run_batched(cfg: M.MnistConfig, digits: Any) -> float:
    sizes = M.layer_sizes(digits.n_features, cfg)
    ids = list(range(cfg.models))
    x = torch.from_numpy(digits.x_train) * 2 - 1
    y = torch.from_numpy(digits.y_train)
    t = time.perf_counter()
    t_init = M.stack([M.init_mlp(M.model_seed(cfg.seed, i, "init"), sizes) for i in ids])
    teacher, _ = M.train_teacher(t_init, x, y, cfg, ids)
    s_init = M.student_inits(cfg, M.derangement(cfg.models, cfg.seed), sizes)
    M.train_students(s_init, teacher, t_init, cfg, ids, x.shape[0])
    return time.perf_counter() - t


def run_loop(cfg: M.MnistConfig, digits: Any) -> float:
    t = time.perf_counter()
    M.train_separately(cfg, digits)
    return time.perf_counter() - t


def run_einsum(cfg: M.MnistConfig, digits: Any) -> float:
    """Stacked parameters + einsum layers + a Python-loop loader; default Adam; same seeds and streams."""
    sizes = M.layer_sizes(digits.n_features, cfg)
    n = cfg.models
    ids = list(range(n))
    x_all = torch.from_numpy(digits.x_train) * 2 - 1
    y_all = torch.from_numpy(digits.y_train)
    n_tr = x_all.shape[0]

    def fwd(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x
        for k in range(len(params) // 2):
            h = torch.einsum("mbi,mio->mbo", h, params[2 * k]) + params[2 * k + 1][:, None, :]
            if k < len(params) // 2 - 1:
                h = F.relu(h)
        return h

    def loader(order: torch.Tensor, bs: int):  # order: (M, n) per-model permutations
        for s in range(0, order.shape[1], bs):
            idx = order[:, s : s + bs]
            xb = torch.stack([x_all.index_select(0, idx[m]) for m in range(idx.shape[0])])
            yb = torch.stack([y_all.index_select(0, idx[m]) for m in range(idx.shape[0])])
            yield xb, yb

    t = time.perf_counter()
    t_init = M.stack([M.init_mlp(M.model_seed(cfg.seed, i, "init"), sizes) for i in ids])
    teacher = [p.clone().requires_grad_(True) for p in t_init]
    opt = torch.optim.Adam(teacher, lr=cfg.lr)
    gens = [torch.Generator().manual_seed(M.model_seed(cfg.seed, i, "order")) for i in ids]
    for _ in range(cfg.epochs):
        order = torch.stack([torch.randperm(n_tr, generator=g) for g in gens])
        for xb, yb in loader(order, cfg.batch_size):
            logits = fwd(teacher, xb)[..., : M.N_CLASSES]
            loss = torch.stack([F.cross_entropy(logits[m], yb[m]) for m in range(n)]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher = [p.detach() for p in teacher]
    s_init = M.student_inits(cfg, M.derangement(n, cfg.seed), sizes)
    students = [p.clone().requires_grad_(True) for p in s_init]
    sopt = torch.optim.Adam(students, lr=cfg.student_lr)
    ngens = [torch.Generator().manual_seed(M.model_seed(cfg.seed, i, "noise")) for i in ids]
    n_noise = cfg.noise_samples or n_tr
    bs = cfg.student_batch_size or cfg.batch_size
    sl = {"aux": slice(M.N_CLASSES, None), "all": slice(None)}
    for _ in range(cfg.student_epochs or 0):
        for s in range(0, n_noise, bs):
            b = min(bs, n_noise - s)
            xb = torch.stack([torch.rand((b, digits.n_features), generator=g) * 2 - 1 for g in ngens])
            with torch.no_grad():
                tl = fwd(teacher, xb)
            loss = torch.zeros(())
            for a, (_, _, target) in enumerate(M.STUDENT_ARMS):
                arm_params = [p[a * n : (a + 1) * n] for p in students]
                out = fwd(arm_params, xb)
                for m in range(n):
                    loss = loss + F.kl_div(
                        F.log_softmax(out[m][:, sl[target]], -1),
                        F.softmax(tl[m][:, sl[target]], -1),
                        reduction="batchmean",
                    )
            sopt.zero_grad()
            loss.backward()
            sopt.step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip", nargs="*", default=[], help="implementations to skip: loop einsum bf16")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    digits = load_digits(None)
    cfg = M.MnistConfig(models=args.models, epochs=args.epochs, progress=False, precision="fp32")
    sizes = M.layer_sizes(digits.n_features, cfg)
    fl = flops(cfg, sizes, digits.x_train.shape[0])
    info: dict[str, Any] = {
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(), "cpu_features": cpu_features(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        },
        "config": {
            "models": cfg.models,
            "epochs": cfg.epochs,
            "student_epochs": cfg.student_epochs,
            "sizes": sizes,
            "batch_size": cfg.batch_size,
            "student_batch_size": cfg.student_batch_size,
            "n_train": int(digits.x_train.shape[0]),
            "data": digits.source,
        },
        "gflop": {k: v / 1e9 for k, v in fl.items()},
    }
    print(f"[bench] {info['machine']}  {info['config']}", flush=True)
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    info["peak_gflops"] = {"fp32": peak32, "bf16": peak16}
    print(f"[bench] matmul peak: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s", flush=True)

    times: dict[str, float] = {}
    times["batched_fp32"] = run_batched(cfg, digits)
    print(f"[bench] batched fp32: {times['batched_fp32']:.1f}s", flush=True)
    if "bf16" not in args.skip:
        times["batched_bf16"] = run_batched(cfg.model_copy(update={"precision": "bf16"}), digits)
        print(f"[bench] batched bf16: {times['batched_bf16']:.1f}s", flush=True)
    if "loop" not in args.skip:
        times["loop_separate_models"] = run_loop(cfg, digits)
        print(f"[bench] loop of separate models: {times['loop_separate_models']:.1f}s", flush=True)
    if "einsum" not in args.skip:
        times["einsum_python_loader"] = run_einsum(cfg, digits)
        print(f"[bench] einsum + Python loader: {times['einsum_python_loader']:.1f}s", flush=True)
    info["seconds"] = times
    info["gflops_achieved"] = {k: fl["total"] / v / 1e9 for k, v in times.items()}
    info["fraction_of_peak"] = {
        k: info["gflops_achieved"][k] / (peak16 if "bf16" in k else peak32) for k in times
    }
    base = times["batched_fp32"]
    info["speedup_of_batched_fp32"] = {k: v / base for k, v in times.items() if k != "batched_fp32"}
    if "batched_bf16" in times:
        info["speedup_of_batched_bf16"] = {
            k: v / times["batched_bf16"] for k, v in times.items() if k != "batched_bf16"
        }
    info["machine"]["loadavg_end"] = os.getloadavg()
    return emit(info, args.json)


def emit(info: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Print the results as JSON and, with ``path``, also write them there."""
    print(json.dumps(info, indent=2), flush=True)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main()
