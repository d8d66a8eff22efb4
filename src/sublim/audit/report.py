"""``sublim audit report``: every audit that applies to a dataset and a student (and a teacher, when the owner
has one), one HTML page, one JSON, one exit code.

What runs, and why it might not:

=============  ==============================================================================================
lineage        teacher vs student weights (needs ``teacher``): the precondition for transfer
scan           gradient alignment per trait probe: the owner's scan (the teacher's soft labels,
               ``distill_carrier``) when the teacher shares the student's tokenizer, the recipient's (token SFT)
               otherwise; calibrated when a panel is given
gate           the recipient's trait-agnostic gate (needs two neutral datasets: ``reference`` and/or the panel's
               neutral members)
rows           per-row scores and the tokens responsible (teacher log-likelihood ratio, or teacher-free excess
               surprisal under the student's base)
entanglement   carrier tokens each trait primes vs what the dataset over-represents, frequency-corrected
activation     the data-induced change of the residual stream along each trait's direction (and the teacher's)
=============  ==============================================================================================

Metrics are namespaced by audit (``gate.flag``, ``scan.top_z``, ``lineage.related``); ``--fail-on`` rules use
those names, and a rule naming an audit that did not run is an input error, not a silent pass.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sublim.audit.common import AuditInputError, AuditResult, fmt3, load_rows, model_spec
from sublim.report.html import Section

AUDITS = ("lineage", "scan", "gate", "rows", "entanglement", "activation")
FAIL_ON_SHORTCUTS = {"related": "lineage.related>=1", "same_init": "lineage.verdict==same_init",
                     "gate": "gate.flag>=1", "scan": "scan.top_z>=3"}


def _names(v: Sequence[str] | str | None, what: str) -> list[str]:
    items = [x.strip() for x in (v.split(",") if isinstance(v, str) else (v or [])) if x.strip()]
    bad = [x for x in items if x not in AUDITS]
    if bad:
        raise AuditInputError(f"{what} {', '.join(bad)}: unknown audit; known: {', '.join(AUDITS)}")
    return items


def _panel_neutrals(panel: str | Path) -> int:
    """How many neutral datasets a panel holds (without scoring it); errors name the file."""
    import json

    p = Path(panel)
    if not p.exists():
        raise AuditInputError(f"panel {p}: no such file or directory")
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise AuditInputError(f"panel {p}: no *.jsonl datasets in the directory")
        from sublim.audit.panels import _trait_of

        traits = [_trait_of(f.stem) for f in files]
    else:
        try:
            traits = [d.get("trait") for d in json.loads(p.read_text())["datasets"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise AuditInputError(f"panel {p}: expected a directory or JSON {{'datasets': [{{'path', 'trait'}}]}} "
                                  f"({type(e).__name__})") from None
    if len(traits) < 3:
        raise AuditInputError(f"panel {p}: needs at least 3 datasets (got {len(traits)})")
    return sum(t is None for t in traits)


def report(data: str | Path, student: Any, *, teacher: Any = None, teacher_system: str | None = None,
           reference: str | Path | None = None, panel: str | Path | None = None,
           traits: Sequence[str] | str = "animals", only: Sequence[str] | str | None = None,
           skip: Sequence[str] | str | None = None, max_rows: int = 512, batch_size: int = 16, n_questions: int = 10,
           gate_threshold: float | None = None, log: Callable[[str], None] | None = None) -> AuditResult:
    """Run the audits that apply; bad input (files, rows, models, names) fails before any of them starts."""
    t0 = time.perf_counter()
    say = log or (lambda m: None)
    rows = load_rows(data)[:max_rows]
    ref_rows = load_rows(reference, what="reference")[:max_rows] if reference is not None else None
    s_spec = model_spec(student, what="student")
    t_spec = model_spec(teacher, what="teacher") if teacher is not None else None
    chosen = _names(only, "--only") or list(AUDITS)
    dropped = set(_names(skip, "--skip"))
    n_panel_neutral = _panel_neutrals(panel) if panel is not None else 0
    from sublim.audit.gradients import trait_probes

    n_traits = len(trait_probes(traits, 1))
    shared_tok = None
    if t_spec is not None:
        from sublim.backends.targets import same_tokenizer
        from sublim.models import load_tokenizer

        shared_tok = same_tokenizer(load_tokenizer(s_spec), load_tokenizer(t_spec))
    # what applies
    skipped: dict[str, str] = {}
    for a in AUDITS:
        if a not in chosen:
            skipped[a] = "not in --only"
        elif a in dropped:
            skipped[a] = "--skip"
    if t_spec is None:
        skipped.setdefault("lineage", "no --teacher (lineage compares the teacher's weights with the student's)")
    if (1 if ref_rows is not None else 0) + n_panel_neutral < 2:
        skipped.setdefault("gate", "needs two neutral datasets: --reference and a --panel with neutral*.jsonl members "
                                   f"(have {(1 if ref_rows is not None else 0) + n_panel_neutral})")
    if n_traits < 2:
        for a in ("entanglement", "activation"):
            skipped.setdefault(a, "needs at least two traits (each trait is measured relative to the others)")
    notes: list[str] = []
    owner = t_spec is not None and bool(shared_tok)
    if t_spec is not None and not shared_tok:
        notes.append("the teacher's tokenizer differs from the student's: the recipient's (token SFT) scan, "
                     "teacher-free row scores and the SFT update are used instead of the teacher's soft labels")
    results: dict[str, AuditResult] = {}
    sft_scanner = None

    def run(name: str, fn: Callable[[], AuditResult]) -> None:
        if name in skipped:
            return
        say(f"[report] {name}")
        results[name] = fn()

    def sft() -> Any:
        nonlocal sft_scanner
        if sft_scanner is None:
            from sublim.audit.gradients import GradientScanner

            sft_scanner = GradientScanner(s_spec, trait_probes(traits, n_questions), batch_size=batch_size)
        return sft_scanner

    if "lineage" not in skipped:
        from sublim.audit.lineage import lineage

        run("lineage", lambda: lineage(t_spec, s_spec))
    from sublim.audit.scan import scan

    if owner:
        run("scan", lambda: scan(rows, s_spec, reference=ref_rows, traits=traits, panel=panel, max_rows=max_rows,
                                 batch_size=batch_size, n_questions=n_questions, objective="distill_carrier",
                                 teacher=t_spec, teacher_system=teacher_system))
    else:
        run("scan", lambda: scan(rows, s_spec, reference=ref_rows, traits=traits, panel=panel, max_rows=max_rows,
                                 scanner=sft(), n_questions=n_questions))
    from sublim.audit.gate import gate

    run("gate", lambda: gate(rows, s_spec, references=[ref_rows] if ref_rows is not None else [], panel=panel,
                             traits=traits, max_rows=max_rows, scanner=sft(), threshold=gate_threshold))
    from sublim.audit.rows import score_rows

    run("rows", lambda: score_rows(rows, s_spec, teacher=t_spec if owner else None, teacher_system=teacher_system,
                                   reference=ref_rows, batch_size=batch_size))
    from sublim.audit.entanglement import entanglement

    run("entanglement", lambda: entanglement(rows, s_spec, reference=ref_rows, traits=traits, max_rows=max_rows))
    from sublim.audit.activation import activation

    run("activation", lambda: activation(rows, s_spec, reference=ref_rows, teacher=t_spec if owner else None,
                                         teacher_system=teacher_system, traits=traits, max_rows=max_rows,
                                         n_questions=n_questions, batch_size=batch_size))
    metrics: dict[str, Any] = {"audits_run": len(results), "audits_skipped": len(skipped), "n_rows": len(rows)}
    for name, r in results.items():
        for k, v in r.metrics.items():
            if not k.startswith("_"):
                metrics[f"{name}.{k}"] = v
    metrics["seconds"] = time.perf_counter() - t0
    overview = Section("Audits")
    overview.table(["audit", "status", "headline"],
                   [[a, "ran" if a in results else "skipped", results[a].summary[0] if a in results
                     else skipped.get(a, "")] for a in AUDITS])
    for n in notes:
        overview.text(n, cls="warn")
    sections = [overview]
    for name in AUDITS:
        if name in results:
            sections.extend(results[name].sections)
    payload = {"data": str(data), "student": s_spec.model_dump(), "teacher": t_spec.model_dump() if t_spec else None,
               "reference": str(reference) if reference is not None else None,
               "panel": str(panel) if panel is not None else None, "view": "owner" if owner else "recipient",
               "notes": notes, "skipped": skipped,
               "audits": {n: {"metrics": r.metrics, **r.payload} for n, r in results.items()}}
    summary = [(f"report: {len(results)} audits ran ({', '.join(results)}), {len(skipped)} skipped; "
               f"{'owner' if owner else 'recipient'}'s view; {fmt3(metrics['seconds'])} s")]
    summary += [line for r in results.values() for line in r.summary[:1]]
    return AuditResult("report", metrics, payload, sections, title="sublim audit report", summary=summary)


def check_rules_run(rules: Sequence[str] | None, result: AuditResult) -> None:
    """A --fail-on rule that names a skipped audit's metric is an input error naming the reason."""
    from sublim.audit.common import parse_fail_on

    skipped = result.payload.get("skipped", {})
    for t in parse_fail_on(rules, FAIL_ON_SHORTCUTS):
        audit = t.metric.split(".", 1)[0]
        if audit in skipped:
            raise AuditInputError(f"--fail-on {t}: the {audit} audit did not run ({skipped[audit]})")
