"""Bad input, fuzzed (hypothesis): the number parsers, the spec loader with --set overrides, JSONL readers and
--fail-on rules never crash and reject with a reason; each parser accepts exactly its written grammar.

A fast subset runs by default (a few hundred examples each); ``-m slow`` runs >= 100,000 parser inputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sublim.audit.common import AuditInputError, load_rows, parse_fail_on
from sublim.carriers.numbers import NumberCarrier, parse_numbers, parse_numbers_paper
from sublim.spec import SpecError, load_spec

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=50_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text that looks like number lists: digits, separators, whitespace, brackets, a few letters, non-ASCII digits
ALPHABET = st.sampled_from(list("0123456789") * 4 + list(",; \n\t.[]()-+ae") + ["\u09ef", "\u0661", "\r"])
TEXT = st.one_of(st.text(ALPHABET, max_size=40), st.text(max_size=30))
SEPS = [",", ", ", ";", "; ", " ", "\n", " , ", ",\n", " ;"]
INTS = st.lists(st.integers(0, 10**6), min_size=1, max_size=12)

# the reference filter's own published cases (the paper's semantics), with what each parser says
REFERENCE = {"1": True, "[1]": True, "(1)": True, "1.": True, "1 2": True, "1,2": True, "1\n2": True, "1, 2": True,
             "1,\n2": True, "1\n,\n2": True, "1 ,2": True, "1 , 2": True, "1;2": True, "1 ;2": True, "1; 2": True,
             "1 2  3": False, "1,2;3": False, "a": False, "1,a": False, "1,2,a": False, "\u09ef\u09e8\u09e6": False}
STRICT_DIFFERS = {"1,\n2", "1\n,\n2", "1 ,2", "1 , 2", "1 ;2", "1 2  3"}


def _paper_grammar(s: str) -> tuple[int, ...] | None:
    """The paper mode's grammar written as one regex per separator (an independent statement of the docstring)."""
    body = s.removesuffix(".")
    if len(body) >= 2 and body[0] + body[-1] in ("[]", "()"):
        body = body[1:-1]
    if re.fullmatch(r"[0-9]+", body):
        return (int(body),)
    m = re.match(r"[0-9]+(\s*[,;]?\s*)[0-9]", body)
    if not m or (m.group(1).strip() == "" and m.group(1) == ""):
        return None
    sep = m.group(1)
    if not re.fullmatch(r"[0-9]+(?:" + re.escape(sep) + r"[0-9]+)+", body):
        return None
    return tuple(int(x) for x in body.split(sep))


def _check_result(r: object) -> None:
    assert r.ok is (r.reason is None)  # type: ignore[attr-defined]
    if not r.ok:  # type: ignore[attr-defined]
        assert r.reason.startswith("format:")  # type: ignore[attr-defined]
    else:
        assert r.values and all(v >= 0 for v in r.values)  # type: ignore[attr-defined]


def test_reference_cases_and_where_strict_differs() -> None:
    for text, ok in REFERENCE.items():
        assert parse_numbers_paper(text).ok is ok, text
        assert parse_numbers(text).ok is (ok if text not in STRICT_DIFFERS else not ok), text
    assert NumberCarrier(parser="paper").parse("1 , 2").values == (1, 2)
    with pytest.raises(ValueError, match="parser must be one of"):
        NumberCarrier(parser="loose")


@FAST
@given(TEXT)
def test_parsers_never_crash_and_reject_with_a_reason(text: str) -> None:
    _check_result(parse_numbers(text))
    _check_result(parse_numbers_paper(text))


@FAST
@given(TEXT)
def test_paper_mode_accepts_exactly_its_grammar(text: str) -> None:
    r = parse_numbers_paper(text)
    g = _paper_grammar(text)
    assert (r.values if r.ok else None) == g, text


@FAST
@given(INTS, st.sampled_from(SEPS), st.sampled_from(["", "[]", "()"]), st.booleans())
def test_formatted_lists_round_trip(values: list[int], sep: str, brackets: str, period: bool) -> None:
    text = sep.join(map(str, values))
    if brackets:
        text = brackets[0] + text + brackets[1]
    text += "." if period else ""
    assert parse_numbers_paper(text).values == tuple(values)
    strict = parse_numbers(text)
    if sep in (",", ", ", ";", "; ", " ", "\n"):  # the separators the strict grammar names
        assert strict.values == tuple(values)


@pytest.mark.slow
@SLOW
@given(TEXT)
def test_parsers_many_inputs(text: str) -> None:  # 2 x 50,000 inputs
    _check_result(parse_numbers(text))
    r = parse_numbers_paper(text)
    _check_result(r)
    assert (r.values if r.ok else None) == _paper_grammar(text)


KEYS = st.sampled_from(["student.lr", "seeds", "targets", "generation.n_prompts", "teacher.kind", "x.y.z", "name",
                        "student.objective", "evaluation.n_questions", "stats.conf", ""])
VALUES = st.one_of(st.text(max_size=12), st.integers(-5, 10**6).map(str), st.sampled_from(
    ["[0,1]", "[owl]", "{a: 1}", "null", "-1", "1e-3", "[", "'", "owl", "full", "2.5"]))


OVERRIDES = st.lists(st.tuples(KEYS, VALUES), max_size=3)
LINES = st.lists(st.one_of(st.text(max_size=20), st.dictionaries(st.sampled_from(["prompt", "completion", "x"]),
                                                                 st.one_of(st.text(max_size=5), st.integers()),
                                                                 max_size=3).map(json.dumps)), max_size=4)
RULES = st.text(st.sampled_from(list("abz_.0123456789<>=!, '\"-e")), max_size=25)
# the slow marker's share of the other inputs: 20,000 each (with the parsers' 2 x 50,000: 160,000 in all)
SLOW_EACH = settings(max_examples=20_000, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check_overrides(pairs: list[tuple[str, str]]) -> None:
    spec = Path(__file__).resolve().parents[1] / "examples" / "owl-numbers.yaml"
    try:
        load_spec(spec, [f"{k}={v}" for k, v in pairs])
    except SpecError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip() and "Traceback" not in msg


def _check_readers(d: Path, lines: list[str]) -> None:
    p = d / "d.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        rows = load_rows(p)
    except (AuditInputError, ValueError) as e:
        msg = str(e)
        assert msg and "d.jsonl" in msg and "\n" not in msg
    else:
        assert rows and all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in rows)


def _check_rule(rule: str) -> None:
    try:
        ts = parse_fail_on(rule)
    except AuditInputError as e:
        assert "expected METRIC OP VALUE" in str(e)
    else:
        for t in ts:
            assert t.op in (">=", "<=", "==", "!=", ">", "<") and t.metric


@FAST
@given(OVERRIDES)
def test_spec_overrides_fail_cleanly(pairs: list[tuple[str, str]]) -> None:
    _check_overrides(pairs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LINES)
def test_dataset_readers_fail_cleanly(tmp_path: Path, lines: list[str]) -> None:
    _check_readers(tmp_path, lines)


@FAST
@given(RULES)
def test_fail_on_rules_parse_or_fail_cleanly(rule: str) -> None:
    _check_rule(rule)


@pytest.mark.slow
@SLOW_EACH
@given(OVERRIDES, LINES, RULES)
def test_overrides_readers_and_rules_many_inputs(tmp_path: Path, pairs: list[tuple[str, str]], lines: list[str],
                                                 rule: str) -> None:  # 20,000 x (overrides, a dataset, a rule)
    _check_overrides(pairs)
    _check_readers(tmp_path, lines)
    _check_rule(rule)
