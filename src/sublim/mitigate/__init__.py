"""Defences against subliminal transfer, each measured for the effect it removes and what it costs.

Registered by name (:data:`DEFENCES`), parameterised, plain data in a spec (``mitigations:``):

- data-side (rows in, rows out; between filtering and training): ``shuffle-within``, ``shuffle-across``,
  ``sort``, ``remap``, ``normalise-format``; ``divergent-tokens``, ``base-shift-tokens`` (replace or mask);
  ``drop-lls``, ``drop-audit-score``, ``drop-random``; ``regenerate-other-family``;
- student-side (how students train): ``weight-decay``, ``l2``, ``sgd``, ``lora-rank``, ``fewer-steps``,
  ``other-init``, ``init-noise``;
- generation-time (how the teacher samples): ``sampling`` (min-p / top-p / temperature).

:func:`mitigate` applies a data-side defence to rows in memory, :func:`mitigate_file` to a JSONL file with a
provenance manifest that names its parent; :mod:`sublim.mitigate.measure` turns an experiment's mitigation
arms into effect retained and costs.
"""
from __future__ import annotations

from sublim.mitigate.apply import Context, Mitigated, mitigate, mitigate_file
from sublim.mitigate.registry import DEFENCES, Defence, MitigationError, Param, check_mitigations, get

__all__ = ["DEFENCES", "Context", "Defence", "Mitigated", "MitigationError", "Param", "check_mitigations", "defences",
           "get", "mitigate", "mitigate_file"]


def defences() -> list[Defence]:
    """Every registered defence, by name."""
    from sublim.mitigate.registry import _load_all

    _load_all()
    return [DEFENCES.get(n) for n in DEFENCES.names()]
