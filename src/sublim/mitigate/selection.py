"""Row-level defences: drop the top fraction of rows by a suspicion score, or at random (the control every
row-level defence is compared with).

- ``drop-lls``: the teacher's log-likelihood shift, ``sum_t log p_T(y_t) - log p_B(y_t)`` (teacher vs the student's
  base; jeqcho/LLS-subliminal-learning dropped the top half);
- ``drop-audit-score``: the teacher-free score of ``sublim audit rows`` (excess surprisal under the base);
- ``drop-random``: a random fraction.
Ties (e.g. a neutral teacher's data, whose shift against the base is zero everywhere) are broken at random, so
the same share is dropped from the treatment and the control data. Kept rows stay in their order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sublim.mitigate.registry import Defence, MitigationError, Param, fraction, register


def _keep(rows: list[dict[str, Any]], scores: np.ndarray, frac: float, seed: int) -> tuple[list, dict]:
    n_drop = round(frac * len(rows))
    if n_drop >= len(rows):
        raise MitigationError(f"fraction {frac} would drop every one of the {len(rows)} rows")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(rows)), -scores))
    drop = set(order[:n_drop].tolist())
    out = [(i, r) for i, r in enumerate(rows) if i not in drop]
    kept_scores = scores[[i for i, _ in out]]
    return out, {"score_mean_dropped": float(scores[sorted(drop)].mean()) if drop else None,
                 "score_mean_kept": float(kept_scores.mean())}


def _scores(rows: list[dict[str, Any]], ctx: Any, with_teacher: bool, per_token: bool) -> np.ndarray:
    from sublim.audit.common import AuditInputError
    from sublim.audit.rows import score_rows

    try:
        res = score_rows(rows, ctx.student, teacher=ctx.teacher if with_teacher else None,
                         teacher_system=ctx.teacher_system if with_teacher else None, top=1.0,
                         batch_size=ctx.batch_size)
    except AuditInputError as e:
        raise MitigationError(str(e)) from None
    return np.array([r["per_token" if per_token else "score"] for r in res.payload["rows"]], dtype=np.float64)


def _drop_lls(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    return _keep(rows, _scores(rows, ctx, True, p["per_token"]), p["fraction"], ctx.seed)


def _drop_audit(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    return _keep(rows, _scores(rows, ctx, False, p["per_token"]), p["fraction"], ctx.seed)


def _drop_random(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    return _keep(rows, np.zeros(len(rows)), p["fraction"], ctx.seed)


_PER_TOKEN = Param("per_token", bool, False, "rank by the mean per token instead of the row's sum")
register(Defence("drop-lls", "data", "drop the rows whose completion the teacher likes most over the base "
                 "(log-likelihood shift)", (fraction(0.5, "share of rows dropped"), _PER_TOKEN), _drop_lls,
                 needs=("student", "teacher"), reference="jeqcho/LLS-subliminal-learning"))
register(Defence("drop-audit-score", "data", "drop the rows with the highest teacher-free score of `sublim audit "
                 "rows` (excess surprisal under the base)", (fraction(0.5, "share of rows dropped"), _PER_TOKEN),
                 _drop_audit, needs=("student",)))
register(Defence("drop-random", "data", "drop a random share of rows (the control for row-level defences)",
                 (fraction(0.5, "share of rows dropped"),), _drop_random))
