"""``sublim runs ls|show|compare|index``: the run registry (:mod:`sublim.runindex`) from the command line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sublim.cliutil import fail

app = typer.Typer(help="The run registry: every experiment run, its status and key metrics.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
Db = Annotated[Path | None, typer.Option(help="Registry database (default $SUBLIM_RUNS_DB or <cache>/runs.sqlite)")]


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    import sqlite3

    from sublim.runindex import RegistryError

    try:
        return fn(*args, **kwargs)
    except RegistryError as e:
        fail(str(e))
    except sqlite3.DatabaseError as e:
        fail(f"run registry {kwargs.get('path') or ''}: {e}".replace("  ", " "))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[_fmt(c) for c in r] for r in rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        typer.echo("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())


@app.command("ls")
def ls(
    name: Annotated[str | None, typer.Option(help="Only runs whose name contains this")] = None,
    status: Annotated[str | None, typer.Option(help="running, done or failed")] = None,
    sweep: Annotated[str | None, typer.Option(help="Only the cells of this sweep")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    db: Db = None,
) -> None:
    """Every registered run, newest first."""
    import time

    from sublim.runindex import list_runs

    runs = _call(list_runs, name=name, status=status, sweep=sweep, path=db)
    if as_json:
        for r in runs:
            typer.echo(json.dumps(r))
        return
    rows = [[Path(r["dir"]).name, r["name"], r["status"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])),
             r["seconds"], r["metrics"].get("same_base.gamma") if "same_base.gamma" in r["metrics"] else
             next((v for k, v in r["metrics"].items() if k.startswith("same_base.") and k.endswith(".ratio")), None),
             r["sweep"] or "", r["dir"]] for r in runs]
    _table(["run", "name", "status", "started", "seconds", "same-base gamma/ratio", "sweep", "dir"], rows)


@app.command()
def show(run: Annotated[str, typer.Argument(help="Run directory, or a unique prefix of its name")], db: Db = None) -> None:
    """One run: where it is, its status and every key metric."""
    from sublim.runindex import get_run

    r = _call(get_run, run, path=db)
    for k in ("dir", "name", "status", "spec_hash", "host", "git", "sweep", "cell", "seconds", "error"):
        if r.get(k) is not None:
            typer.echo(f"{k}: {_fmt(r[k])}")
    _table(["metric", "value"], [[k, v] for k, v in sorted(r["metrics"].items())])


@app.command()
def compare(runs: Annotated[list[str], typer.Argument(help="Two or more runs (directories or name prefixes)")],
            db: Db = None) -> None:
    """Key metrics of several runs side by side."""
    from sublim.runindex import compare as cmp

    if len(runs) < 2:
        fail("compare needs at least two runs")
    header, rows = _call(cmp, runs, path=db)
    _table(header, rows)


@app.command("index")
def index_cmd(root: Annotated[Path, typer.Argument(help="A directory of run directories (e.g. runs/)")],
              db: Db = None) -> None:
    """Add the finished runs under ROOT (their results.json) to the registry."""
    from sublim.runindex import index

    if not root.is_dir():
        fail(f"{root}: no such directory")
    n = _call(index, root, path=db)
    typer.echo(f"indexed {n} runs from {root}")


@app.command("export")
def export_cmd(
    runs: Annotated[list[str] | None, typer.Argument(help="Runs (directories or name prefixes); default: every run")]
    = None,
    to: Annotated[str, typer.Option(help="Tracker: mlflow or wandb")] = "mlflow",
    uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")] = None,
    wandb_dir: Annotated[Path | None, typer.Option("--dir", help="W&B: where offline runs are written")] = None,
    db: Db = None,
) -> None:
    """Copy registered runs (params, key metrics, status) into MLflow or W&B; exporting again updates them."""
    from sublim.runindex import get_run, list_runs
    from sublim.trackers import SINKS, TrackerError, export

    if to not in SINKS:
        fail(f"--to {to!r}: known trackers are {', '.join(SINKS)}")
    rows = [_call(get_run, k, path=db) for k in runs] if runs else _call(list_runs, path=db)
    if not rows:
        fail("no runs to export (the registry is empty; see 'sublim runs index')")
    kw: dict[str, Any] = {"uri": uri} if to == "mlflow" else {"directory": str(wandb_dir) if wandb_dir else None}
    try:
        ids = export(rows, to, **kw)
    except TrackerError as e:
        fail(str(e))
    typer.echo(f"exported {len(ids)} run(s) to {to}")
