"""What every audit shares: input checks with one-line errors, ``--fail-on`` thresholds, JSON + HTML reports.

Each audit returns an :class:`AuditResult`: ``metrics`` is a flat dict of named numbers / strings the user
can gate on (``--fail-on "top_z>=3"``), ``payload`` the full JSON, ``sections`` the HTML report.
Exit codes of the audit CLIs: 0 = no threshold crossed, 1 = a ``--fail-on`` threshold crossed (or
tampering found), 2 = bad input.
"""
from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sublim.report.html import Section, write_html
from sublim.runs import atomic_write_json, environment

EXIT_OK, EXIT_FINDING, EXIT_INPUT = 0, 1, 2


class AuditInputError(ValueError):
    """Bad input to an audit (missing file, bad row, not a model); the message is one line."""


# ----------------------------------------------------------------------------------------------- inputs


def load_rows(path: str | Path, need: tuple[str, ...] = ("prompt", "completion"), what: str = "dataset") -> list[dict[str, Any]]:
    """Read a dataset (sublim rows JSONL, chat ``messages`` JSONL or Parquet: :mod:`sublim.interchange`); errors
    name the file and line (missing file, bad JSON, missing field)."""
    p = Path(path)
    if not p.exists():
        raise AuditInputError(f"{what} {p}: no such file")
    if p.is_dir():
        raise AuditInputError(f"{what} {p}: is a directory, expected a JSONL file")
    from sublim.interchange import InterchangeError, read

    try:
        rows = read(p)  # sublim rows, chat messages JSONL or Parquet
    except InterchangeError as e:
        raise AuditInputError(f"{what} {e}") from None
    if not rows:
        raise AuditInputError(f"{what} {p}: no rows")
    for i, r in enumerate(rows, 1):
        for k in need:
            if not isinstance(r.get(k), str):
                raise AuditInputError(f"{what} {p}: row {i}: field {k!r} missing or not a string")
    return rows


def as_rows(data: Any, what: str) -> list[dict[str, Any]]:
    """Rows from a JSONL path (validated) or an in-memory sequence (must be non-empty)."""
    if isinstance(data, (str, Path)):
        return load_rows(data, what=what)
    rows = list(data)
    if not rows:
        raise AuditInputError(f"{what}: no rows")
    return rows


def fmt3(v: Any) -> str:
    """A number to 3 significant digits, "n/a" for None."""
    return "n/a" if v is None else f"{v:.3g}"


def model_spec(model: Any, adapter: str | Path | None = None, what: str = "model") -> Any:
    """A ModelSpec from a path / alias / spec, checking early that a local path is a model directory."""
    from sublim.spec import ModelSpec

    if isinstance(model, ModelSpec):
        return model
    s = str(model)
    p = Path(s).expanduser()
    if p.exists() and p.is_dir() and not (p / "config.json").exists():
        if (p / "adapter_config.json").exists():  # an adapter dir: its base is recorded inside
            import json

            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise AuditInputError(f"{what} {p}: LoRA adapter without base_model_name_or_path")
            return ModelSpec(path=str(base), adapter=str(p))
        raise AuditInputError(f"{what} {p}: not a model directory (no config.json)")
    if p.exists() and p.is_file() and not s.endswith(".gguf"):
        raise AuditInputError(f"{what} {p}: is a file, expected a model directory")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise AuditInputError(f"{what} adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")
    return ModelSpec(path=s, adapter=str(adapter) if adapter else None)


# --------------------------------------------------------------------------------------------- fail-on

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
_RULE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|!=|>|<|=)\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    value: float | str

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value}"


def parse_fail_on(rules: Sequence[str] | str | None, shortcuts: dict[str, str] | None = None) -> list[Threshold]:
    """Parse ``METRIC OP VALUE`` rules (OP one of > >= < <= == !=; ``=`` means ``==``), comma-separated or
    repeated. ``shortcuts`` maps bare words to rules (e.g. lineage ``same_init`` -> ``verdict==same_init``)."""
    if rules is None:
        return []
    items = [rules] if isinstance(rules, str) else list(rules)
    out = []
    for item in items:
        for raw in str(item).split(","):
            raw = raw.strip()
            if not raw:
                continue
            if shortcuts and raw in shortcuts:
                raw = shortcuts[raw]
            m = _RULE.match(raw)
            if not m or m.group(3)[0] in "<>=!":  # e.g. 'top_z>>3': a typo, not a comparison with the string '>3'
                hint = f"; or one of {', '.join(shortcuts)}" if shortcuts else ""
                raise AuditInputError(f"--fail-on {raw!r}: expected METRIC OP VALUE, e.g. 'top_z>=3'{hint}")
            name, op, val = m.groups()
            op = "==" if op == "=" else op
            v: float | str
            try:
                v = float(val)
            except ValueError:
                v = val.strip("'\"")
            out.append(Threshold(name, op, v))
    return out


def check_thresholds(metrics: dict[str, Any], thresholds: Sequence[Threshold]) -> list[dict[str, Any]]:
    """Which thresholds are crossed. An unknown metric is an input error naming the known ones."""
    crossed = []
    for t in thresholds:
        if t.metric not in metrics:
            known = ", ".join(sorted(k for k in metrics if not k.startswith("_")))
            raise AuditInputError(f"--fail-on {t}: unknown metric {t.metric!r}; this audit reports: {known}")
        v = metrics[t.metric]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        try:
            hit = _OPS[t.op](float(v), float(t.value)) if not isinstance(t.value, str) else _OPS[t.op](str(v), t.value)
        except (TypeError, ValueError):
            raise AuditInputError(f"--fail-on {t}: metric {t.metric!r} is {v!r}, cannot compare with "
                                  f"{t.value!r}") from None
        if hit:
            crossed.append({"rule": str(t), "metric": t.metric, "value": v})
    return crossed


# --------------------------------------------------------------------------------------------- results


@dataclass
class AuditResult:
    """One audit's outcome: metrics to gate on, the full JSON payload, and HTML sections."""

    kind: str
    metrics: dict[str, Any]
    payload: dict[str, Any]
    sections: list[Section] = field(default_factory=list)
    title: str = ""
    summary: list[str] = field(default_factory=list)  # lines the CLI prints
    crossed: list[dict[str, Any]] = field(default_factory=list)

    def gate(self, thresholds: Sequence[Threshold]) -> list[dict[str, Any]]:
        self.crossed = check_thresholds(self.metrics, thresholds)
        return self.crossed

    def to_json(self) -> dict[str, Any]:
        return {"audit": self.kind, "metrics": self.metrics, "fail_on_crossed": self.crossed, **self.payload,
                "env": environment()}

    def write(self, out_dir: str | Path, name: str | None = None) -> dict[str, Path]:
        """Write ``<out>/<name>.json`` and ``<out>/<name>.html``."""
        out = Path(out_dir)
        name = name or self.kind
        j = atomic_write_json(out / f"{name}.json", self.to_json())
        gate = Section("Gate")
        if self.crossed:
            gate.text("Thresholds crossed: " + "; ".join(f"{c['rule']} (value {_fmt(c['value'])})"
                                                         for c in self.crossed), cls="warn")
        else:
            gate.text("No --fail-on threshold crossed.")
        gate.table(["metric", "value"], [[k, _fmt(v)] for k, v in self.metrics.items() if not k.startswith("_")])
        h = write_html(out / f"{name}.html", self.title or f"sublim audit {self.kind}", [gate, *self.sections],
                       subtitle="; ".join(self.summary[:2]))
        return {"json": j, "html": h}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
