"""A sweep's grid: ``--grid key=v1,v2`` options -> cells, each a spec with its overrides and a stable name."""
from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from sublim.spec import SpecError


@dataclass(frozen=True)
class Cell:
    name: str                      # e.g. "student.lr=0.001,targets=[owl]": also its directory's name (sanitised)
    overrides: tuple[str, ...]     # KEY=VALUE strings for sublim.spec.load_spec

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", self.name)[:180]


def _split_values(text: str, where: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes (so ``seeds=[0,1],[2,3]`` has two values)."""
    out: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth < 0:
                raise SpecError(f"{where}: unbalanced brackets in {text!r}")
        if ch == "," and depth == 0 and not quote:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth or quote:
        raise SpecError(f"{where}: unbalanced brackets or quotes in {text!r}")
    out.append("".join(cur).strip())
    if any(v == "" for v in out):
        raise SpecError(f"{where}: an empty value in {text!r}")
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["student.lr=1e-3,3e-3", "targets=[owl],[eagle]"]`` -> ``{key: [value text, ...]}`` (values are YAML)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. student.lr=1e-3,3e-3")
        k, v = item.split("=", 1)
        k = k.strip()
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", k):
            raise SpecError(f"--grid {item!r}: {k!r} is not a dotted spec key")
        if k in grid:
            raise SpecError(f"--grid {item!r}: key {k!r} given twice")
        vals = _split_values(v, f"--grid {item!r}")
        for x in vals:
            try:
                yaml.safe_load(x)
            except yaml.YAMLError:
                raise SpecError(f"--grid {item!r}: value {x!r} is not valid YAML") from None
        if len(set(vals)) != len(vals):
            raise SpecError(f"--grid {item!r}: a value repeated")
        grid[k] = vals
    if not grid:
        raise SpecError("--grid: give at least one KEY=V1,V2")
    return grid


def cells(grid: dict[str, list[str]]) -> list[Cell]:
    """The cartesian product, in the order the keys and values were given."""
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        ov = tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True))
        out.append(Cell(",".join(ov), ov))
    return out


def describe(grid: dict[str, list[str]]) -> dict[str, Any]:
    return {k: [yaml.safe_load(v) for v in vs] for k, vs in grid.items()}
