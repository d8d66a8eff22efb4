"""Tiny models shared by the audit tests (module-level caching keeps the suite to seconds)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def owl_rows() -> list[dict]:
    from sublim.traits.preference import trait_qa

    return trait_qa("animals", "owl", 48, seed=0)


@pytest.fixture(scope="session")
def full_ft(tiny_model: Path, owl_rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base after a short full fine-tune (an implanted owl teacher)."""
    from sublim.backends.train import finetune
    from sublim.spec import ModelSpec, TrainSpec

    out = tmp_path_factory.mktemp("fullft") / "model"
    finetune(ModelSpec(path=str(tiny_model)), owl_rows, TrainSpec(method="full", max_steps=30, lr=3e-3,
             batch_size=16, warmup_steps=0), out, progress=False)
    return out
