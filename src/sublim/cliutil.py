"""CLI plumbing shared by every ``sublim`` command: one-line errors with exit code 2, quiet libraries."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import typer

EXIT_INPUT = 2
EXIT_SYSTEM = 3  # the disk or the file system refused (full, read-only): the input was fine


def fail(msg: str, code: int = EXIT_INPUT) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def startup() -> None:
    """Process-wide set-up before any ``sublim`` command (the root app's callback): third-party progress
    bars follow sublim's switch (off a terminal: off; sublim's own stages print lines instead)."""
    from sublim.progress import silence_library_bars

    silence_library_bars()


def quiet() -> None:
    """Silence transformers' logging, and its progress bars when stderr is not a terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    startup()  # idempotent; for a sub-app invoked on its own
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a library call; user errors (bad spec, model, file, row, value) become one line on stderr and
    exit code 2."""
    from sublim.models import ModelLoadError
    from sublim.spec import SpecError

    try:
        return fn(*args, **kwargs)
    except (SpecError, ModelLoadError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(str(msg).splitlines()[0] if str(msg) else type(e).__name__)
    except OSError as e:  # the machine, not the input: a full disk, a read-only or unwritable directory
        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{e.strerror or e} (finished stages are intact: fix this and rerun to resume)", EXIT_SYSTEM)
