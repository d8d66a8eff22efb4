"""sublim: reproduce, audit and mitigate subliminal trait transfer in teacher -> student distillation.

The public verbs (each also a CLI command): ``run``, ``generate``, ``filter``, ``finetune``, ``evaluate``,
``report``, ``demo``, ``load_spec``."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "demo", "evaluate", "filter", "finetune", "generate", "load_spec", "report", "run"]


def run(spec: Any, run_dir: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Run an experiment from an ExperimentSpec, a YAML path or a dict; see :mod:`sublim.pipeline`."""
    from pathlib import Path

    from sublim.pipeline import default_run_dir
    from sublim.pipeline import run as _run
    from sublim.spec import ExperimentSpec, load_spec

    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(data=spec) if isinstance(spec, dict) else load_spec(spec)
    return _run(spec, Path(run_dir) if run_dir else default_run_dir(spec), **kwargs)


def __getattr__(name: str) -> Any:  # lazy: importing sublim stays cheap (no torch)
    if name in ("generate", "filter", "finetune", "evaluate"):
        from sublim import api

        return getattr(api, name)
    if name == "report":
        from sublim.report.experiment import report

        return report
    if name == "demo":
        from sublim.demo import demo

        return demo
    if name == "load_spec":
        from sublim.spec import load_spec

        return load_spec
    raise AttributeError(name)
