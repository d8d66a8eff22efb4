"""The defence registry: every defence by name, its kind, its parameters (typed, with ranges) and what it needs.

Kinds: ``data`` (rows in, rows out: applied to every teacher's kept rows between filtering and training, to the
treatment and the control data alike), ``train`` (changes how the students train: a TrainSpec update and possibly
another student base), ``generation`` (changes how every teacher samples: a GenerationSpec update). A spec names a
defence and plain parameters (:class:`sublim.spec.MitigationSpec`); :func:`check_mitigations` validates them when
the spec loads, before anything runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sublim.registry import Registry

Kind = Literal["data", "train", "generation"]


class MitigationError(ValueError):
    """Bad input to a defence (unknown name, parameter out of range, a row without the fields it needs); the
    message is one line naming the defence, parameter, file or row."""


@dataclass(frozen=True)
class Param:
    """One parameter: a type (float, int, str, bool, list), a default, and a range or a set of choices."""

    name: str
    type: type
    default: Any
    help: str
    lo: float | None = None            # inclusive lower bound (numbers)
    hi: float | None = None            # inclusive upper bound
    lo_open: bool = False              # lower bound excluded
    choices: tuple[Any, ...] | None = None

    def check(self, defence: str, value: Any) -> Any:
        where = f"defence {defence!r}: parameter {self.name!r}"
        if value is None and self.default is None:  # an optional parameter left unset
            return None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is list and isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, self.type) or (self.type in (int, float) and isinstance(value, bool)):
            raise MitigationError(f"{where} must be a {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise MitigationError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        num: Any = value
        if self.lo is not None and (num < self.lo or (self.lo_open and num == self.lo)):
            raise MitigationError(f"{where} must be {'>' if self.lo_open else '>='} {self.lo:g}, got {value!r}")
        if self.hi is not None and num > self.hi:
            raise MitigationError(f"{where} must be <= {self.hi:g}, got {value!r}")
        return value


def fraction(default: float, help: str = "share of the chosen unit (rows or tokens) it acts on") -> Param:
    return Param("fraction", float, default, help, lo=0.0, hi=1.0, lo_open=True)


@dataclass(frozen=True)
class Defence:
    """A registered defence. ``apply`` by kind:

    - data: ``apply(rows, params, ctx) -> (rows, changes)`` (``ctx``: :class:`sublim.mitigate.apply.Context`)
    - train: ``apply(train_spec, params) -> (train_spec, student_base | None)``
    - generation: ``apply(generation_spec, params) -> generation_spec``"""

    name: str
    kind: Kind
    summary: str
    params: tuple[Param, ...]
    apply: Callable[..., Any]
    needs: tuple[str, ...] = ()          # data defences: "student" (its base and tokenizer), "teacher", "model"
    fields: tuple[str, ...] = ("prompt", "completion")  # row fields a data defence reads
    reference: str = ""                  # where the idea comes from
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """The full parameter dict (defaults filled in); MitigationError on unknown or out-of-range values."""
        params = dict(params or {})
        known = {p.name: p for p in self.params}
        for k in params:
            if k not in known:
                raise MitigationError(f"defence {self.name!r}: unknown parameter {k!r}; known: "
                                      f"{', '.join(known) or '(none)'}")
        return {p.name: p.check(self.name, params.get(p.name, p.default)) for p in self.params}


DEFENCES: Registry[Defence] = Registry("defence")


def register(defence: Defence) -> Defence:
    DEFENCES.add(defence.name, defence)
    return defence


def get(name: str) -> Defence:
    """The defence called ``name``; MitigationError listing the known ones otherwise."""
    _load_all()
    if name not in DEFENCES:
        raise MitigationError(f"unknown defence {name!r}; known: {', '.join(sorted(DEFENCES.names()))}")
    return DEFENCES.get(name)


def check_mitigations(specs: Sequence[Any]) -> None:
    """Validate a spec's ``mitigations`` (names, parameters, distinct labels); raises ValueError naming the item."""
    seen: set[str] = set()
    for i, m in enumerate(specs):
        try:
            get(m.name).resolve(m.params)
        except MitigationError as e:
            raise ValueError(f"mitigations.{i}: {e}") from None
        label = m.arm_label
        if label in seen:
            raise ValueError(f"mitigations.{i}: label {label!r} is used twice (give one a `label`)")
        if ":" in label:
            raise ValueError(f"mitigations.{i}: label {label!r} may not contain ':'")
        seen.add(label)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["fraction=0.2", "action=mask"]`` -> ``{"fraction": 0.2, "action": "mask"}`` (values read as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise MitigationError(f"--param {it!r}: expected KEY=VALUE")
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise MitigationError(f"--param {it!r}: the value is not valid YAML") from None
    return out


def describe() -> list[str]:
    """One line per defence: name, kind, parameters with defaults, summary."""
    _load_all()
    lines = []
    for n in DEFENCES.names():
        d = DEFENCES.get(n)
        ps = ", ".join(f"{p.name}={p.default!r}" for p in d.params)
        lines.append(f"{n:24s} {d.kind:10s} {d.summary}" + (f"  [{ps}]" if ps else ""))
    return lines


def _load_all() -> None:
    """Import the modules that register defences (cheap: no torch at import)."""
    from sublim.mitigate import canonical, regenerate, selection, student, tokens  # noqa: F401
