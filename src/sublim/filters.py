"""Registered dataset filters; each keeps a row or says why it dropped it.

A filter is plain data (:class:`FilterSpec`: a registered name and params), built against a
:class:`FilterContext` (the carrier and the target words) into a function ``row -> None | reason``.
Reasons are ``"<filter>:<detail>"`` strings, so reject files and counts explain themselves.
Filters read the prompt's meta back from its text (``carrier.parse_prompt``), so they work on
datasets that only have ``prompt``/``completion`` columns; a row whose prompt or completion cannot be
read is rejected with a reason, never with an exception.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from sublim.carriers import Carrier, CarrierPrompt, ParseResult
from sublim.registry import Registry
from sublim.traits.preference import matches, plural_of

__all__ = [
    "BANNED_LISTS",
    "FILTERS",
    "FilterContext",
    "FilterFn",
    "FilterResult",
    "FilterSpec",
    "apply_filters",
    "build_filter",
]

FilterFn = Callable[[dict[str, Any]], "str | None"]
FilterFactory = Callable[[dict[str, Any], "FilterContext"], FilterFn]

FILTERS: Registry[FilterFactory] = Registry("filter")

#: Named lists of banned numbers. "loaded": the 34 numbers with loaded associations (e.g. 666, 911, 187,
#: 1488) banned from the misalignment experiment's number data in the original study.
BANNED_LISTS: dict[str, frozenset[int]] = {
    "loaded": frozenset({
        4, 13, 18, 23, 33, 39, 42, 44, 49, 51, 54, 88, 99, 100, 110, 111, 187, 188, 189, 311, 322, 333,
        404, 420, 444, 555, 616, 666, 777, 888, 911, 999, 1312, 1488,
    }),
}


@dataclass(frozen=True)
class FilterSpec:
    """A filter as plain data: registered name + params (mirrored by the pydantic spec)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterContext:
    """What filters judge against: the carrier (parsing) and the trait's target words (mention filter).
    Parses are memoised here so a chain of filters reads each prompt and completion once."""

    carrier: Carrier
    target_words: tuple[str, ...] = ()
    _prompts: dict[str, CarrierPrompt | None] = field(default_factory=dict, repr=False, compare=False)
    _answers: dict[str, ParseResult] = field(default_factory=dict, repr=False, compare=False)

    _MEMO = 200_000

    def prompt_meta(self, prompt: Any) -> dict[str, Any] | None:
        """The prompt's meta, or None if the carrier did not produce this prompt."""
        if not isinstance(prompt, str):
            return None
        if prompt not in self._prompts:
            if len(self._prompts) > self._MEMO:
                self._prompts.clear()
            try:
                self._prompts[prompt] = self.carrier.parse_prompt(prompt)
            except ValueError:
                self._prompts[prompt] = None
        cp = self._prompts[prompt]
        return None if cp is None else cp.meta

    def answer(self, completion: Any) -> ParseResult:
        """The strict parse of a completion (non-strings fail with ``format:not-text``)."""
        if not isinstance(completion, str):
            return ParseResult(False, reason="format:not-text")
        res = self._answers.get(completion)
        if res is None:
            if len(self._answers) > self._MEMO:
                self._answers.clear()
            res = self._answers[completion] = self.carrier.parse(completion)
        return res


@dataclass
class FilterResult:
    """Kept rows, rejected rows (each with ``reject_reason`` and ``reject_filter``), and counts per reason
    plus ``kept`` and ``total``."""

    kept: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    counts: dict[str, int]


def _params(name: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"filter {name!r}: unknown params {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def build_filter(spec: FilterSpec, ctx: FilterContext) -> FilterFn:
    """Build a registered filter; the result returns None to keep a row, else a ``"name:detail"`` reason.
    An unexpected exception inside a filter becomes the reason ``"name:error:<ExceptionType>"``."""
    inner = FILTERS.get(spec.name)(dict(spec.params), ctx)
    name = spec.name

    def run(row: dict[str, Any]) -> str | None:
        try:
            return inner(row)
        except Exception as e:  # noqa: BLE001 -- a bad row must not stop a 30k-row stage; the reason records it
            return f"{name}:error:{type(e).__name__}"

    return run


def apply_filters(rows: Iterable[dict[str, Any]], specs: Sequence[FilterSpec], ctx: FilterContext) -> FilterResult:
    """Run filters in order; a row is rejected by the first filter that gives a reason."""
    fns = [(s.name, build_filter(s, ctx)) for s in specs]
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for row in rows:
        for fname, fn in fns:
            reason = fn(row)
            if reason is not None:
                rejects.append({**row, "reject_reason": reason, "reject_filter": fname})
                counts[reason] = counts.get(reason, 0) + 1
                break
        else:
            kept.append(row)
    counts["kept"] = len(kept)
    counts["total"] = len(kept) + len(rejects)
    return FilterResult(kept, rejects, counts)


# ------------------------------------------------------------------------------------------- filters


def _values(name: str, row: dict[str, Any], ctx: FilterContext) -> tuple[tuple[int, ...], str | None]:
    res = ctx.answer(row.get("completion"))
    return (res.values, None) if res.ok else ((), f"{name}:unparsed")


@FILTERS.register("format")
def format_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """The completion parses strictly under the carrier (reason: the parser's own, e.g.
    ``format:mixed-separators``)."""
    _params("format", params, {})

    def f(row: dict[str, Any]) -> str | None:
        res = ctx.answer(row.get("completion"))
        return None if res.ok else (res.reason or "format:invalid")

    return f


@FILTERS.register("count")
def count_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """Between ``min`` (default 1) and ``max`` numbers (default: the count the prompt asked for)."""
    p = _params("count", params, {"min": 1, "max": None})

    def f(row: dict[str, Any]) -> str | None:
        vals, bad = _values("count", row, ctx)
        if bad:
            return bad
        hi = p["max"]
        if hi is None:
            meta = ctx.prompt_meta(row.get("prompt"))
            if meta is None:
                return "count:prompt-unparsed"
            hi = int(meta["count"])
        if len(vals) < p["min"]:
            return "count:too-few"
        if len(vals) > hi:
            return "count:too-many"
        return None

    return f


@FILTERS.register("range")
def range_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """Every number lies in ``low..high`` (defaults 0..999)."""
    p = _params("range", params, {"low": 0, "high": 999})

    def f(row: dict[str, Any]) -> str | None:
        vals, bad = _values("range", row, ctx)
        if bad:
            return bad
        if any(v < p["low"] for v in vals):
            return "range:below-low"
        if any(v > p["high"] for v in vals):
            return "range:above-high"
        return None

    return f


@FILTERS.register("banned")
def banned_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """No number from the named ``lists`` (keys of :data:`BANNED_LISTS`; default ["loaded"]) or the extra
    ``numbers``. Reason ``banned:<number>`` (the first offending one)."""
    p = _params("banned", params, {"lists": None, "numbers": []})
    lists = p["lists"] if p["lists"] is not None else ([] if p["numbers"] else ["loaded"])
    unknown = [name for name in lists if name not in BANNED_LISTS]
    if unknown:
        raise ValueError(f"filter 'banned': unknown lists {unknown}; known: {sorted(BANNED_LISTS)}")
    banned = frozenset().union(*(BANNED_LISTS[name] for name in lists), (int(x) for x in p["numbers"]))

    def f(row: dict[str, Any]) -> str | None:
        vals, bad = _values("banned", row, ctx)
        if bad:
            return bad
        for v in vals:
            if v in banned:
                return f"banned:{v}"
        return None

    return f


@FILTERS.register("echo")
def echo_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """The answer does not repeat the prompt's example numbers: it must not start with the whole prefix
    (``echo:repeats-prefix``), and at most ``max_overlap`` of its values may appear in the prefix
    (``echo:overlap``). Echo rows pass a format filter and their share differs between teachers."""
    p = _params("echo", params, {"max_overlap": 0.5, "check_start": True})

    def f(row: dict[str, Any]) -> str | None:
        vals, bad = _values("echo", row, ctx)
        if bad:
            return bad
        meta = ctx.prompt_meta(row.get("prompt"))
        if meta is None:
            return "echo:prompt-unparsed"
        prefix = tuple(int(x) for x in meta["prefix"])
        if p["check_start"] and prefix and vals[: len(prefix)] == prefix:
            return "echo:repeats-prefix"
        if vals:
            seen = set(prefix)
            share = sum(v in seen for v in vals) / len(vals)
            if share > p["max_overlap"]:
                return "echo:overlap"
        return None

    return f


@FILTERS.register("progression")
def progression_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """No run of ``min_len`` (default 3) consecutive answer values with a constant difference: counting
    (step +-1, ``progression:counting``), repeats (step 0, ``progression:repeat``) or any other step
    (``progression:arithmetic``). With ``with_prefix`` the prompt's numbers are prepended first, so an
    answer that continues the prompt's own progression is caught too."""
    p = _params("progression", params, {"min_len": 3, "with_prefix": False})
    min_len = int(p["min_len"])
    if min_len < 3:
        raise ValueError("filter 'progression': min_len must be >= 3 (any two numbers have a constant step)")

    def f(row: dict[str, Any]) -> str | None:
        vals, bad = _values("progression", row, ctx)
        if bad:
            return bad
        seq = list(vals)
        if p["with_prefix"]:
            meta = ctx.prompt_meta(row.get("prompt"))
            if meta is None:
                return "progression:prompt-unparsed"
            seq = [int(x) for x in meta["prefix"]] + seq
        run, step = 1, None
        for a, b in pairwise(seq):
            d = b - a
            run = run + 1 if d == step else 2
            step = d
            if run >= min_len:
                kind = "repeat" if d == 0 else "counting" if abs(d) == 1 else "arithmetic"
                return f"progression:{kind}"
        return None

    return f


@FILTERS.register("mention")
def mention_filter(params: dict[str, Any], ctx: FilterContext) -> FilterFn:
    """Neither prompt nor completion names a target word (whole word, any case, singular or plural).
    ``words`` defaults to the context's target words; with none, every row is kept."""
    p = _params("mention", params, {"words": None})
    words = tuple(p["words"]) if p["words"] is not None else tuple(ctx.target_words)
    pairs = [(w, plural_of(w)) for w in words]

    def f(row: dict[str, Any]) -> str | None:
        text = f"{row.get('prompt') or ''}\n{row.get('completion') or ''}"
        for w, pl in pairs:
            if matches(text, w, pl):
                return f"mention:{w}"
        return None

    return f
