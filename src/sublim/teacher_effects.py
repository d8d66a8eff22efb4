"""Teacher-level statistics for a teacher-replicated design: records -> teachers, lifts, and the effect of one
trait on one animal with the teacher as the unit (:func:`teacher_effect`); the specificity fit over several
traits is :mod:`sublim.specificity`.

The unit of a population claim is the *teacher* (an independently implanted teacher model), with
student seeds nested in it (DESIGN.md, "Science rules"): a teacher's students share its data, so
they are not independent draws. Every interval here is across teachers; student seeds only enter
through teacher means (and, for :func:`confusion_fit`, through teacher-clustered standard errors).
"Specific" means a teacher's students gain *its* animal more than the other teachers' students do:
the diagonal lift ``gamma`` of the confusion matrix, not one trait's ratio.

Input records are plain dicts, one per student (or per in-context evaluation)::

    {"teacher": "owl#0", "trait": "owl", "seed": 0, "scores": {"owl": 0.041, "wolf": 0.03, ...}}

``teacher`` is a teacher replicate id, ``trait`` its animal (None for a neutral teacher, i.e. a
control), ``seed`` the student seed nested in the teacher and ``scores`` P(animal) per candidate.
Treated and control records of one arm are passed separately. P is floored at 1e-12 before the log.
Each ``(teacher, seed)`` may occur once (average repeated evaluations of a student first).

All returned dicts are strict JSON: plain floats / ints / lists / dicts, None where undefined.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sublim.stats import compare, mean_ci, permutation_test, welch

__all__ = ["P_FLOOR", "Record", "lifts", "teacher_effect"]

P_FLOOR = 1e-12  # P below this is clamped before the log, so a zero probability gives a finite lift
Record = dict[str, Any]


def _f(x: Any) -> float | None:
    """A plain float, or None when ``x`` is None or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class _Teacher:
    """One teacher's students: ``logp[s, j]`` = log P_student s(animals[j])."""

    id: str
    trait: str | None
    seeds: tuple[Any, ...]
    logp: np.ndarray  # (n_seeds, n_animals)

    @property
    def mean(self) -> np.ndarray:
        """Teacher-level value per animal: mean over its student seeds. (n_animals,)"""
        return np.asarray(self.logp.mean(axis=0))


def _logp(rec: Record, animal: str) -> float:
    scores = rec.get("scores")
    if not isinstance(scores, dict) or animal not in scores or scores[animal] is None:
        raise ValueError(f"record teacher={rec.get('teacher')!r} seed={rec.get('seed')!r}: no score for "
                         f"animal {animal!r} (unknown animal, or the student was not scored on it)")
    p = float(scores[animal])
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"record teacher={rec.get('teacher')!r} seed={rec.get('seed')!r}: P({animal}) = "
                         f"{p!r} is not a finite probability")
    return math.log(max(p, P_FLOOR))


def _teachers(records: Sequence[Record], animals: Sequence[str], role: str) -> list[_Teacher]:
    """Group records by teacher (order of first appearance) and check the role: treated records need
    a trait, control records must have ``trait`` None; a teacher has one trait; no duplicate seeds."""
    if not records:
        raise ValueError(f"no {role} records" + (" (neutral-teacher students are the reference)"
                                                 if role == "control" else ""))
    rows: dict[str, list[Record]] = {}
    traits: dict[str, str | None] = {}
    for rec in records:
        if "teacher" not in rec or rec["teacher"] is None:
            raise ValueError(f"{role} record without a 'teacher' id: {rec!r}")
        tid, trait = str(rec["teacher"]), rec.get("trait")
        if role == "control" and trait is not None:
            raise ValueError(f"control record of teacher {tid!r} has trait {trait!r}; controls are "
                             "neutral teachers (trait None)")
        if role == "treated" and trait is None:
            raise ValueError(f"treated record of teacher {tid!r} has no trait; pass neutral teachers as "
                             "controls")
        if traits.setdefault(tid, trait) != trait:
            raise ValueError(f"teacher {tid!r} has records with traits {traits[tid]!r} and {trait!r}")
        rows.setdefault(tid, []).append(rec)
    out = []
    for tid, recs in rows.items():
        seeds = tuple(r.get("seed") for r in recs)
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"teacher {tid!r}: student seed repeated in {list(seeds)}; average repeated "
                             "evaluations of one student before calling")
        logp = np.array([[_logp(r, a) for a in animals] for r in recs], dtype=float)  # (n_seeds, n_animals)
        out.append(_Teacher(tid, traits[tid], seeds, logp.reshape(len(recs), len(animals))))
    return out


def _check_disjoint(treated: Sequence[_Teacher], controls: Sequence[_Teacher]) -> None:
    both = {t.id for t in treated} & {t.id for t in controls}
    if both:
        raise ValueError(f"teacher ids in both treated and controls: {sorted(both)}")


def _reference(controls: Sequence[_Teacher]) -> np.ndarray:
    """Mean over neutral teachers of each teacher's mean log P (teacher-level first). (n_animals,)"""
    return np.asarray(np.mean([t.mean for t in controls], axis=0))


def lifts(treated: Sequence[Record], controls: Sequence[Record], animals: Sequence[str]) -> dict[str, Any]:
    """Per treated student and animal: lift = log P_student(animal) - reference(animal).

    reference(animal) = mean over neutral teachers of (mean over that teacher's seeds of log P), so a
    neutral teacher with more seeds does not weigh more. Returns ``{"reference": {animal: float},
    "records": [{"teacher", "trait", "seed", "lift": {animal: float}}]}`` (records in input order).
    """
    animals = list(animals)
    tt = _teachers(treated, animals, "treated")
    ct = _teachers(controls, animals, "control")
    _check_disjoint(tt, ct)
    ref = _reference(ct)
    out = []
    for rec in treated:
        lp = np.array([_logp(rec, a) for a in animals]) - ref  # (n_animals,)
        out.append({"teacher": str(rec["teacher"]), "trait": rec.get("trait"), "seed": rec.get("seed"),
                    "lift": {a: float(v) for a, v in zip(animals, lp, strict=True)}})
    return {"reference": {a: float(v) for a, v in zip(animals, ref, strict=True)}, "records": out}


def _level(teachers: Sequence[_Teacher], j: int, conf: float) -> dict[str, Any]:
    """Nested summary of one group at animal column ``j``: teacher values and both levels' spread."""
    vals = np.array([t.mean[j] for t in teachers])  # (n_teachers,)
    ss_within = sum(float(((t.logp[:, j] - t.mean[j]) ** 2).sum()) for t in teachers)
    df_within = sum(t.logp.shape[0] - 1 for t in teachers)
    return {
        "n_teachers": len(teachers),
        "n_seeds": int(sum(t.logp.shape[0] for t in teachers)),
        "mean": float(vals.mean()),
        "mean_ci": mean_ci(vals, conf),
        "sd_between": _f(vals.std(ddof=1)) if vals.size > 1 else None,
        "sd_within": _f(math.sqrt(ss_within / df_within)) if df_within > 0 else None,
        "teachers": [{"teacher": t.id, "value": float(t.mean[j]), "geo_mean_p": float(math.exp(t.mean[j])),
                      "n_seeds": int(t.logp.shape[0])} for t in teachers],
    }


def teacher_effect(
    treated: Sequence[Record], controls: Sequence[Record], animal: str, trait: str | None = None,
    conf: float = 0.95,
) -> dict[str, Any]:
    """Does teaching ``trait`` (default ``animal``) raise log P(animal)? The teacher is the unit.

    Each teacher's value is the mean over its student seeds of log P(animal). Keys: ``animal``,
    ``trait``, ``conf``; ``diff`` (mean over trait teachers - mean over neutral teachers),
    ``diff_ci`` (Welch t across teachers; None with < 2 teachers in a group), ``p_welch``, ``df``;
    ``ratio`` = exp(diff) (ratio of geometric-mean P) and ``ratio_ci``; ``p_perm`` (two-sided) and
    ``p_perm_greater``: permutation of teacher labels (exact up to 100,000 relabelings);
    ``treated`` / ``control``: ``{"n_teachers", "n_seeds", "mean", "mean_ci", "sd_between" (sd of
    teacher values), "sd_within" (pooled within-teacher seed sd), "teachers": [{"teacher", "value",
    "geo_mean_p", "n_seeds"}]}``; ``sd_within`` pooled over both groups; ``student_level``:
    ``{"note", "stats"}`` with :func:`sublim.stats.compare` on per-student P(animal), which treats
    seeds as independent and so ignores the teacher level (shown only for contrast).
    """
    trait = animal if trait is None else trait
    present = {r.get("trait") for r in treated}
    if None in present:
        raise ValueError("treated record without a trait; pass neutral teachers as controls")
    if trait not in present:
        raise ValueError(f"no treated teacher with trait {trait!r} (traits present: "
                         f"{sorted(str(t) for t in present)})")
    mine = _teachers([r for r in treated if r.get("trait") == trait], [animal], "treated")
    ct = _teachers(controls, [animal], "control")
    _check_disjoint(mine, ct)
    tv = np.array([t.mean[0] for t in mine])  # (n_trait_teachers,)
    cv = np.array([t.mean[0] for t in ct])  # (n_neutral_teachers,)
    w = welch(tv, cv, conf)
    lo, hi = _f(w["lo"]), _f(w["hi"])
    ss = sum(float(((t.logp[:, 0] - t.mean[0]) ** 2).sum()) for t in [*mine, *ct])
    dfw = sum(t.logp.shape[0] - 1 for t in [*mine, *ct])
    s_t = np.exp(np.concatenate([t.logp[:, 0] for t in mine]))  # (n_trait_students,) floored P
    s_c = np.exp(np.concatenate([t.logp[:, 0] for t in ct]))  # (n_neutral_students,)
    return {
        "animal": animal,
        "trait": trait,
        "conf": float(conf),
        "diff": _f(w["diff"]),
        "diff_ci": [lo, hi],
        "p_welch": _f(w["p"]),
        "df": _f(w["df"]),
        "ratio": _f(math.exp(w["diff"])),
        "ratio_ci": [None if lo is None else _f(math.exp(lo)), None if hi is None else _f(math.exp(hi))],
        "p_perm": _f(permutation_test(tv, cv)),
        "p_perm_greater": _f(permutation_test(tv, cv, alternative="greater")),
        "treated": _level(mine, 0, conf),
        "control": _level(ct, 0, conf),
        "sd_within": _f(math.sqrt(ss / dfw)) if dfw > 0 else None,
        "student_level": {
            "note": "student seeds treated as independent: ignores the teacher level, for contrast only",
            "stats": compare(s_t, s_c, conf=conf),
        },
    }
