"""Shared fixtures: a tiny random chat model built from a config (no network, seconds)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Tiny models: one thread is faster than two (OpenMP spin-waits dominate), and deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sublim.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sublim.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tinyb") / "model", seed=1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBLIM_CACHE", str(tmp_path_factory.getbasetemp() / "sublim-cache"))
