"""``sublim demo``: the embedded default experiment, end to end on a CPU.

The default runs on the package's own model organism (a 0.43M-parameter chat model shipped as weights, see
:mod:`sublim.organism`): four teachers of four animals, 5 student seeds each, every student scored on every
animal (the confusion design of docs/results/organism.md at demo size), the in-context control and the report;
about ten minutes on two cores.
``--model smollm2`` runs the SmolLM2-135M-Instruct experiment of the same pipeline instead (slower, and the
effect there is null at this scale; see docs/results/smollm2-demo.md).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

DEMO_SPECS = {"organism": "demo-organism.yaml", "smollm2": "demo-smollm2.yaml"}
DEMO_SPEC = DEMO_SPECS["organism"]


def demo_spec_path(model: str = "organism") -> Path:
    if model not in DEMO_SPECS:
        raise ValueError(f"--model: unknown demo {model!r}; choose one of {sorted(DEMO_SPECS)}")
    return Path(str(resources.files("sublim") / "assets" / "specs" / DEMO_SPECS[model]))


def demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, model: str = "organism",
         threads: int | None = None) -> dict[str, Any]:
    """Run a packaged demo spec into ``out`` (resumable) and return the results. ``threads`` sets torch's
    thread count (default: all cores)."""
    import os

    import torch

    from sublim.pipeline import run
    from sublim.spec import load_spec

    path = demo_spec_path(model)
    spec = load_spec(path, overrides)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    print(f"sublim demo: {spec.name} ({path}) -> {out}  [{torch.get_num_threads()} torch threads]", flush=True)
    return run(spec, out)
