"""CLI plumbing shared by ``sublim audit`` and ``sublim provenance``: one-line errors, exit codes, writing."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from sublim.audit.common import EXIT_FINDING, EXIT_INPUT, AuditInputError, AuditResult, parse_fail_on

DEFAULT_OUT = Path("sublim-audit")


def fail(msg: str, code: int = EXIT_INPUT) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a library call; user errors become one line on stderr and exit code 2."""
    from sublim.audit.provenance import ProvenanceError
    from sublim.models import ModelLoadError
    from sublim.spec import SpecError

    try:
        return fn(*args, **kwargs)
    except (AuditInputError, ProvenanceError, SpecError, ModelLoadError, FileNotFoundError, KeyError,
            ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(str(msg).splitlines()[0] if str(msg) else type(e).__name__)


def finish(result: AuditResult, fail_on: list[str] | None, out: Path, shortcuts: dict[str, str] | None = None,
           name: str | None = None) -> None:
    """Gate on --fail-on, write JSON + HTML, print the summary; exit 1 when a threshold is crossed."""
    thresholds = guard(parse_fail_on, fail_on, shortcuts)
    guard(result.gate, thresholds)
    paths = result.write(out, name)
    for line in result.summary:
        typer.echo(line)
    typer.echo(f"report: {paths['html']}  json: {paths['json']}")
    if result.crossed:
        for c in result.crossed:
            typer.echo(f"FAIL: {c['rule']} (value {c['value']})", err=True)
        raise typer.Exit(EXIT_FINDING)
