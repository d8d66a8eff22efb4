"""``sublim demo``: the embedded default experiment, end to end on a CPU."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

DEMO_SPEC = "demo-smollm2.yaml"


def demo_spec_path() -> Path:
    return Path(str(resources.files("sublim") / "assets" / "specs" / DEMO_SPEC))


def demo(out: str | Path = "runs/demo", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the packaged demo spec into ``out`` (resumable) and return the results."""
    from sublim.pipeline import run
    from sublim.spec import load_spec

    spec = load_spec(demo_spec_path(), overrides)
    print(f"sublim demo: {spec.name} ({demo_spec_path()}) -> {out}", flush=True)
    return run(spec, out)
