"""``sublim audit lineage|scan|rows|canary|gate|entanglement|activation|report``: model-level audits of a dataset and a teacher/student pair.

Each command writes ``<out>/<command>.json`` and ``<out>/<command>.html`` and exits 1 when a ``--fail-on``
rule (``METRIC OP VALUE``, e.g. ``top_z>=3``; repeat or comma-separate) is crossed, 2 on bad input.
Mount in the main CLI with ``app.add_typer(audit_app, name="audit")``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sublim.audit._cli_util import DEFAULT_OUT, finish, guard, quiet

app = typer.Typer(help="Audit a dataset and a teacher/student pair for subliminal-transfer risk (CI-gateable).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

FailOn = Annotated[list[str] | None, typer.Option("--fail-on", help="Exit 1 when METRIC OP VALUE holds, "
                                                     "e.g. 'top_z>=3' (repeatable; metrics are listed in the JSON)")]
Out = Annotated[Path, typer.Option(help="Directory for <command>.json and <command>.html")]
Data = Annotated[Path, typer.Argument(help="Dataset JSONL (prompt, completion)")]
Threads = Annotated[int, typer.Option(help="torch threads")]
TeacherSystem = Annotated[str | None, typer.Option(help="The teacher's system prompt, if prompted")]


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


@app.command()
def lineage(
    teacher: Annotated[str, typer.Argument(help="Teacher model directory (or a LoRA adapter directory)")],
    student: Annotated[str, typer.Argument(help="Student model directory (or a LoRA adapter directory)")],
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Same init? same family? unrelated? Declared evidence plus per-tensor and embedding-row agreement.

    Shortcuts for --fail-on: same_init, related (same_init or same_family), unrelated."""
    quiet()
    _threads(threads)
    from sublim.audit.lineage import FAIL_ON_SHORTCUTS
    from sublim.audit.lineage import lineage as run

    res = guard(run, teacher, student)
    finish(res, fail_on, out, FAIL_ON_SHORTCUTS)


Student = Annotated[str, typer.Option("--student", help="Student model directory / id (or LoRA adapter directory)")]
Traits = Annotated[str, typer.Option(help="Trait categories (animals,trees) or single traits (animals:owl)")]


@app.command()
def scan(
    data: Data,
    student: Student,
    reference: Annotated[Path | None, typer.Option(help="Reference dataset from a neutral teacher")] = None,
    traits: Traits = "animals",
    panel: Annotated[Path | None, typer.Option(help="Calibration panel: a directory of <trait>.jsonl datasets "
                                                  "(neutral*.jsonl = neutral) or a panel.json")] = None,
    build_panel: Annotated[str | None, typer.Option(help="Build (or reuse, cached per base) a decoy panel: "
                                                       "comma-separated traits of the first category")] = None,
    panel_rows: Annotated[int, typer.Option(help="Rows per decoy dataset when building a panel")] = 300,
    panel_teacher: Annotated[str, typer.Option(help="How decoy teachers are implanted: lora or full")] = "lora",
    max_rows: Annotated[int, typer.Option(help="Use at most this many rows of each dataset")] = 512,
    batch_size: Annotated[int, typer.Option(help="Rows per gradient batch (one per-batch estimate each)")] = 16,
    questions: Annotated[int, typer.Option(help="Probe questions per trait")] = 10,
    params: Annotated[str | None, typer.Option(help="Regex: only these parameters (default all)")] = None,
    objective: Annotated[str, typer.Option(help="The step the student will take: sft (tokens; data and student "
                                                "only) or distill_carrier / distill_full (the teacher's soft labels: "
                                                "the owner's audit, needs --teacher)")] = "sft",
    teacher: Annotated[str | None, typer.Option(help="The teacher whose soft labels the student distils")] = None,
    teacher_system: TeacherSystem = None,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Gradient alignment of a training step on DATA with each trait probe (no training run).

    Calibrated by a panel of datasets from other trait teachers when one is given. Useful --fail-on
    rules: 'top_z>=3' (calibrated), 'max_diff_lo>0' (some trait's difference to the reference is positive)."""
    quiet()
    _threads(threads)
    from sublim.audit.scan import build_decoy_panel
    from sublim.audit.scan import scan as run

    pan: Path | None = panel
    if build_panel:
        if panel is not None:
            guard(_bad, "give --panel or --build-panel, not both")
        cat = traits.split(",")[0].split(":")[0]
        pan = guard(build_decoy_panel, student, cat, [t.strip() for t in build_panel.split(",") if t.strip()],
                    n_rows=panel_rows, method=panel_teacher, log=lambda m: typer.echo(m, err=True))
    res = guard(run, data, student, reference=reference, traits=traits, panel=pan, max_rows=max_rows,
                batch_size=batch_size, n_questions=questions, params=params, objective=objective, teacher=teacher,
                teacher_system=teacher_system)
    finish(res, fail_on, out)


def _bad(msg: str) -> None:
    from sublim.audit.common import AuditInputError

    raise AuditInputError(msg)


@app.command()
def rows(
    data: Data,
    student: Student,
    teacher: Annotated[str | None, typer.Option(help="Suspected teacher (shares the student's tokenizer)")] = None,
    teacher_system: TeacherSystem = None,
    reference: Annotated[Path | None, typer.Option(help="Neutral reference dataset: rows get z-scores")] = None,
    top: Annotated[float, typer.Option(help="Flag this fraction of rows (highest scores)")] = 0.05,
    z_threshold: Annotated[float | None, typer.Option(help="Flag rows with z >= this instead (needs --reference)")]
        = None,
    max_rows: Annotated[int | None, typer.Option(help="Score at most this many rows")] = None,
    batch_size: int = 16,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Per-row suspicion scores and the tokens responsible; all scores go to <out>/rows.scores.jsonl.

    With --teacher: log-likelihood ratio teacher vs student. Without: excess surprisal under the student's
    base and divergence tokens (where the base's greedy decode differs). E.g. --fail-on 'max_z>=6'."""
    quiet()
    _threads(threads)
    from sublim.audit.rows import score_rows, write_scores

    res = guard(score_rows, data, student, teacher=teacher, teacher_system=teacher_system, reference=reference,
                top=top, z_threshold=z_threshold, max_rows=max_rows, batch_size=batch_size)
    p = write_scores(res, out / "rows.scores.jsonl")
    typer.echo(f"scores: {p}")
    finish(res, fail_on, out)


@app.command()
def canary(
    data: Data,
    student: Student,
    reference: Annotated[list[Path], typer.Option(help="Reference dataset from a neutral teacher (repeatable: with "
                                                      "2+, also a dataset-level test against their spread)")],
    traits: Traits = "animals",
    n_rows: Annotated[int, typer.Option("--rows", help="Rows sampled per fine-tune")] = 256,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (one student per arm per seed)")] = "0,1,2",
    config: Annotated[Path | None, typer.Option(help="YAML TrainSpec for the short fine-tunes")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="TrainSpec override KEY=VALUE, "
                                                           "e.g. --set lr=1e-3")] = None,
    questions: Annotated[int | None, typer.Option(help="Use the first N battery questions")] = None,
    keep: Annotated[Path | None, typer.Option(help="Keep the canary adapters in this directory")] = None,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Short LoRA fine-tunes on DATA and on the reference, several seeds; trait battery before and after.

    E.g. --fail-on 'top_diff_lo>0' (some trait rose with a seed-level interval above zero), or with three or more
    --reference, --fail-on 'top_dataset_lo>0' (it rose more than neutral datasets differ from each other)."""
    quiet()
    _threads(threads)
    from sublim.audit.canary import canary as run

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        seed_list = []
        guard(_bad, f"--seeds {seeds!r}: expected comma-separated integers")
    tr = guard(_train_spec, config, overrides)
    res = guard(run, data, student, reference if len(reference) > 1 else reference[0], traits=traits, n_rows=n_rows, seeds=seed_list, train=tr,
                n_questions=questions, work_dir=keep, log=lambda m: typer.echo(m, err=True))
    finish(res, fail_on, out)


def _train_spec(config: Path | None, overrides: list[str] | None) -> object:
    import yaml

    from sublim.audit.canary import default_train
    from sublim.spec import SpecError, TrainSpec, parse_overrides, set_path

    cfg = default_train().model_dump(mode="json")
    if config is not None:
        if not config.exists():
            raise FileNotFoundError(f"{config}: no such file")
        cfg.update(yaml.safe_load(config.read_text()) or {})
    for k, v in parse_overrides(overrides):
        set_path(cfg, k.removeprefix("student."), v)
    try:
        return TrainSpec.model_validate(cfg)
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError -> one line
        raise SpecError(f"canary train config: {str(e).splitlines()[1:3]}") from None


Reference = Annotated[Path | None, typer.Option(help="Reference dataset from a neutral teacher")]
MaxRows = Annotated[int, typer.Option(help="Use at most this many rows of each dataset")]


@app.command()
def gate(
    data: Data,
    student: Student,
    reference: Annotated[list[Path] | None, typer.Option(help="Neutral reference dataset (repeatable)")] = None,
    panel: Annotated[Path | None, typer.Option(help="Panel directory or panel.json: its neutral*.jsonl members join "
                                                  "the references, its decoys calibrate the threshold")] = None,
    threshold: Annotated[float | None, typer.Option(help="Fixed ratio threshold instead of the panel's")] = None,
    traits: Traits = "animals",
    max_rows: MaxRows = 512,
    batch_size: int = 16,
    questions: Annotated[int, typer.Option(help="Probe questions per trait")] = 10,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """The recipient's trait-agnostic gate: distance of the data's scan vector from neutral data.

    Needs two neutral datasets (references and the panel's neutral members). E.g. --fail-on 'flag>=1'."""
    quiet()
    _threads(threads)
    from sublim.audit.gate import gate as run

    res = guard(run, data, student, references=list(reference or []), panel=panel, traits=traits, max_rows=max_rows,
                batch_size=batch_size, n_questions=questions, threshold=threshold)
    finish(res, fail_on, out)


@app.command()
def entanglement(
    data: Data,
    student: Student,
    reference: Reference = None,
    traits: Traits = "animals",
    max_rows: MaxRows = 256,
    prime_rows: Annotated[int, typer.Option(help="Rows on which each trait's priming shift is measured")] = 64,
    min_count: Annotated[int, typer.Option(help="Carrier tokens seen fewer times are left out")] = 5,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Does the data over-represent the carrier tokens a trait primes? (frequency-corrected)"""
    quiet()
    _threads(threads)
    from sublim.audit.entanglement import entanglement as run

    res = guard(run, data, student, reference=reference, traits=traits, max_rows=max_rows, prime_rows=prime_rows,
                min_count=min_count)
    finish(res, fail_on, out)


@app.command()
def activation(
    data: Data,
    student: Student,
    reference: Reference = None,
    teacher: Annotated[str | None, typer.Option(help="The teacher (its soft labels drive the update; teacher - base "
                                                     "is projected too)")] = None,
    teacher_system: TeacherSystem = None,
    traits: Traits = "animals",
    max_rows: MaxRows = 256,
    questions: Annotated[int, typer.Option(help="Battery questions per direction")] = 10,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Residual-stream audit: the data-induced update projected on each trait's direction."""
    quiet()
    _threads(threads)
    from sublim.audit.activation import activation as run

    res = guard(run, data, student, reference=reference, teacher=teacher, teacher_system=teacher_system, traits=traits,
                max_rows=max_rows, n_questions=questions)
    finish(res, fail_on, out)


@app.command()
def report(
    data: Data,
    student: Student,
    teacher: Annotated[str | None, typer.Option(help="The teacher, when you have it (the owner's view)")] = None,
    teacher_system: TeacherSystem = None,
    reference: Reference = None,
    panel: Annotated[Path | None, typer.Option(help="Calibration panel (directory of <trait>.jsonl and "
                                                  "neutral*.jsonl, or panel.json)")] = None,
    traits: Traits = "animals",
    only: Annotated[str | None, typer.Option(help="Run only these audits (comma-separated)")] = None,
    skip: Annotated[str | None, typer.Option(help="Skip these audits (comma-separated)")] = None,
    gate_threshold: Annotated[float | None, typer.Option(help="Fixed gate ratio threshold")] = None,
    max_rows: MaxRows = 512,
    batch_size: int = 16,
    questions: Annotated[int, typer.Option(help="Probe questions per trait")] = 10,
    fail_on: FailOn = None,
    out: Out = DEFAULT_OUT,
    threads: Threads = 1,
) -> None:
    """Every audit that applies (lineage, scan, gate, rows, entanglement, activation): one HTML, one JSON.

    Metrics are named <audit>.<metric> (gate.flag, scan.top_z, lineage.related); shortcuts for --fail-on:
    related, same_init, gate, scan. A rule on an audit that did not run exits 2 with the reason."""
    quiet()
    _threads(threads)
    from sublim.audit.common import parse_fail_on
    from sublim.audit.report import FAIL_ON_SHORTCUTS, check_rules_run
    from sublim.audit.report import report as run
    from sublim.runs import write_jsonl

    guard(parse_fail_on, fail_on, FAIL_ON_SHORTCUTS)  # a malformed rule fails before anything runs
    res = guard(run, data, student, teacher=teacher, teacher_system=teacher_system, reference=reference, panel=panel,
                traits=traits, only=only, skip=skip, max_rows=max_rows, batch_size=batch_size, n_questions=questions,
                gate_threshold=gate_threshold, log=lambda m: typer.echo(m, err=True))
    guard(check_rules_run, fail_on, res)
    if "rows" in res.payload["audits"]:
        typer.echo(f"scores: {write_jsonl(out / 'rows.scores.jsonl', res.payload['audits']['rows']['rows'])}")
    finish(res, fail_on, out, FAIL_ON_SHORTCUTS)
