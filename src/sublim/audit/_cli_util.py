"""CLI plumbing shared by ``sublim audit`` and ``sublim provenance``: one-line errors, exit codes, writing."""
from __future__ import annotations

from pathlib import Path

import typer

from sublim.audit.common import EXIT_FINDING, AuditResult, parse_fail_on
from sublim.cliutil import fail, guard, quiet  # noqa: F401 - re-exported for the audit CLIs

DEFAULT_OUT = Path("sublim-audit")


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
