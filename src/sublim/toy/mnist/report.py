"""Figures, the HTML report and the printed table of a run."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sublim.runs import atomic_write_bytes, atomic_write_text
from sublim.toy.mnist.config import ARMS, STUDENT_ARMS
from sublim.toy.mnist.summary import _fmt_ci, accuracy_table


# ------------------------------------------------------------------------------------ figures, report
def _save_png(fig: Any, path: Path) -> None:
    """Render to memory, then write atomically: a run killed while drawing leaves the previous figure whole
    (savefig straight to the path left a truncated PNG beside a complete results.json)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


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
    _save_png(fig, out / files["accuracy_png"])
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
    _save_png(fig, out / files["alignment_png"])
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
