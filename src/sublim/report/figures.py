"""Figures for the experiment report (PNG).

Uses ``matplotlib.figure.Figure`` with ``FigureCanvasAgg`` directly, never pyplot, so importing or
calling this never changes the backend a user has chosen and needs no display.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sublim.report.arms import METRIC_LABELS, arm_label, arms_in, metric_value, seed_values
from sublim.runs import atomic_write_bytes
from sublim.stats import mean_ci

__all__ = ["ARM_COLORS", "distribution_plot", "specificity_heatmap", "target_bars", "theorem_curves"]

ARM_COLORS: dict[str, str] = {
    "base": "#9e9e9e",
    "teacher": "#6a3d9a",
    "control": "#1f78b4",
    "treatment": "#e31a1c",
    "cross_base_control": "#a6cee3",
    "cross_base_treatment": "#fb9a99",
    "other_base_control": "#cab2d6",
    "other_base_treatment": "#ff7f00",
    "in_context_control": "#b2df8a",
    "in_context": "#33a02c",
}
_EXTRA_COLORS = ("#ff7f00", "#cab2d6", "#b15928", "#fdbf6f", "#17becf", "#bcbd22")


def _color(arm: str, i: int) -> str:
    return ARM_COLORS.get(arm, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _empty(path: str | Path, message: str) -> Path:
    fig = Figure(figsize=(6, 2))
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return _save(fig, path)


def target_bars(
    results: dict[str, Any], path: str | Path, metric: str = "probs", log: bool | None = None
) -> Path:
    """Per target: one bar per arm (base, teacher, control, treatment, cross-base and in-context
    arms when present) = mean across seeds, error bar = seed-level 95% t-interval (absent for one
    seed), dots = the individual seeds. ``log=None`` switches to a log y axis when the positive
    values span more than two orders of magnitude."""
    evaluations: list[dict[str, Any]] = list(results.get("evaluations") or [])
    targets: list[str] = list(results.get("targets") or [])
    arms = arms_in(evaluations)
    # per target, per arm: seed values
    data: dict[str, dict[str, list[float]]] = {
        t: {a: [v for _, v in seed_values(evaluations, a, t, metric)] for a in arms} for t in targets
    }
    present = [a for a in arms if any(data[t][a] for t in targets)]
    if not targets or not present:
        return _empty(path, f"no {metric} values to plot")
    allv = np.array([v for t in targets for a in present for v in data[t][a]], dtype=float)
    pos = allv[allv > 0]
    if log is None:
        log = bool(pos.size and pos.size == allv.size and pos.max() / pos.min() > 100)
    floor = float(pos.min()) / 3 if pos.size else 1e-12

    # base and teachers on their own axis: a teacher's P(target) near 0.7 would flatten the students' effect
    groups = [g for g in ([a for a in present if a in ("base", "teacher")],
                          [a for a in present if a not in ("base", "teacher")]) if g]
    fig = Figure(figsize=(max(6.0, 1.3 * len(targets) * max(1, len(present)) / 2.5 + 3), 4.2))
    axes = fig.subplots(1, len(groups), squeeze=False,
                        gridspec_kw={"width_ratios": [max(1, len(g)) for g in groups]})[0]
    rng = np.random.default_rng(0)  # deterministic jitter
    offset = 0
    for ax, group in zip(axes, groups, strict=True):
        width = 0.8 / len(group)
        for i, arm in enumerate(group):
            for j, t in enumerate(targets):
                vals = data[t][arm]
                if not vals:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                s = mean_ci(vals)
                m = float(s["mean"])
                ax.bar(x, max(m, floor) if log else m, width=width * 0.9, color=_color(arm, offset + i),
                       label=arm_label(arm), alpha=0.85, zorder=2)
                if s["lo"] is not None:
                    lo, hi = float(s["lo"]), float(s["hi"])
                    if log:
                        lo = max(lo, floor)
                    ax.errorbar(x, max(m, floor) if log else m, yerr=[[max(0.0, m - lo)], [max(0.0, hi - m)]],
                                fmt="none", ecolor="black", capsize=3, lw=1, zorder=3)
                jitter = rng.uniform(-width * 0.25, width * 0.25, size=len(vals))
                ys = np.maximum(np.asarray(vals), floor) if log else np.asarray(vals)
                ax.scatter(x + jitter, ys, s=10, color="black", zorder=4, linewidths=0)
        offset += len(group)
        ax.set_xticks(range(len(targets)))
        ax.set_xticklabels(targets)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3, zorder=0)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, frameon=False, loc="upper left")
    axes[0].set_ylabel(f"P(target) [{METRIC_LABELS.get(metric, metric)}]")
    if len(groups) == 2:
        axes[0].set_title("base, teachers", fontsize=9)
        axes[1].set_title("students and in-context (own axis)", fontsize=9)
    fig.suptitle("Target probability per arm: mean across students, 95% t-interval, dots = students "
                 "(every teacher's)", fontsize=10)
    return _save(fig, path)


def _rows(results: dict[str, Any], metric: str) -> tuple[list[str], np.ndarray]:
    """Row labels and (rows, candidates) matrix of per-seed-normalised distributions averaged over seeds."""
    evaluations: list[dict[str, Any]] = list(results.get("evaluations") or [])
    candidates: Sequence[str] = list(results.get("candidates") or [])
    labels: list[str] = []
    rows: list[np.ndarray] = []
    groups: dict[tuple[str, str | None], list[np.ndarray]] = {}
    order = {t: i for i, t in enumerate(results.get("targets") or [])}
    for ev in evaluations:
        vec = np.array([metric_value(ev, metric, c) for c in candidates], dtype=float)  # (n_candidates,)
        if not vec.size or not np.isfinite(vec).any():
            continue
        vec = np.nan_to_num(vec, nan=0.0)
        total = vec.sum()
        if total <= 0:
            continue
        groups.setdefault((str(ev.get("arm")), ev.get("target")), []).append(vec / total)
    for arm in arms_in(evaluations):
        keys = [k for k in groups if k[0] == arm]
        keys.sort(key=lambda k: (k[1] is not None, order.get(str(k[1]), len(order)), str(k[1])))
        for k in keys:
            labels.append(arm_label(arm) + (f": {k[1]}" if k[1] is not None else ""))
            rows.append(np.mean(groups[k], axis=0))
    mat = np.vstack(rows) if rows else np.zeros((0, len(candidates)))
    return labels, mat


def distribution_plot(results: dict[str, Any], path: str | Path, metric: str = "probs") -> Path:
    """Heatmap of the distribution over the candidate list per arm (and target), each model's values
    normalised over the candidates, then averaged across seeds. Target columns are marked."""
    candidates: list[str] = list(results.get("candidates") or [])
    targets = set(results.get("targets") or [])
    labels, mat = _rows(results, metric)
    if not labels or not candidates:
        return _empty(path, f"no {metric} distributions to plot")
    fig = Figure(figsize=(max(6.0, 0.55 * len(candidates) + 3), max(2.5, 0.38 * len(labels) + 1.6)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-12, float(mat.max())))
    ax.set_xticks(range(len(candidates)))
    ax.set_xticklabels([f"*{c}*" if c in targets else c for c in candidates], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    if len(candidates) * len(labels) <= 400:
        vmax = float(mat.max())
        for r in range(mat.shape[0]):
            for c in range(mat.shape[1]):
                v = mat[r, c]
                ax.text(c, r, f"{100 * v:.0f}" if v >= 0.01 else "", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share over candidates")
    ax.set_title(f"Distribution over candidates (%, mean across seeds; {METRIC_LABELS.get(metric, metric)}; "
                 "*target*)", fontsize=10)
    return _save(fig, path)


def specificity_heatmap(
    matrix: Sequence[Sequence[float | None]] | np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str = "Mean log lift: rows = teacher's animal, columns = scored animal",
    zero: str = "control",
) -> Path:
    """K x K heatmap of mean log lifts (e.g. ``confusion_fit(...)["matrix"]``): diverging colormap
    centred at 0 with symmetric limits, so the sign reads at a glance; the diagonal (a teacher's own
    animal, the specific effect) is outlined; values are written in the cells when K <= 12.
    None / nan cells are shown blank. ``zero`` names what a lift of 0 is (the colour bar's label)."""
    mat = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    if mat.ndim != 2 or mat.size == 0:  # (K_rows, K_cols)
        return _empty(path, "no lifts to plot")
    if mat.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"specificity_heatmap: matrix {mat.shape} vs {len(row_labels)} row / "
                         f"{len(col_labels)} column labels")
    finite = mat[np.isfinite(mat)]
    lim = max(1e-6, float(np.abs(finite).max())) if finite.size else 1.0
    nr, nc = mat.shape
    fig = Figure(figsize=(max(4.5, 0.62 * nc + 2.6), max(3.5, 0.5 * nr + 1.8)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(mat), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="equal")
    ax.set_xticks(range(nc))
    ax.set_xticklabels(list(col_labels), rotation=45, ha="right")
    ax.set_yticks(range(nr))
    ax.set_yticklabels(list(row_labels))
    ax.set_xlabel("scored animal")
    ax.set_ylabel("teacher's animal")
    col_index = {c: j for j, c in enumerate(col_labels)}
    for i, r in enumerate(row_labels):
        j = col_index.get(r)
        if j is not None:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2, zorder=3))
    if max(nr, nc) <= 12:
        for i in range(nr):
            for j in range(nc):
                v = mat[i, j]
                if np.isfinite(v):
                    ax.text(j, i, "0.00" if abs(v) < 0.005 else f"{v:+.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"mean log lift (0 = {zero})")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def theorem_curves(traces: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The theorem along training: per traced student, the cosine between its displacement and the teacher's
    (left) and the teacher's implant loss at the student's parameters (right), against student steps."""
    if not traces:
        return _empty(path, "no theorem trace")
    fig = Figure(figsize=(10.0, 3.8))
    ax_c, ax_l = fig.subplots(1, 2)
    for i, tr in enumerate(traces):
        pts = tr.get("points") or []
        label = f"{arm_label(str(tr.get('arm')))} ({tr.get('teacher')})"
        color = _color(str(tr.get("arm")), i)
        style = "-" if "treatment" in str(tr.get("arm")) else "--"
        cs = [(p["step"], p["cosine"]) for p in pts if p.get("cosine") is not None]
        if cs:
            ax_c.plot(*zip(*cs, strict=True), style, color=color, label=label)
        ls = [(p["step"], p["implant_loss"]) for p in pts if p.get("implant_loss") is not None]
        if ls:
            ax_l.plot(*zip(*ls, strict=True), style, color=color, label=label)
    ax_c.axhline(0, color="black", lw=0.8)
    ax_c.set_xlabel("student step")
    ax_c.set_ylabel("cos(student displacement, teacher displacement)")
    ax_l.set_xlabel("student step")
    ax_l.set_ylabel("teacher's implant loss at the student (nats/token)")
    for ax in (ax_c, ax_l):
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=7, frameon=False)
    fig.suptitle("The theorem along training: same-init students should move toward the teacher", fontsize=10)
    return _save(fig, path)
