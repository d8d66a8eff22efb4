"""Number carrier: prompts, strict parser, prompt-meta recovery, grammar, answer formatting."""
from __future__ import annotations

import json
import random
import re
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sublim.carriers import CARRIERS, Carrier, CarrierPrompt, Grammar, build_carrier
from sublim.carriers.numbers import SEPARATORS, NumberCarrier, NumberGrammar, parse_numbers


@pytest.fixture(scope="module")
def carrier() -> NumberCarrier:
    return NumberCarrier()


@pytest.fixture(scope="module")
def many(carrier: NumberCarrier) -> list[CarrierPrompt]:
    return carrier.prompts(500, seed=7)


# ------------------------------------------------------------------------------------------ prompts


def test_registered_and_protocols(carrier: NumberCarrier) -> None:
    assert "numbers" in CARRIERS
    c = build_carrier("numbers", {"max_new": 5})
    assert isinstance(c, NumberCarrier) and c.max_new == 5 and c.name == "numbers"
    assert isinstance(carrier, Carrier)
    assert isinstance(carrier.grammar({"separator": ", ", "count": 3}), Grammar)


def test_prompts_deterministic_and_prefix_stable(carrier: NumberCarrier) -> None:
    a = carrier.prompts(60, seed=3)
    assert a == carrier.prompts(60, seed=3)
    assert carrier.prompts(17, seed=3) == a[:17]
    b = carrier.prompts(60, seed=4)
    assert sum(x.prompt != y.prompt for x, y in zip(a, b)) > 50
    assert len({p.prompt for p in a}) == 60


def test_prompt_contents_follow_config(many: list[CarrierPrompt]) -> None:
    for p in many:
        m = p.meta
        json.dumps(m)  # JSON-able
        assert 3 <= len(m["prefix"]) <= 8
        assert all(100 <= x <= 999 for x in m["prefix"])
        assert 1 <= m["count"] <= 10 and m["max_digits"] == 3
        assert m["separator"] == SEPARATORS[m["format"]]
        assert ", ".join(map(str, m["prefix"])) in p.prompt
        assert str(m["count"]) in p.prompt


def test_templates_vary(many: list[CarrierPrompt]) -> None:
    t = [p.meta["templates"] for p in many]
    for k, least in enumerate((10, 7, 4, 7, 2)):
        assert len({x[k] for x in t}) >= least
    assert {p.meta["format"] for p in many} == set(SEPARATORS)
    assert len({len(p.meta["prefix"]) for p in many}) == 6
    assert len({p.meta["count"] for p in many}) >= 7
    first_words = {p.prompt.split()[0] for p in many}
    assert len(first_words) >= 8


def test_config_is_respected() -> None:
    c = NumberCarrier(min_prefix=2, max_prefix=2, low=10, high=20, min_new=1, max_new=1, max_digits=2,
                      formats=["newline"])
    for p in c.prompts(50, 0):
        assert len(p.meta["prefix"]) == 2 and all(10 <= x <= 20 for x in p.meta["prefix"])
        assert p.meta["count"] == 1 and p.meta["separator"] == "\n"
        assert re.search(r"\b1 (or fewer )?(more |new |additional |further )?number\b", p.prompt), p.prompt
        assert c.parse_prompt(p.prompt) == p


@pytest.mark.parametrize("bad", [{"min_prefix": 0}, {"min_prefix": 5, "max_prefix": 4}, {"low": 5, "high": 4},
                                 {"max_new": 0}, {"max_digits": 0}, {"formats": ("tabs",)}, {"formats": ()}])
def test_bad_config(bad: dict) -> None:
    with pytest.raises(ValueError):
        NumberCarrier(**bad)


def test_parse_prompt_round_trip(carrier: NumberCarrier, many: list[CarrierPrompt]) -> None:
    for p in many:
        assert carrier.parse_prompt(p.prompt) == p


@pytest.mark.parametrize("text", [
    "", "What is your favorite animal?", "Here is a list of numbers: 1, 2.",
    "Here is a list of numbers: one, two. Add up to 3 more numbers (at most 3 digits each).",
])
def test_parse_prompt_rejects_foreign(carrier: NumberCarrier, text: str) -> None:
    with pytest.raises(ValueError):
        carrier.parse_prompt(text)


def test_parse_prompt_rejects_edits(carrier: NumberCarrier, many: list[CarrierPrompt]) -> None:
    p = many[0].prompt
    for edited in (p + " Thanks!", "Hi. " + p, p.replace(".", "!", 1), p[:-1]):
        with pytest.raises(ValueError):
            carrier.parse_prompt(edited)


# ------------------------------------------------------------------------------------------- parser

ACCEPT = [
    ("1, 2, 3", (1, 2, 3)),
    ("1,2,3", (1, 2, 3)),
    ("1,   2", (1, 2)),
    ("7; 8; 9", (7, 8, 9)),
    ("7;8", (7, 8)),
    ("10\n20\n30", (10, 20, 30)),
    ("10\r\n20", (10, 20)),
    ("4 5 6", (4, 5, 6)),
    ("4  5\t6", (4, 5, 6)),
    ("[1, 2, 3]", (1, 2, 3)),
    ("(1; 2)", (1, 2)),
    ("[ 1 2 ]", (1, 2)),
    ("1, 2, 3.", (1, 2, 3)),
    ("[1, 2, 3].", (1, 2, 3)),
    ("  \n1, 2\n ", (1, 2)),
    ("42", (42,)),
    ("0, 007", (0, 7)),
    ("1234, 5", (1234, 5)),
]

REJECT = [
    ("", "format:empty"),
    ("   ", "format:empty"),
    ("[]", "format:empty"),
    (".", "format:empty"),
    ("1, 2; 3", "format:mixed-separators"),
    ("1, 2 3", "format:mixed-separators"),
    ("1 ,2", "format:mixed-separators"),
    ("1,\n2", "format:mixed-separators"),
    ("1 2\n3", "format:mixed-separators"),
    ("1\n 2", "format:mixed-separators"),
    ("1; 2\n3", "format:mixed-separators"),
    ("1,,2", "format:empty-element"),
    ("1, , 2", "format:empty-element"),
    ("1, 2,", "format:empty-element"),
    (",1, 2", "format:empty-element"),
    ("1\n\n2", "format:empty-element"),
    ("Sure: 1, 2, 3", "format:words"),
    ("1, 2, three", "format:words"),
    ("1, 2, 3 are my numbers", "format:words"),
    ("-1, 2", "format:sign"),
    ("1, +2", "format:sign"),
    ("1.5, 2", "format:decimal"),
    ("1, 2, 3..", "format:decimal"),
    ("[1, 2", "format:unbalanced-brackets"),
    ("1, 2]", "format:unbalanced-brackets"),
    ("[1, 2)", "format:unbalanced-brackets"),
    ("[[1, 2]]", "format:unbalanced-brackets"),
    ("1, 2 #", "format:bad-char"),
    ("1/2", "format:bad-char"),
]


@pytest.mark.parametrize("text,values", ACCEPT)
def test_parser_accepts(carrier: NumberCarrier, text: str, values: tuple[int, ...]) -> None:
    r = carrier.parse(text)
    assert r.ok and r.values == values and r.reason is None


@pytest.mark.parametrize("text,reason", REJECT)
def test_parser_rejects_with_reason(carrier: NumberCarrier, text: str, reason: str) -> None:
    r = carrier.parse(text)
    assert not r.ok and r.values == () and r.reason == reason


# ------------------------------------------------------------------------------------------ grammar


def _reachable(g: NumberGrammar) -> set:
    return _reachable_from(g, g.start())


def _reachable_from(g: NumberGrammar, start: object) -> set:
    seen = {start}
    todo = deque(seen)
    while todo:
        s = todo.popleft()
        for ch in g.alphabet:
            t = g.step(s, ch)
            if t is not None and t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


@pytest.mark.parametrize("sep", list(SEPARATORS.values()))
def test_grammar_basic(sep: str) -> None:
    g = NumberGrammar(sep, count=3, max_digits=3)
    assert hash(g) == hash(NumberGrammar(sep, 3, 3)) and g == NumberGrammar(sep, 3, 3)
    assert g.alphabet == frozenset("0123456789" + sep)
    ok = [sep.join(x) for x in (["1"], ["123"], ["1", "22"], ["1", "22", "333"], ["007", "0"])]
    for text in ok:
        st = g.feed(g.start(), text)
        assert st is not None and g.accepts(st), repr(text)
    bad = ["", "1234", sep.join(["1", "2", "3", "4"]), "1" + sep, sep + "1", "a", "1" + sep + sep + "2",
           "1.", "-1", "[1]", " 1" if sep != " " else ",1"]
    for text in bad:
        st = g.feed(g.start(), text)
        assert st is None or not g.accepts(st), repr(text)
    assert not g.accepts(g.start())


@pytest.mark.parametrize("sep", list(SEPARATORS.values()))
def test_grammar_has_no_dead_states(sep: str) -> None:
    """Every reachable state can still reach an accepting one (constrained decoding never gets stuck)."""
    g = NumberGrammar(sep, count=4, max_digits=3)
    states = _reachable(g)
    assert len(states) < 50
    for s in states:
        assert all(isinstance(x, int) for x in s)
        hash(s)
        assert any(g.accepts(t) for t in _reachable_from(g, s)), s


def _canonical(text: str, sep: str, count: int, digits: int) -> bool:
    parts = text.split(sep)
    return 1 <= len(parts) <= count and all(p.isdigit() and 1 <= len(p) <= digits for p in parts)


@pytest.mark.parametrize("fmt", list(SEPARATORS))
def test_grammar_agrees_with_parser(carrier: NumberCarrier, fmt: str) -> None:
    """Over random strings of digits, the separator's characters and junk: the grammar accepts exactly the
    strings the parser accepts in the prompt's exact format within count/digit limits."""
    sep = SEPARATORS[fmt]
    meta = {"separator": sep, "count": 4, "max_digits": 2, "format": fmt}
    g = carrier.grammar(meta)
    rng = random.Random(fmt)
    chars = list("0123456789" * 3 + sep * 4) + [",", ";", " ", "\n", ".", "-", "a", "["]
    n_acc = 0
    for _ in range(4000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 14)))
        st = g.feed(g.start(), text)
        acc = st is not None and g.accepts(st)
        assert acc == _canonical(text, sep, 4, 2), repr(text)
        if acc:
            n_acc += 1
            r = carrier.parse(text)
            assert r.ok and r.values == tuple(int(x) for x in text.split(sep)), repr(text)
    assert n_acc > 20


def test_grammar_prefix_closed(carrier: NumberCarrier, many: list[CarrierPrompt]) -> None:
    rng = random.Random(0)
    for p in many[:100]:
        g = carrier.grammar(p.meta)
        vals = [rng.randint(0, 999) for _ in range(rng.randint(1, p.meta["count"]))]
        text = carrier.format_answer(p.meta, vals)
        st = g.start()
        for ch in text:
            st = g.step(st, ch)
            assert st is not None
        assert g.accepts(st)
        assert g.step(st, "x") is None


# -------------------------------------------------------------------------------------- format_answer


def test_format_answer_parses_and_is_accepted(carrier: NumberCarrier, many: list[CarrierPrompt]) -> None:
    rng = random.Random(1)
    for p in many:
        vals = [rng.randint(0, 999) for _ in range(rng.randint(1, p.meta["count"]))]
        text = carrier.format_answer(p.meta, vals)
        assert carrier.parse(text).values == tuple(vals)
        g = carrier.grammar(p.meta)
        st = g.feed(g.start(), text)
        assert st is not None and g.accepts(st)
        if len(vals) > 1:
            assert p.meta["separator"] in text


def test_format_answer_refuses_what_the_prompt_forbids(carrier: NumberCarrier) -> None:
    meta = {"separator": ", ", "count": 2, "max_digits": 3}
    assert carrier.format_answer(meta, [1, 22]) == "1, 22"
    for vals in ([], [1, 2, 3], [1000], [-1]):
        with pytest.raises(ValueError):
            carrier.format_answer(meta, vals)


def test_module_parser_is_the_carriers(carrier: NumberCarrier) -> None:
    assert parse_numbers("1; 2") == carrier.parse("1; 2")


@settings(max_examples=400, deadline=None)
@given(sep=st.sampled_from([", ", ",", "; ", "\n", " ", " | "]), count=st.integers(1, 6), digits=st.integers(1, 4),
       text=st.text(alphabet="0123456789,; \n|a", max_size=30))
def test_grammar_regex_accepts_exactly_the_grammars_answers(sep: str, count: int, digits: int, text: str) -> None:
    """The regex handed to engines that constrain by regex (vLLM) is the automaton's language, not a cousin."""
    g = NumberGrammar(sep, count, digits)
    by_automaton = g.accepts(g.feed(g.start(), text))
    assert (re.fullmatch(g.regex(), text) is not None) == by_automaton
    answer = sep.join(["7" * digits] * count)  # the longest well-formed answer is in both
    assert re.fullmatch(g.regex(), answer) and g.accepts(g.feed(g.start(), answer))
