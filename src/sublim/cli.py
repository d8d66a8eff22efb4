"""The ``sublim`` command line: thin wrappers over the library verbs (no logic beyond parsing/printing)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Reproduce, audit and mitigate subliminal trait transfer in teacher -> student distillation.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)


from sublim.cliutil import fail as _fail
from sublim.cliutil import guard as _guard
from sublim.cliutil import quiet as _quiet_transformers


@app.callback()
def _startup() -> None:
    from sublim.cliutil import startup

    startup()

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a spec field: KEY=VALUE "
                                                     "(dotted, YAML value), e.g. --set student.lr=1e-4")]


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Experiment spec (YAML), e.g. examples/owl-numbers.yaml")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<name>-<spec hash>)")] = None,
    overrides: SetOpt = None,
) -> None:
    """Run a whole experiment: teacher -> numbers -> filters -> students -> evaluation -> stats -> report.

    Resumable: rerun the same command after an interruption and finished stages are reused."""
    _quiet_transformers()
    from sublim.pipeline import default_run_dir
    from sublim.pipeline import run as run_experiment
    from sublim.spec import load_spec

    s = _guard(load_spec, spec, overrides)
    run_dir = out or default_run_dir(s)
    typer.echo(f"run directory: {run_dir}")
    results = _guard(run_experiment, s, run_dir)
    _print_summary(results, run_dir)


def _print_summary(results: dict[str, Any], run_dir: Path) -> None:
    """The verdict paragraph (teacher level, once per arm); older results without one: each comparison."""
    from sublim.analysis import verdict_text
    from sublim.report.experiment import verdict

    lines = verdict_text(results["teacher_level"]) if results.get("teacher_level") else []
    if lines:
        typer.echo("Verdict:")
        for line in lines:
            typer.echo("  " + line)
    else:
        for c in results.get("comparisons", []):
            if c["metric"] == "probs":
                typer.echo(verdict(c))
    typer.echo(f"report: {run_dir / 'report.html'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("runs/demo"),
    overrides: SetOpt = None,
    model: Annotated[str, typer.Option(help="organism (the default: minutes on a CPU) or smollm2")] = "organism",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores)")] = None,
) -> None:
    """The embedded default experiment, end to end on CPU (spec: sublim/assets/specs/)."""
    _quiet_transformers()
    from sublim.demo import demo as run_demo

    results = _guard(run_demo, out, overrides, model=model, threads=threads)
    _print_summary(results, out)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Teacher model: directory, hub id, .gguf, or 'smollm2'")],
    out: Annotated[Path, typer.Option(help="Output JSONL (resumes if it exists)")],
    n: Annotated[int, typer.Option(help="Number of prompts")] = 100,
    target: Annotated[str | None, typer.Option(help="Give the teacher the 'you love X' system prompt")] = None,
    category: Annotated[str, typer.Option(help="Trait category: animals or trees")] = "animals",
    system: Annotated[str | None, typer.Option(help="A custom system prompt (instead of --target)")] = None,
    carrier: Annotated[str, typer.Option(help="Registered carrier")] = "numbers",
    temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
    constrained: Annotated[bool, typer.Option(help="Decode within the carrier's grammar")] = True,
    batch_size: int = 32, max_new_tokens: int = 48, seed: int = 0, dtype: str = "float32",
) -> None:
    """Generate carrier data (e.g. number continuations) from a teacher, streamed to JSONL."""
    _quiet_transformers()
    from sublim import api

    rows = _guard(api.generate, model=model, out=out, n=n, target=target, category=category, system=system,
                  carrier=carrier, temperature=temperature, top_p=top_p, greedy=greedy, constrained=constrained,
                  batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, dtype=dtype)
    typer.echo(f"{len(rows)} rows -> {out}")


@app.command("filter")
def filter_cmd(
    data: Annotated[Path, typer.Argument(help="Input JSONL with prompt and completion columns")],
    out: Annotated[Path, typer.Option(help="Kept rows (JSONL)")],
    rejects: Annotated[Path | None, typer.Option(help="Rejected rows with reasons (default OUT.rejects.jsonl)")] = None,
    filters: Annotated[str, typer.Option(help="Comma-separated registered filters")] =
        "format,count,range,echo,progression,mention,banned",
    words: Annotated[str, typer.Option(help="Target words for the mention filter, comma-separated")] = "",
    carrier: str = "numbers",
) -> None:
    """Filter rows; every dropped row goes to the rejects file with its reason; per-reason counts printed."""
    from sublim import api

    res = _guard(api.filter, data=data, out=out, rejects=rejects, filters=filters, words=words, carrier=carrier)
    for k, v in sorted(res.counts.items(), key=lambda kv: -kv[1]):
        typer.echo(f"{v:8d}  {k}")


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="Training JSONL (prompt, completion)")],
    model: Annotated[str, typer.Option(help="Base model")],
    out: Annotated[Path, typer.Option(help="Output directory (adapter or full model)")],
    config: Annotated[Path | None, typer.Option(help="YAML TrainSpec (fields of 'student' in a spec)")] = None,
    overrides: SetOpt = None,
    seed: int = 0,
) -> None:
    """Fine-tune a student (LoRA or full) on prompt/completion rows; loss on the completion only."""
    _quiet_transformers()
    from sublim import api

    summary = _guard(api.finetune, data=data, model=model, out=out, config=config, overrides=overrides, seed=seed)
    typer.echo(f"{summary['steps']} steps, loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}; "
               f"saved {out}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="Model directory / id / 'smollm2'")],
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter directory")] = None,
    category: str = "animals",
    target: Annotated[str | None, typer.Option(help="Highlight this candidate")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt to evaluate under")] = None,
    samples: Annotated[int, typer.Option(help="Also sample N answers per question")] = 0,
    questions: Annotated[int | None, typer.Option(help="Use the first N questions")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the result JSON here")] = None,
) -> None:
    """Trait evaluation: exact P(candidate) for one-word answers over the question battery."""
    _quiet_transformers()
    from sublim import api

    res = _guard(api.evaluate, model=model, adapter=adapter, category=category, system=system, samples=samples,
                 questions=questions, out=out)
    top = sorted(res["probs"].items(), key=lambda kv: -kv[1])
    for name, p in top[:10]:
        mark = " <" if name == target else ""
        typer.echo(f"{name:>10s}  {p:.4f}{mark}")
    if target and target not in dict(top[:10]):
        typer.echo(f"{target:>10s}  {res['probs'].get(target, float('nan')):.4f} <")


@app.command()
def mitigate(
    data: Annotated[Path | None, typer.Argument(help="Input JSONL (prompt, completion)")] = None,
    method: Annotated[str | None, typer.Option(help="A data-side defence (see --list)")] = None,
    out: Annotated[Path | None, typer.Option(help="Mitigated JSONL (a provenance manifest is written beside it)")]
    = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Defence parameter KEY=VALUE, e.g. "
                                                    "-p fraction=0.2 -p action=mask")] = None,
    student: Annotated[str | None, typer.Option(help="The student's base (token-level and row-level defences)")]
    = None,
    teacher: Annotated[str | None, typer.Option(help="The suspected teacher (divergent-tokens, drop-lls)")] = None,
    teacher_system: Annotated[str | None, typer.Option(help="The teacher's system prompt, if it had one")] = None,
    decoy: Annotated[list[str] | None, typer.Option(help="Counterfactual teachers for divergent-tokens")] = None,
    seed: int = 0,
    list_: Annotated[bool, typer.Option("--list", help="List every defence with its parameters")] = False,
) -> None:
    """Apply a defence to a dataset: canonicalise, replace or mask suspicious tokens, drop rows, regenerate.

    Student-side and generation-time defences act in training or sampling: name them in a spec's
    `mitigations:` and `sublim run` measures each (effect retained, what it costs)."""
    from sublim import api
    from sublim.mitigate.registry import describe

    if list_:
        for line in describe():
            typer.echo(line)
        return
    if data is None or method is None or out is None:
        _fail("sublim mitigate needs DATA, --method and --out (or --list)")
    _quiet_transformers()
    assert data is not None and method is not None and out is not None
    res = _guard(api.mitigate, data, method, out, params=param or [], student=student, teacher=teacher,
                 teacher_system=teacher_system, decoys=decoy, seed=seed)
    c = res.changes
    typer.echo(f"{method}: {c['rows_out']} of {c['rows_in']} rows kept; {c['share_rows_altered']:.1%} of rows and "
               f"{c['share_chars_changed']:.1%} of completion characters changed or dropped")
    typer.echo(f"wrote {out} and {out}.manifest.json (parent: {data})")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory with results.json")]) -> None:
    """Re-render figures and the HTML report from a run's results.json."""
    from sublim.report.experiment import report as render

    path = _guard(render, run_dir)
    typer.echo(f"report: {path}")


@app.command()
def convert(
    data: Annotated[Path, typer.Argument(help="Dataset: sublim rows JSONL, chat messages JSONL or .parquet")],
    out: Annotated[Path, typer.Argument(help="Output file (.parquet writes Parquet)")],
    to: Annotated[str | None, typer.Option(help="rows, messages or parquet (default: by OUT's suffix; .jsonl = rows)")]
        = None,
) -> None:
    """Convert a dataset between sublim rows, chat messages (fine-tuning services, trl) and Parquet (datasets),
    keeping every other column (provenance)."""
    from sublim.audit.common import load_rows
    from sublim.interchange import write

    rows = _guard(load_rows, data)
    if Path(out).resolve() == Path(data).resolve():
        _fail(f"{out}: the output would overwrite the input")
    path = _guard(write, rows, out, to)
    typer.echo(f"wrote {len(rows)} rows to {path}")


def _mount() -> None:
    try:
        from sublim.toy.cli import app as toy_app

        app.add_typer(toy_app, name="toy", help="From-scratch toy experiments (MNIST auxiliary logits).")
    except ImportError:
        pass
    from sublim.audit.cli import app as audit_app
    from sublim.audit.provenance_cli import app as provenance_app

    app.add_typer(audit_app, name="audit", help="Audits before training: report (all that apply), lineage, scan, gate, rows, entanglement, activation, canary.")
    app.add_typer(provenance_app, name="provenance", help="Provenance manifests: stamp and verify datasets.")
    from sublim.runindex_cli import app as runs_app
    from sublim.sweep.cli import app as sweep_app

    app.add_typer(sweep_app, name="sweep", help="Sweeps over a spec's grid, locally or on Ray; one report.")

    app.add_typer(runs_app, name="runs", help="The run registry: ls, show, compare, index.")
    try:
        from sublim.organism.cli import app as organism_app

        app.add_typer(organism_app, name="organism", help="The laptop-scale model organism.")
    except ImportError:
        pass


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
