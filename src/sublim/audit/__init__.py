"""Model-level audits of a dataset and a teacher/student pair, runnable before a fine-tune and in CI.

One module per audit, each with a function of the same name: ``lineage.lineage`` (shared initialisation?),
``scan.scan`` (gradient alignment of a training step with trait probes), ``rows.score_rows`` (per-row
suspicion scores), ``canary.canary`` (short fine-tunes, seed-level intervals), and ``provenance``
(``stamp`` / ``verify`` sidecar manifests with a Merkle root; ``manifest_for_generated`` for the pipeline).
Each audit returns an :class:`~sublim.audit.common.AuditResult` (metrics to gate on, JSON, HTML).
``sublim.audit.score_rows``, ``stamp``, ``verify`` and ``manifest_for_generated`` are re-exported lazily."""
from __future__ import annotations

from typing import Any

__all__ = ["manifest_for_generated", "score_rows", "stamp", "verify"]

_WHERE = {"score_rows": "rows", "stamp": "provenance", "verify": "provenance", "manifest_for_generated": "provenance"}


def __getattr__(name: str) -> Any:  # lazy: importing sublim.audit stays cheap (no torch)
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"sublim.audit.{_WHERE[name]}"), name)
    raise AttributeError(name)
