"""Benchmark: the parts of the batched MNIST trainer that no implementation can skip, and the time they set.

``bench_mnist.py`` times whole implementations. This script times the unavoidable parts of the batched
workload one by one, on the same shapes, to bound how fast *any* batched trainer with the same arithmetic can
be on this machine:

- the GEMMs: each per-model matmul shape of the workload as a batched ``bmm`` in bf16 (first-layer forward
  and weight gradient, hidden-layer forward, weight gradient and input gradient), next to a 2048^3 GEMM;
- Adam with fp32 state (what ``torch.optim.Adam`` keeps): one fused call over all student parameters, and
  ``sublim``'s piecewise ``StackedAdam`` (bf16 gradients and weights); with a plain ``add_`` over the same
  number of floats for the memory bandwidth;
- the per-model noise streams (one Mersenne Twister per model, so model i's noise depends only on seed + i).

It then adds up a lower bound for the benchmark workload (``bench_mnist.py --models 100 --epochs 1``):
all useful FLOPs at the 2048^3 peak, every Adam update at the fused kernel's rate, all noise draws, and
compares it with the time a 5x speed-up over the loop of separate models needs.

Usage::

    python benchmarks/bench_mnist_floor.py --threads 2 [--loop-seconds 64.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from typing import Any

import torch

from sublim.toy import mnist as M

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mnist import emit, flops, matmul_peak  # the sibling benchmark: same FLOP count, GEMM peak, output

BF = torch.bfloat16


def best_ms(fn: Any, reps: int = 10) -> float:
    fn()
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def gemms(n: int, arms: int, b: int, d: int, h: int) -> dict[str, dict[str, float]]:
    """Per-shape bf16 bmm timings over the stacked models; GFLOP/s of each."""
    m = n * arms
    x = torch.randn(n, b, d).to(BF)
    w1 = torch.randn(n, d, h).to(BF)
    z1 = torch.empty(n, b, h, dtype=BF)
    dz1 = torch.randn(n, b, h).to(BF)
    a = torch.randn(m, b, h).to(BF)
    w2 = torch.randn(m, h, h).to(BF)
    z2 = torch.empty(m, b, h, dtype=BF)
    dz2 = torch.randn(m, b, h).to(BF)
    g2 = torch.empty(m, h, h, dtype=BF)
    cases = {
        # per group of n models sharing one input (the teacher, or one student arm)
        "first layer forward  x @ W1   (64x784 @ 784x256)": (lambda: torch.bmm(x, w1, out=z1), n * b * d * h),
        "first layer weight grad  x^T @ dz  (784x64 @ 64x256)": (
            lambda: torch.bmm(x.transpose(1, 2), dz1, out=w1),
            n * b * d * h,
        ),
        # over all students
        "hidden forward  a @ W2   (64x256 @ 256x256)": (lambda: torch.bmm(a, w2, out=z2), m * b * h * h),
        "hidden weight grad  a^T @ dz  (256x64 @ 64x256)": (
            lambda: torch.bmm(a.transpose(1, 2), dz2, out=g2),
            m * b * h * h,
        ),
        "hidden input grad  dz @ W2^T  (64x256 @ 256x256)": (
            lambda: torch.bmm(dz2, w2.transpose(1, 2), out=z2),
            m * b * h * h,
        ),
    }
    out = {}
    for name, (fn, macs) in cases.items():
        ms = best_ms(fn)
        out[name] = {"ms": ms, "gflops": 2 * macs / ms / 1e6}
    return out


def adam(n_models: int, sizes: list[int]) -> dict[str, float]:
    shapes = [(i, o) for i, o in itertools.pairwise(sizes)]
    params = []
    for i, o in shapes:
        params += [torch.randn(n_models, i, o) * 0.03, torch.zeros(n_models, o)]
    total = sum(p.numel() for p in params)
    p, g = torch.randn(total), torch.randn(total)
    mm, vv, step = torch.zeros(total), torch.zeros(total), torch.zeros(())

    def fused() -> None:
        torch._fused_adam_(
            [p], [g], [mm], [vv], [], [step], amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999,
            weight_decay=0.0, eps=1e-8, maximize=False,
        )  # fmt: skip

    fused_ms = best_ms(fused)
    add_ms = best_ms(lambda: p.add_(g, alpha=1e-9))
    net = M.BatchedMLP(params, BF)
    for t in net.grads:
        t.normal_()
    opt = M.StackedAdam(net, 1e-3)
    stacked_ms = best_ms(opt.step)
    return {
        "elements": float(total),
        "fused_fp32_one_call_ms": fused_ms,
        "fused_ns_per_element": fused_ms * 1e6 / total,
        "fused_GB_per_s_at_28_bytes": 28 * total / fused_ms / 1e6,
        "add_GB_per_s_12_bytes": 12 * total / add_ms / 1e6,
        "stacked_adam_bf16_ms": stacked_ms,
    }


def noise(n: int, b: int, d: int) -> float:
    """One student step's noise, drawn as the trainer draws it."""
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x = torch.empty(n, b, d)
    cfg = M.MnistConfig(models=n)
    return best_ms(lambda: M._noise_batch(gens, b, d, cfg, out=x))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument(
        "--loop-seconds",
        type=float,
        default=None,
        help="the loop of separate models' time from bench_mnist.py (same N, epochs, threads)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, arms, b, d, h, o = args.models, len(M.STUDENT_ARMS), 64, 784, 256, 13
    sizes = [d, h, h, o]
    n_train = 4000
    steps = math.ceil(n_train / b)  # per epoch, teachers and students alike
    info: dict[str, Any] = {
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "loadavg_start": os.getloadavg(),
    }
    info["peak_bf16_gflops"] = matmul_peak(BF)
    info["gemms"] = gemms(n, arms, b, d, h)
    info["adam_students"] = adam(n * arms, sizes)
    info["noise_ms_per_step"] = noise(n, b, d)

    # the lower bound for bench_mnist.py's workload (1 teacher epoch, 1 student epoch)
    cfg = M.MnistConfig(models=n, epochs=1, progress=False)
    gflop = flops(cfg, sizes, n_train)["total"] / 1e9
    per_model = sum(i * o_ + o_ for i, o_ in itertools.pairwise(sizes))
    updates = steps * per_model * (n + n * arms)  # teacher steps + student steps, every parameter
    # the same FLOPs at the rate each matmul shape reaches here (the output layer's small matmuls are put at
    # the hidden layer's rates, which they do not beat: this stays a lower bound)
    rate = {k.split("  ")[0]: v["gflops"] for k, v in info["gemms"].items()}
    fwd_rows = n * n_train + n * arms * n_train + n * n_train  # teacher training, students, teacher on noise
    bwd_rows = n * n_train + n * arms * n_train
    hid = h * h + h * o
    gemm_shapes_s = (
        fwd_rows * 2 * d * h / rate["first layer forward"]
        + bwd_rows * 2 * d * h / rate["first layer weight grad"]
        + fwd_rows * 2 * hid / rate["hidden forward"]
        + bwd_rows * 2 * hid / rate["hidden weight grad"]
        + bwd_rows * 2 * hid / rate["hidden input grad"]
    ) / 1e9
    floor = {
        "gemm_s_at_peak": gflop / info["peak_bf16_gflops"],
        "adam_s_at_fused_rate": updates * info["adam_students"]["fused_ns_per_element"] / 1e9,
        "noise_s": steps * info["noise_ms_per_step"] / 1000,
    }
    floor["total_s"] = sum(floor.values())
    info["gemm_s_at_measured_shape_rates"] = gemm_shapes_s
    info["floor_with_shape_rates_s"] = floor["total_s"] - floor["gemm_s_at_peak"] + gemm_shapes_s
    info["useful_gflop"] = gflop
    info["adam_updates"] = updates
    info["floor"] = floor
    if args.loop_seconds:
        info["loop_seconds"] = args.loop_seconds
        info["five_x_needs_s"] = args.loop_seconds / 5
        info["left_for_everything_else_s"] = args.loop_seconds / 5 - floor["total_s"]
        info["left_with_shape_rates_s"] = args.loop_seconds / 5 - info["floor_with_shape_rates_s"]
    info["loadavg_end"] = os.getloadavg()
    return emit(info, args.json)


if __name__ == "__main__":
    main()
