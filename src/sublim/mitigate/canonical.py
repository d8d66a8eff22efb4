"""Canonicalisation defences on number completions: shuffle within a row, shuffle across rows, sort, value
remap, format normalisation. No model needed; each keeps the carrier's format so the filters still pass.

The numbers of a completion are its maximal digit runs; what lies between them (the separator, brackets, a
trailing period) is kept as it was, except by ``normalise-format``.
"""
from __future__ import annotations

import random
import re
from typing import Any

from sublim.mitigate.registry import Defence, MitigationError, Param, register

_DIGITS = re.compile(r"\d+")


def split_numbers(completion: str, row: int) -> tuple[list[str], list[str]]:
    """(the digit runs, the text around them: len(numbers) + 1 pieces); MitigationError if there are none."""
    nums = _DIGITS.findall(completion)
    if not nums:
        raise MitigationError(f"row {row}: completion has no numbers: {completion[:40]!r}")
    gaps = _DIGITS.split(completion)
    return nums, gaps


def join_numbers(nums: list[str], gaps: list[str]) -> str:
    out = [gaps[0]]
    for n, g in zip(nums, gaps[1:], strict=True):
        out += [n, g]
    return "".join(out)


def _row_rng(seed: int, i: int, row: dict[str, Any]) -> random.Random:
    from sublim.runs import sha256_text

    return random.Random(int(sha256_text(f"{seed}\x00{i}\x00{row['prompt']}\x00{row['completion']}")[:16], 16))


def _shuffle_within(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    out = []
    for i, r in enumerate(rows):
        nums, gaps = split_numbers(r["completion"], i)
        _row_rng(ctx.seed, i, r).shuffle(nums)
        out.append((i, {**r, "completion": join_numbers(nums, gaps)}))
    return out, {}


def _shuffle_across(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    split = [split_numbers(r["completion"], i) for i, r in enumerate(rows)]
    pool = [n for nums, _ in split for n in nums]
    random.Random(ctx.seed).shuffle(pool)
    out, k = [], 0
    for i, (r, (nums, gaps)) in enumerate(zip(rows, split, strict=True)):
        out.append((i, {**r, "completion": join_numbers(pool[k:k + len(nums)], gaps)}))
        k += len(nums)
    return out, {"values_pooled": len(pool)}


def _sort(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    out = []
    for i, r in enumerate(rows):
        nums, gaps = split_numbers(r["completion"], i)
        nums = sorted(nums, key=int, reverse=p["order"] == "descending")
        out.append((i, {**r, "completion": join_numbers(nums, gaps)}))
    return out, {}


def _remap(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    """One random bijection of the values 0 .. 10^D - 1 (D: the longest number in the data, at most
    ``max_digits``), applied to every number; a number's length may change, never beyond D digits."""
    split = [split_numbers(r["completion"], i) for i, r in enumerate(rows)]
    d = max(len(str(int(n))) for nums, _ in split for n in nums)
    if d > p["max_digits"]:
        raise MitigationError(f"defence 'remap': a value has {d} digits, more than max_digits {p['max_digits']}")
    perm = list(range(10 ** d))
    random.Random(ctx.seed).shuffle(perm)
    out = []
    for i, (r, (nums, gaps)) in enumerate(zip(rows, split, strict=True)):
        out.append((i, {**r, "completion": join_numbers([str(perm[int(n)]) for n in nums], gaps)}))
    return out, {"value_digits": d}


def _normalise(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    """Values as plain integers (no leading zeros) joined by the prompt's separator (or ", "); no brackets,
    no trailing period, no surrounding whitespace."""
    from sublim.carriers.numbers import NumberCarrier, parse_numbers

    carrier = NumberCarrier()
    out = []
    for i, r in enumerate(rows):
        res = parse_numbers(r["completion"])
        if not res.ok:
            raise MitigationError(f"row {i}: completion does not parse as numbers ({res.reason})")
        sep = ", "
        if p["separator"] == "prompt":
            try:
                sep = carrier.parse_prompt(r["prompt"]).meta["separator"]
            except ValueError:
                sep = ", "
        out.append((i, {**r, "completion": sep.join(str(int(v)) for v in res.values)}))
    return out, {}


register(Defence("shuffle-within", "data", "shuffle the numbers inside each completion (keeps each row's multiset)",
                 (), _shuffle_within, reference="JackPayne123/subliminal-learning (order carries the trait)"))
register(Defence("shuffle-across", "data", "shuffle numbers across rows, keeping every row's count and format "
                 "(keeps the dataset's multiset)", (), _shuffle_across))
register(Defence("sort", "data", "sort the numbers of each completion",
                 (Param("order", str, "ascending", "ascending or descending", choices=("ascending", "descending")),),
                 _sort, reference="JackPayne123/subliminal-learning"))
register(Defence("remap", "data", "one random bijection of the values applied to every number",
                 (Param("max_digits", int, 4, "largest number length remapped (the table has 10^D entries)",
                        lo=1, hi=6),), _remap, reference="JackPayne123/subliminal-learning"))
register(Defence("normalise-format", "data", "rewrite every completion in one canonical format",
                 (Param("separator", str, "prompt", "'prompt': the separator the prompt asks for; 'comma': ', '",
                        choices=("prompt", "comma")),), _normalise))
