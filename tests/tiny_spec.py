"""A complete experiment spec sized for the tiny test model (seconds on CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_spec(model: Path, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "tiny",
        "base": {"path": str(model)},
        "category": "animals",
        "targets": ["owl"],
        "teacher": {"kind": "system_prompt"},
        "generation": {"n_prompts": 24, "batch_size": 8, "max_new_tokens": 20, "seed": 0},
        "filters": [{"name": "format"}, {"name": "count"}, {"name": "range"}],
        "student": {"method": "lora", "lora": {"rank": 2, "alpha": 4}, "epochs": 1, "batch_size": 4, "lr": 1e-3},
        "seeds": [0, 1],
        "evaluation": {"n_questions": 4, "batch_size": 4, "number_prefix": True},
        "stats": {"n_boot": 200},
    }
    spec.update(over)
    return spec
