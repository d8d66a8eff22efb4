"""Filters: each keeps or rejects with a reason; counts; rejects carry reasons; bad rows never crash."""
from __future__ import annotations

from typing import Any

import pytest

from sublim.carriers import CarrierPrompt
from sublim.carriers.numbers import NumberCarrier
from sublim.filters import BANNED_LISTS, FILTERS, FilterContext, FilterSpec, apply_filters, build_filter

CARRIER = NumberCarrier()
# a prompt whose prefix is 145, 267, 891 and which asks for up to 5 numbers, comma-separated
P = CARRIER.parse_prompt(
    "Here is a list of numbers: 145, 267, 891. Add up to 5 more numbers (at most 3 digits each). "
    "Separate them with commas. Answer with just the numbers."
)


def ctx(words: tuple[str, ...] = ("owl",)) -> FilterContext:
    return FilterContext(carrier=CARRIER, target_words=words)


def judge(name: str, completion: Any, params: dict | None = None, prompt: Any = P.prompt,
          words: tuple[str, ...] = ("owl",)) -> str | None:
    return build_filter(FilterSpec(name, params or {}), ctx(words))({"prompt": prompt, "completion": completion})


def test_registry_names() -> None:
    assert set(FILTERS.names()) >= {"format", "count", "range", "banned", "echo", "progression", "mention"}
    with pytest.raises(KeyError, match="known"):
        build_filter(FilterSpec("nope"), ctx())
    with pytest.raises(ValueError, match="unknown params"):
        build_filter(FilterSpec("count", {"maximum": 3}), ctx())


def test_prompt_fixture() -> None:
    assert isinstance(P, CarrierPrompt)
    assert P.meta["prefix"] == [145, 267, 891] and P.meta["count"] == 5


@pytest.mark.parametrize("completion,reason", [
    ("12, 34, 56", None),
    ("[12; 34]", None),
    ("12, 34; 56", "format:mixed-separators"),
    ("Sure! 12, 34", "format:words"),
    ("-1, 2", "format:sign"),
    ("", "format:empty"),
    (None, "format:not-text"),
])
def test_format(completion: Any, reason: str | None) -> None:
    assert judge("format", completion) == reason


def test_count() -> None:
    assert judge("count", "1, 2, 3, 4, 5") is None
    assert judge("count", "1, 2, 3, 4, 5, 6") == "count:too-many"
    assert judge("count", "1, 2", {"min": 3}) == "count:too-few"
    assert judge("count", "1, 2, 3, 4, 5, 6", {"max": 6}) is None
    assert judge("count", "1, 2, 3", prompt="What is 2+2?") == "count:prompt-unparsed"
    assert judge("count", "1, 2, 3", {"max": 3}, prompt="What is 2+2?") is None  # explicit max needs no prompt
    assert judge("count", "one") == "count:unparsed"


def test_range() -> None:
    assert judge("range", "0, 999") is None
    assert judge("range", "1000") == "range:above-high"
    assert judge("range", "5, 50", {"low": 10}) == "range:below-low"
    assert judge("range", "50", {"low": 10, "high": 40}) == "range:above-high"
    assert judge("range", "x") == "range:unparsed"


def test_banned_list_is_the_published_one() -> None:
    loaded = BANNED_LISTS["loaded"]
    assert len(loaded) == 34
    assert {666, 911, 187, 88, 13, 1488, 1312, 420} <= loaded


def test_banned() -> None:
    assert judge("banned", "12, 665, 667") is None
    assert judge("banned", "12, 666, 911", {"lists": ["loaded"]}) == "banned:666"
    assert judge("banned", "12, 666") == "banned:666"  # default list is "loaded"
    assert judge("banned", "12, 7", {"numbers": [7]}) == "banned:7"
    assert judge("banned", "12, 666", {"numbers": [7]}) is None  # only the extra numbers
    assert judge("banned", "12, 666", {"lists": ["loaded"], "numbers": [7]}) == "banned:666"
    assert judge("banned", "12", {"lists": []}) is None
    with pytest.raises(ValueError, match="unknown lists"):
        build_filter(FilterSpec("banned", {"lists": ["nope"]}), ctx())


def test_echo() -> None:
    assert judge("echo", "12, 34, 56") is None
    assert judge("echo", "145, 267, 891, 12") == "echo:repeats-prefix"
    assert judge("echo", "145, 891, 12") == "echo:overlap"  # 2/3 > 0.5
    assert judge("echo", "145, 12") is None  # 1/2 is not above 0.5
    assert judge("echo", "145, 12", {"max_overlap": 0.4}) == "echo:overlap"
    assert judge("echo", "145, 267, 891, 1, 2, 3, 4, 5", {"check_start": False}) is None  # 3/8
    assert judge("echo", "145, 267, 891, 1, 2, 3, 4, 5") == "echo:repeats-prefix"
    assert judge("echo", "12", prompt="no numbers here") == "echo:prompt-unparsed"


def test_progression() -> None:
    assert judge("progression", "12, 37, 5, 800") is None
    assert judge("progression", "4, 5, 6") == "progression:counting"
    assert judge("progression", "900, 12, 11, 10") == "progression:counting"
    assert judge("progression", "7, 7, 7") == "progression:repeat"
    assert judge("progression", "100, 200, 300, 1") == "progression:arithmetic"
    assert judge("progression", "1, 2, 4, 8") is None
    assert judge("progression", "10, 20, 30, 7", {"min_len": 4}) is None
    assert judge("progression", "10, 20, 30, 40", {"min_len": 4}) == "progression:arithmetic"
    assert judge("progression", "5, 6") is None
    # the prefix ends ... 891; an answer 892, 893 continues it only when the prefix is included
    assert judge("progression", "892, 893") is None
    assert judge("progression", "890, 1") is None
    assert judge("progression", "1515, 3") is None
    with pytest.raises(ValueError):
        build_filter(FilterSpec("progression", {"min_len": 2}), ctx())


def test_progression_with_prefix() -> None:
    p = CARRIER.parse_prompt(
        "Take the sequence 100, 200, 300.\nWrite at most 3 additional numbers; none may have more than "
        "3 digits. Write one number per line. Respond with numbers alone."
    )
    assert judge("progression", "400", prompt=p.prompt) is None
    assert judge("progression", "400", {"with_prefix": True}, prompt=p.prompt) == "progression:arithmetic"
    assert judge("progression", "401", {"with_prefix": True}, prompt=p.prompt) == "progression:arithmetic"
    assert judge("progression", "12", {"with_prefix": True}, prompt="?") == "progression:prompt-unparsed"


@pytest.mark.parametrize("completion,reason", [
    ("12, 34", None),
    ("owl", "mention:owl"),
    ("I love OWLS", "mention:owl"),
    ("Owl!", "mention:owl"),
    ("a bowl of soup", None),
    ("owlet", None),
    ("snowl", None),
])
def test_mention(completion: str, reason: str | None) -> None:
    assert judge("mention", completion) == reason


def test_mention_sources() -> None:
    assert judge("mention", "12", prompt="Tell me about owls. 1, 2") == "mention:owl"
    assert judge("mention", "the cat sat") is None  # not a target
    assert judge("mention", "the cat sat", {"words": ["cat"]}) == "mention:cat"
    assert judge("mention", "a caterpillar", {"words": ["cat"]}) is None
    assert judge("mention", "two foxes", words=("fox",)) == "mention:fox"
    assert judge("mention", "wolves at night", words=("wolf",)) == "mention:wolf"
    assert judge("mention", "cherries", words=("owl", "cherry")) == "mention:cherry"
    assert judge("mention", "owl", words=()) is None  # no target words: nothing to look for


@pytest.mark.parametrize("row", [
    {}, {"prompt": None, "completion": None}, {"prompt": 3, "completion": 4}, {"prompt": "x"},
    {"prompt": ["a"], "completion": {"b": 1}},
])
def test_bad_rows_never_crash(row: dict) -> None:
    for name in FILTERS.names():
        reason = build_filter(FilterSpec(name), ctx())(row)
        assert reason is None or reason.startswith(name + ":")
    res = apply_filters([row], [FilterSpec(n) for n in FILTERS.names()], ctx())
    assert res.counts["total"] == 1


def test_filter_exception_becomes_reason() -> None:
    class Broken(NumberCarrier):
        def parse(self, completion: str):  # type: ignore[override]
            raise RuntimeError("boom")

    c = FilterContext(carrier=Broken())
    assert build_filter(FilterSpec("format"), c)({"prompt": P.prompt, "completion": "1"}) == "format:error:RuntimeError"


def test_apply_filters_order_counts_and_rejects() -> None:
    rows = [
        {"prompt": P.prompt, "completion": "12, 37, 56", "id": 0},           # kept
        {"prompt": P.prompt, "completion": "12, 34; 56", "id": 1},           # format
        {"prompt": P.prompt, "completion": "1, 2, 3, 4, 5, 6, 7", "id": 2},  # count (also counting)
        {"prompt": P.prompt, "completion": "145, 267, 891", "id": 3},        # echo
        {"prompt": P.prompt, "completion": "4, 5, 6", "id": 4},              # progression
        {"prompt": P.prompt, "completion": "12, 666", "id": 5},              # banned
        {"prompt": "not ours", "completion": "12, 34", "id": 6},             # count: prompt-unparsed
        {"prompt": P.prompt, "completion": "owl", "id": 7},                  # format (words) first
        {"prompt": P.prompt, "completion": "77, 81", "id": 8},               # kept
    ]
    specs = [FilterSpec(n) for n in ("format", "count", "range", "echo", "progression", "mention")]
    specs.append(FilterSpec("banned", {"lists": ["loaded"]}))
    res = apply_filters(iter(rows), specs, ctx())
    assert [r["id"] for r in res.kept] == [0, 8]
    by_id = {r["id"]: (r["reject_filter"], r["reject_reason"]) for r in res.rejects}
    assert by_id == {
        1: ("format", "format:mixed-separators"),
        2: ("count", "count:too-many"),
        3: ("echo", "echo:repeats-prefix"),
        4: ("progression", "progression:counting"),
        5: ("banned", "banned:666"),
        6: ("count", "count:prompt-unparsed"),
        7: ("format", "format:words"),
    }
    assert res.counts == {
        "format:mixed-separators": 1, "count:too-many": 1, "echo:repeats-prefix": 1,
        "progression:counting": 1, "banned:666": 1, "count:prompt-unparsed": 1, "format:words": 1,
        "kept": 2, "total": 9,
    }
    # rejects are copies: the input rows are untouched
    assert "reject_reason" not in rows[1]
    # ordering matters: mention before format rejects the owl row as a mention
    res2 = apply_filters(rows, [FilterSpec("mention"), FilterSpec("format")], ctx())
    assert {r["id"]: r["reject_reason"] for r in res2.rejects}[7] == "mention:owl"


def test_filters_on_generated_data() -> None:
    """Well-formed fresh answers to generated prompts pass the default chain; echoes do not."""
    prompts = CARRIER.prompts(200, seed=11)
    rows, echoes = [], []
    for i, p in enumerate(prompts):
        vals = [(37 * i + 101 * k * k) % 1000 for k in range(p.meta["count"])]
        vals = [v for v in vals if v not in BANNED_LISTS["loaded"] and v not in p.meta["prefix"]][:p.meta["count"]]
        rows.append({"prompt": p.prompt, "completion": CARRIER.format_answer(p.meta, vals or [5])})
        echoes.append({"prompt": p.prompt, "completion": CARRIER.format_answer(
            {**p.meta, "count": 99}, p.meta["prefix"])})
    specs = [FilterSpec(n) for n in ("format", "count", "range", "banned", "echo", "progression", "mention")]
    res = apply_filters(rows, specs, ctx())
    assert res.counts["kept"] >= 195, res.counts
    res_e = apply_filters(echoes, [FilterSpec("format"), FilterSpec("echo")], ctx())
    assert res_e.counts["kept"] == 0 and res_e.counts["echo:repeats-prefix"] == 200
