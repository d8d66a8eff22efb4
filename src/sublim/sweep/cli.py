"""``sublim sweep run|report``: a grid of experiments, each cell its own resumable run, locally or on Ray."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sublim.cliutil import guard, quiet

app = typer.Typer(help="Sweeps: a grid of experiments (local or Ray), one run directory per cell.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Experiment spec (YAML)")],
    grid: Annotated[list[str], typer.Option(help="KEY=V1,V2 (repeatable; values are YAML, e.g. targets=[owl],[eagle])")],
    out: Annotated[Path, typer.Option(help="Sweep directory (sweep.json, cells/<cell>/)")],
    executor: Annotated[str, typer.Option(help="local (one cell after another), ray, or submitit (Slurm)")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: auto or ray://host:port (default: a local Ray); submitit: "
                                                     "slurm or local (default: Slurm when srun exists)")] = None,
    cpus_per_cell: Annotated[int, typer.Option(help="CPUs (and torch threads) per cell")] = 1,
    retries: Annotated[int, typer.Option(help="Retries of a cell whose worker died (Ray)")] = 2,
) -> None:
    """Run every cell of the grid (finished cells are skipped; unfinished ones resume); exit 1 if a cell failed."""
    quiet()
    from sublim.sweep.run import sweep

    st = guard(sweep, spec, grid, out, executor=executor, address=address, cpus_per_cell=cpus_per_cell,
               retries=retries, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"{st['done']} of {st['total']} cells done in {out}; report: sublim sweep report {out}")
    if st["failed"]:
        raise typer.Exit(1)


@app.command()
def report(out: Annotated[Path, typer.Argument(help="A sweep directory")]) -> None:
    """One table across the cells: the grid's values and each cell's key metrics (HTML and JSON)."""
    from sublim.sweep.report import sweep_report

    rep = guard(sweep_report, out)
    typer.echo(f"report: {rep['html']}")
