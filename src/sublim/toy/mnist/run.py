"""One run of every arm: data, teachers, students, the theorem, results.json and the report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublim.runs import atomic_write_json, environment
from sublim.stats import compare
from sublim.toy.mnist.config import STUDENT_ARMS, MnistConfig
from sublim.toy.mnist.cpu import auto_threads
from sublim.toy.mnist.inits import (
    derangement,
    init_mlp,
    layer_sizes,
    model_seed,
    stack,
    student_inits,
)
from sublim.toy.mnist.model import evaluate
from sublim.toy.mnist.report import _write_outputs
from sublim.toy.mnist.summary import _ci, _curve_summary, _label
from sublim.toy.mnist.train import _displacement_cos, _pixels, train_students, train_teacher
from sublim.toy.mnist_data import load_digits


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
