"""Number-list answer parsers: sublim's ``strict`` one and the paper's released semantics (``paper``).

Both return a :class:`~sublim.carriers.ParseResult`: the values, or a ``format:`` reason for the rejection.
"""
from __future__ import annotations

import re

from sublim.carriers import ParseResult

_RULE_DIGITS = "0123456789"

_ALLOWED = frozenset(_RULE_DIGITS + ",; \t\n")


def _bad_char_reason(s: str) -> str | None:
    """Why ``s`` (brackets/period already removed) holds a character no number list may hold."""
    bad = {c for c in s if c not in _ALLOWED}
    if not bad:
        return None
    if any(c.isalpha() for c in bad):
        return "format:words"
    if bad & {"-", "+", "\u2212"}:
        return "format:sign"
    if bad & {"."}:
        return "format:decimal"
    if bad & set("[](){}"):
        return "format:unbalanced-brackets"
    return "format:bad-char"


def parse_numbers(completion: str) -> ParseResult:
    """Strict parser for a list of non-negative integers with one consistent separator.

    Accepted: optional surrounding whitespace, one optional trailing period, optional surrounding
    ``[..]`` or ``(..)``; the separator is one of comma, semicolon (either may be followed by
    spaces), spaces/tabs, or newline. Rejected with a reason: words, signs, decimals, mixed
    separators, empty elements, unbalanced brackets, empty answers."""
    s = completion.replace("\r\n", "\n").strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    if s[:1] in ("[", "("):
        close = "]" if s[0] == "[" else ")"
        if not s.endswith(close):
            return ParseResult(False, reason="format:unbalanced-brackets")
        s = s[1:-1].strip()
    elif s[-1:] in ("]", ")"):
        return ParseResult(False, reason="format:unbalanced-brackets")
    if not s:
        return ParseResult(False, reason="format:empty")
    bad = _bad_char_reason(s)
    if bad:
        return ParseResult(False, reason=bad)
    has_comma, has_semi, has_nl = "," in s, ";" in s, "\n" in s
    has_space = " " in s or "\t" in s
    if has_comma and has_semi:
        return ParseResult(False, reason="format:mixed-separators")
    if has_comma or has_semi:
        if has_nl:
            return ParseResult(False, reason="format:mixed-separators")
        parts = s.split("," if has_comma else ";")
        elems = [parts[0]] + [p.lstrip(" ") for p in parts[1:]]
    elif has_nl:
        if has_space:
            return ParseResult(False, reason="format:mixed-separators")
        elems = s.split("\n")
    elif has_space:
        elems = re.split(r"[ \t]+", s)
    else:
        elems = [s]
    for e in elems:
        if not e:
            return ParseResult(False, reason="format:empty-element")
        if not e.isdigit() or not e.isascii():
            # only whitespace can be left inside an element here (e.g. "1 ,2" or "1, 2 3")
            return ParseResult(False, reason="format:mixed-separators")
    return ParseResult(True, values=tuple(int(e) for e in elems))


_RUN = re.compile(r"\d+")  # Unicode digits too: a non-ASCII run is found, then rejected below
_ASCII_DIGITS = frozenset("0123456789")


def parse_numbers_paper(completion: str) -> ParseResult:
    """The paper's reference semantics (Cloud et al. 2025's released filter), as a named mode so filter rates can
    be compared with the paper's. The grammar, judgement by judgement:

    1. one trailing ``.`` is dropped, then one pair of matching outer ``[..]`` or ``(..)``; nothing is stripped
       (a leading or trailing space or newline makes the answer invalid);
    2. the separator is the exact text between the first two digit runs; after stripping whitespace it must be
       empty, ``,`` or ``;`` (so ``"1 , 2"``, ``"1,\n2"``, ``"1 ;2"`` are fine);
    3. the whole answer split on that exact separator must give only ASCII-digit parts: every separator is the
       same string (``"1 2  3"`` is rejected: one space, then two), no empty element, no other characters;
    4. a single number must be the whole answer.
    Rejections carry a ``format:`` reason like the strict parser's."""
    s = completion
    s = s.removesuffix(".")
    if len(s) >= 2 and ((s[0] == "[" and s[-1] == "]") or (s[0] == "(" and s[-1] == ")")):
        s = s[1:-1]
    runs = list(_RUN.finditer(s))
    if not runs:
        return ParseResult(False, reason="format:empty" if not s.strip() else _bad_char_reason(s) or "format:bad-char")
    if len(runs) == 1:
        parts = [runs[0].group()]
        if s != parts[0]:
            return ParseResult(False, reason=_bad_char_reason(s.strip()) or "format:bad-char")
    else:
        sep = s[runs[0].end(): runs[1].start()]
        if sep.strip() not in ("", ",", ";"):
            return ParseResult(False, reason=_bad_char_reason(sep.strip()) or "format:mixed-separators")
        parts = s.split(sep)
    for part in parts:
        if not part:
            return ParseResult(False, reason="format:empty-element")
        if not set(part) <= _ASCII_DIGITS:
            return ParseResult(False, reason=_bad_char_reason(part) or "format:mixed-separators")
    return ParseResult(True, values=tuple(int(x) for x in parts))


PARSERS = {"strict": parse_numbers, "paper": parse_numbers_paper}
