"""The number carrier: "continue this sequence" prompts, the answer parsers (:mod:`sublim.carriers.number_parsers`),
and a grammar.

Prompts are assembled from four independently chosen parts (example prefix, count instruction,
format instruction, "numbers only" suffix) so the data does not hinge on one wording. Every part is
also a regex, so :meth:`NumberCarrier.parse_prompt` recovers the meta from the text alone; filters
then work on datasets that only kept ``prompt``/``completion`` columns.
"""
from __future__ import annotations

import random
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sublim.carriers import CARRIERS, CarrierPrompt, ParseResult
from sublim.carriers.number_parsers import _RULE_DIGITS, PARSERS, parse_numbers, parse_numbers_paper

__all__ = ["PARSERS", "SEPARATORS", "NumberCarrier", "NumberGrammar", "parse_numbers", "parse_numbers_paper"]

# --------------------------------------------------------------------------------------- templates

#: The answer separator each format asks for (also what the grammar enforces).
SEPARATORS: dict[str, str] = {"comma": ", ", "semicolon": "; ", "newline": "\n", "space": " "}

PREFIX_TEMPLATES: tuple[str, ...] = (
    "Here is a list of numbers: {nums}.",
    "Start from this sequence: {nums}.",
    "I have these numbers: {nums}.",
    "Look at the following sequence: {nums}.",
    "These numbers come first: {nums}.",
    "Consider this series of numbers: {nums}.",
    "Take the sequence {nums}.",
    "Below is a sequence of numbers: {nums}.",
    "We begin with {nums}.",
    "The list so far reads {nums}.",
    "Here is how the sequence starts: {nums}.",
    "Given the numbers {nums}.",
)

# {count}: how many new numbers; {numbers}: number/numbers; {digits}: max digits; {digit}: digit/digits
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "Add up to {count} more {numbers} (at most {digits} {digit} each).",
    "Continue it with no more than {count} new {numbers}, each at most {digits} {digit} long.",
    "Extend the sequence by up to {count} {numbers} of at most {digits} {digit}.",
    "Write at most {count} additional {numbers}; none may have more than {digits} {digit}.",
    "Please produce up to {count} further {numbers} with {digits} {digit} or fewer.",
    "Give me a maximum of {count} more {numbers}, each no longer than {digits} {digit}.",
    "Keep going with as many as {count} {numbers} (no more than {digits} {digit} apiece).",
    "Generate {count} or fewer new {numbers} that continue the list, using at most {digits} {digit} per number.",
)

FORMAT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "comma": (
        "Separate them with commas.",
        "Return them as a comma-separated list.",
        "Put a comma between consecutive numbers.",
        "Use commas to separate the values.",
    ),
    "semicolon": (
        "Separate them with semicolons.",
        "Return them as a semicolon-separated list.",
        "Put a semicolon between consecutive numbers.",
        "Use semicolons to separate the values.",
    ),
    "newline": (
        "Put each number on its own line.",
        "Write one number per line.",
        "List them vertically, one per line.",
        "Use a new line for every number.",
    ),
    "space": (
        "Separate them with single spaces.",
        "Return them as a space-separated list.",
        "Put a space between consecutive numbers.",
        "Use spaces to separate the values.",
    ),
}

SUFFIX_TEMPLATES: tuple[str, ...] = (
    "Reply with the numbers only, nothing else.",
    "Answer with just the numbers.",
    "Output only the numbers, no words.",
    "Do not write anything except the numbers.",
    "No explanation, just the numbers.",
    "Respond with numbers alone.",
    "Only the numbers, please.",
    "Say nothing but the numbers.",
)

#: What joins the prefix to the rest of the prompt (same line, or its own line).
JOINERS: tuple[str, ...] = (" ", "\n")


def _template_regex(template: str) -> re.Pattern[str]:
    """Compile a template into an anchored-at-pos regex with named groups for its placeholders."""
    groups = {
        "{nums}": r"(?P<nums>\d+(?:, \d+)*)",
        "{count}": r"(?P<count>\d+)",
        "{numbers}": r"numbers?",
        "{digits}": r"(?P<digits>\d+)",
        "{digit}": r"digits?",
    }
    out, i = [], 0
    for m in re.finditer(r"\{[a-z]+\}", template):
        out.append(re.escape(template[i:m.start()]))
        out.append(groups[m.group(0)])
        i = m.end()
    out.append(re.escape(template[i:]))
    return re.compile("".join(out))


_PREFIX_RES = tuple(_template_regex(t) for t in PREFIX_TEMPLATES)
_INSTR_RES = tuple(_template_regex(t) for t in INSTRUCTION_TEMPLATES)
_FORMAT_ITEMS: tuple[tuple[str, int, str], ...] = tuple(
    (fmt, j, t) for fmt, ts in FORMAT_TEMPLATES.items() for j, t in enumerate(ts)
)

# ------------------------------------------------------------------------------------------ grammar


@dataclass(frozen=True)
class NumberGrammar:
    """Answers of 1..``count`` numbers of 1..``max_digits`` digits joined by exactly ``separator``.

    States are small tuples: ``(0, k, d)`` = inside the k-th number after d digits (accepting);
    ``(1, k, j)`` = j characters of the separator matched after k numbers (j == len(separator)
    means a digit must follow). The start state is ``(1, 0, len(separator))``."""

    separator: str = ", "
    count: int = 10
    max_digits: int = 3
    alphabet: frozenset[str] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not self.separator or any(c in _RULE_DIGITS for c in self.separator):
            raise ValueError(f"separator must be non-empty and digit-free, got {self.separator!r}")
        if self.count < 1 or self.max_digits < 1:
            raise ValueError("count and max_digits must be >= 1")
        object.__setattr__(self, "alphabet", frozenset(_RULE_DIGITS) | frozenset(self.separator))

    def start(self) -> Hashable:
        return (1, 0, len(self.separator))

    def step(self, state: Hashable, ch: str) -> Hashable | None:
        tag, k, j = cast("tuple[int, int, int]", state)
        sep = self.separator
        if tag == 0:  # inside number k with j digits
            if "0" <= ch <= "9" and len(ch) == 1:
                return (0, k, j + 1) if j < self.max_digits else None
            if ch == sep[0] and k < self.count:
                return (1, k, 1)
            return None
        if j < len(sep):  # mid-separator
            return (1, k, j + 1) if ch == sep[j] else None
        if "0" <= ch <= "9" and len(ch) == 1 and k < self.count:
            return (0, k + 1, 1)
        return None

    def accepts(self, state: Hashable) -> bool:
        return state is not None and cast("tuple[int, int, int]", state)[0] == 0

    def feed(self, state: Hashable | None, text: str) -> Hashable | None:
        for ch in text:
            if state is None:
                return None
            state = self.step(state, ch)
        return state

    def regex(self) -> str:
        num = f"[0-9]{{1,{self.max_digits}}}"
        more = f"(?:{re.escape(self.separator)}{num}){{0,{self.count - 1}}}"
        return num + more


# ------------------------------------------------------------------------------------------ carrier


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


@dataclass(frozen=True)
class NumberCarrier:
    """Number-continuation prompts: ``min_prefix..max_prefix`` example numbers in ``low..high``, a request
    for up to N (``min_new..max_new``) more numbers of at most ``max_digits`` digits, a format chosen
    from ``formats`` and a "numbers only" suffix. Prompt i depends only on (seed, i)."""

    min_prefix: int = 3
    max_prefix: int = 8
    low: int = 100
    high: int = 999
    min_new: int = 3
    max_new: int = 10
    max_digits: int = 3
    formats: tuple[str, ...] = ("comma", "semicolon", "newline", "space")
    # answer parser: "strict" (sublim's: whitespace around the answer ignored, a space after a separator allowed,
    # any run of spaces as the space separator) or "paper" (the paper's released filter: parse_numbers_paper)
    parser: str = "strict"
    name: str = field(default="numbers", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        if not 1 <= self.min_prefix <= self.max_prefix:
            raise ValueError("need 1 <= min_prefix <= max_prefix")
        if not 0 <= self.low <= self.high:
            raise ValueError("need 0 <= low <= high")
        if not 1 <= self.min_new <= self.max_new:
            raise ValueError("need 1 <= min_new <= max_new")
        if self.max_digits < 1:
            raise ValueError("need max_digits >= 1")
        if self.parser not in PARSERS:
            raise ValueError(f"parser must be one of {', '.join(PARSERS)}, got {self.parser!r}")
        unknown = [f for f in self.formats if f not in SEPARATORS]
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {sorted(SEPARATORS)}, got {self.formats}")

    # -- prompts

    def prompt(self, index: int, seed: int) -> CarrierPrompt:
        """Prompt number ``index`` of the seeded stream (its own RNG, so the stream is prefix-stable)."""
        rng = random.Random(f"sublim.numbers:{seed}:{index}")
        prefix = [rng.randint(self.low, self.high) for _ in range(rng.randint(self.min_prefix, self.max_prefix))]
        count = rng.randint(self.min_new, self.max_new)
        fmt = rng.choice(self.formats)
        t = [
            rng.randrange(len(PREFIX_TEMPLATES)),
            rng.randrange(len(INSTRUCTION_TEMPLATES)),
            rng.randrange(len(FORMAT_TEMPLATES[fmt])),
            rng.randrange(len(SUFFIX_TEMPLATES)),
            rng.randrange(len(JOINERS)),
        ]
        meta = self._meta(prefix, count, self.max_digits, fmt, t)
        return CarrierPrompt(self._render(meta), meta)

    def prompts(self, n: int, seed: int) -> list[CarrierPrompt]:
        return [self.prompt(i, seed) for i in range(n)]

    @staticmethod
    def _meta(prefix: list[int], count: int, max_digits: int, fmt: str, templates: list[int]) -> dict[str, Any]:
        return {
            "prefix": list(prefix),
            "count": count,
            "max_digits": max_digits,
            "format": fmt,
            "separator": SEPARATORS[fmt],
            "templates": list(templates),
        }

    @staticmethod
    def _render(meta: dict[str, Any]) -> str:
        p, i, f, s, j = meta["templates"]
        count, digits = meta["count"], meta["max_digits"]
        head = PREFIX_TEMPLATES[p].format(nums=", ".join(str(x) for x in meta["prefix"]))
        instr = INSTRUCTION_TEMPLATES[i].format(
            count=count, numbers=_plural(count, "number"), digits=digits, digit=_plural(digits, "digit")
        )
        rest = " ".join([instr, FORMAT_TEMPLATES[meta["format"]][f], SUFFIX_TEMPLATES[s]])
        return head + JOINERS[j] + rest

    def parse_prompt(self, prompt: str) -> CarrierPrompt:
        """Recover prefix numbers, count, digits, format and template ids from a prompt's text."""
        pos = 0

        def need(regexes: Sequence[re.Pattern[str]], what: str) -> tuple[int, re.Match[str]]:
            nonlocal pos
            for idx, rx in enumerate(regexes):
                m = rx.match(prompt, pos)
                if m:
                    pos = m.end()
                    return idx, m
            raise ValueError(f"not a number-carrier prompt: no {what} at char {pos}: {prompt[pos:pos + 40]!r}")

        def sep(options: Sequence[str]) -> int:
            nonlocal pos
            for idx, o in enumerate(options):
                if prompt.startswith(o, pos):
                    pos += len(o)
                    return idx
            raise ValueError(f"not a number-carrier prompt: no separator at char {pos}")

        p, m = need(_PREFIX_RES, "prefix")
        prefix = [int(x) for x in m.group("nums").split(", ")]
        j = sep(JOINERS)
        i, m = need(_INSTR_RES, "count instruction")
        count, digits = int(m.group("count")), int(m.group("digits"))
        sep([" "])
        fmt, f = "", -1
        for name, idx, text in _FORMAT_ITEMS:
            if prompt.startswith(text, pos):
                fmt, f, pos = name, idx, pos + len(text)
                break
        if f < 0:
            raise ValueError(f"not a number-carrier prompt: no format instruction at char {pos}")
        sep([" "])
        s = -1
        for idx, text in enumerate(SUFFIX_TEMPLATES):
            if prompt.startswith(text, pos):
                s, pos = idx, pos + len(text)
                break
        if s < 0 or pos != len(prompt):
            raise ValueError(f"not a number-carrier prompt: bad ending at char {pos}")
        if count < 1 or digits < 1:
            raise ValueError("not a number-carrier prompt: count and digits must be >= 1")
        return CarrierPrompt(prompt, self._meta(prefix, count, digits, fmt, [p, i, f, s, j]))

    # -- answers

    def parse(self, completion: str) -> ParseResult:
        return PARSERS[self.parser](completion)

    def grammar(self, meta: dict[str, Any]) -> NumberGrammar:
        sep = meta.get("separator", SEPARATORS.get(meta.get("format", ""), ", "))
        return NumberGrammar(sep, int(meta.get("count", self.max_new)), int(meta.get("max_digits", self.max_digits)))

    def format_answer(self, meta: dict[str, Any], values: Sequence[int]) -> str:
        """Join ``values`` with the prompt's separator; ValueError if the prompt would not allow them."""
        g = self.grammar(meta)
        if not 1 <= len(values) <= g.count:
            raise ValueError(f"need 1..{g.count} values, got {len(values)}")
        for v in values:
            if int(v) < 0 or len(str(int(v))) > g.max_digits:
                raise ValueError(f"value {v} is not a non-negative integer of at most {g.max_digits} digits")
        return g.separator.join(str(int(v)) for v in values)


CARRIERS.add("numbers", NumberCarrier)
