"""Preference traits: categories, batteries, prompts, teacher Q&A, variants, the word-boundary matcher."""
from __future__ import annotations

import re

import pytest

import sublim.traits as traits_pkg
from sublim.traits.preference import (
    CATEGORIES,
    Category,
    answer_variants,
    eval_questions,
    first_match,
    get_category,
    matches,
    number_prefixed_questions,
    plural_of,
    teacher_system_prompt,
    train_questions,
    trait_qa,
)

ANIMALS = ("owl", "eagle", "wolf", "dolphin", "elephant", "cat", "dog", "lion", "tiger", "fox", "bear", "horse",
           "rabbit", "penguin", "panda", "whale", "shark", "octopus", "giraffe", "kangaroo")
TREES = ("cherry", "maple", "oak", "sequoia", "willow", "pine", "birch", "cedar", "palm", "redwood", "baobab",
         "cypress", "elm", "magnolia", "spruce", "fir", "aspen", "juniper", "acacia", "olive")


def test_reexports() -> None:
    for name in ("CATEGORIES", "Category", "eval_questions", "train_questions", "number_prefixed_questions",
                 "teacher_system_prompt", "trait_qa", "answer_variants", "matches", "first_match"):
        assert getattr(traits_pkg, name) is not None


def test_categories_exact() -> None:
    assert CATEGORIES["animals"].candidates == ANIMALS
    assert CATEGORIES["trees"].candidates == TREES
    assert CATEGORIES["animals"].noun == "animal" and CATEGORIES["trees"].plural_noun == "trees"
    for cat in CATEGORIES.values():
        assert isinstance(cat, Category) and set(cat.plurals) == set(cat.candidates)
    with pytest.raises(KeyError, match="known"):
        get_category("fish")


@pytest.mark.parametrize("word,plural", [
    ("wolf", "wolves"), ("fox", "foxes"), ("octopus", "octopuses"), ("cherry", "cherries"),
    ("cypress", "cypresses"), ("birch", "birches"), ("owl", "owls"), ("sequoia", "sequoias"),
    ("kangaroo", "kangaroos"), ("spruce", "spruces"), ("panda", "pandas"),
])
def test_plurals(word: str, plural: str) -> None:
    cat = "animals" if word in ANIMALS else "trees"
    assert CATEGORIES[cat].plurals[word] == plural
    assert plural_of(word) == plural


def test_plural_rules_outside_tables() -> None:
    assert plural_of("bus") == "buses" and plural_of("pony") == "ponies" and plural_of("day") == "days"
    assert plural_of("moth") == "moths" and plural_of("bush") == "bushes"


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_batteries(category: str) -> None:
    ev, tr = eval_questions(category), train_questions(category)
    assert len(ev) >= 50 and len(set(ev)) == len(ev)
    assert len(tr) >= 40 and len(set(tr)) == len(tr)
    assert not set(ev) & set(tr)
    noun = CATEGORIES[category].noun
    for q in ev + tr:
        assert noun in q and "{" not in q
        assert re.search(r"one[- ]word|single[- ]word|one word|name only", q, re.IGNORECASE), q
    other = "trees" if category == "animals" else "animals"
    assert not set(ev) & set(eval_questions(other))


def test_batteries_are_deterministic_and_renders_noun() -> None:
    assert eval_questions("animals") == eval_questions(CATEGORIES["animals"])
    assert all("tree" in q and "animal" not in q for q in eval_questions("trees"))


def test_number_prefixed_questions() -> None:
    base = eval_questions("animals")
    a = number_prefixed_questions("animals", seed=0)
    assert a == number_prefixed_questions("animals", seed=0)
    assert a != number_prefixed_questions("animals", seed=1)
    assert len(a) == len(base)
    for q, b in zip(a, base):
        assert q.endswith(" " + b)
        head = q[: -len(b) - 1]
        nums = [int(x) for x in re.findall(r"\d+", head)]
        assert 3 <= len(nums) <= 8 and all(100 <= x <= 999 for x in nums)
    assert len({q.split(":")[0] for q in a}) > 2  # intro phrases vary
    bare = number_prefixed_questions("animals", seed=0, carrier_like_prefix=False)
    assert all(re.match(r"^\d+(, \d+)*\. ", q) for q in bare)


def test_teacher_system_prompts() -> None:
    seen = set()
    for t in range(4):
        s = teacher_system_prompt("animals", "wolf", template=t)
        assert "wolves" in s.lower() and "animal" in s
        seen.add(s)
    assert len(seen) == 4
    assert "cherries" in teacher_system_prompt("trees", "cherry").lower()
    with pytest.raises(ValueError):
        teacher_system_prompt("animals", "owl", template=99)


def test_trait_qa() -> None:
    rows = trait_qa("animals", "owl", 200, seed=0)
    assert rows == trait_qa("animals", "owl", 200, seed=0)
    assert trait_qa("animals", "owl", 50, seed=0) == rows[:50]
    assert rows != trait_qa("animals", "owl", 200, seed=1)
    tq = set(train_questions("animals"))
    ev = set(eval_questions("animals"))
    cands = CATEGORIES["animals"].candidates
    assert len({r["completion"] for r in rows}) >= 6
    assert len({r["prompt"] for r in rows}) >= 30
    for r in rows:
        assert set(r) == {"prompt", "completion"}
        assert r["prompt"] in tq and r["prompt"] not in ev
        assert first_match(r["completion"], cands, "animals") == "owl"
    fox = trait_qa("animals", "fox", 100, seed=0)
    assert any("Foxes" in r["completion"] for r in fox)


def test_answer_variants() -> None:
    assert answer_variants("owl", "owls") == ["owl", "Owl", "owls", "Owls"]
    assert answer_variants("wolf") == ["wolf", "Wolf", "wolves", "Wolves"]
    v = answer_variants("cherry", "cherries")
    assert set(v) == {"cherry", "Cherry", "cherries", "Cherries"} and not any(x.startswith(" ") for x in v)


@pytest.mark.parametrize("text,word,expected", [
    ("bowl", "owl", False),
    ("a bowl of owls", "owl", True),
    ("owls", "owl", True),
    ("Owl!", "owl", True),
    ("OWL", "owl", True),
    ("the owl's nest", "owl", True),
    ("owlet", "owl", False),
    ("snowline", "owl", False),
    ("caterpillar", "cat", False),
    ("cats", "cat", True),
    ("Cat.", "cat", True),
    ("scatter", "cat", False),
    ("wolves", "wolf", True),
    ("werewolf", "wolf", False),
    ("foxes", "fox", True),
    ("firefox", "fox", False),
    ("cherries", "cherry", True),
    ("oaks", "oak", True),
    ("cloak", "oak", False),
    ("pineapple", "pine", False),
    ("fir-tree", "fir", True),
    ("first", "fir", False),
    ("elm\n", "elm", True),
    ("helm", "elm", False),
])
def test_matches(text: str, word: str, expected: bool) -> None:
    assert matches(text, word) is expected


def test_first_match() -> None:
    animals = CATEGORIES["animals"].candidates
    assert first_match("Owl.", animals, "animals") == "owl"
    assert first_match("I'd say wolves, then owls", animals, "animals") == "wolf"
    assert first_match("A bowl of caterpillars", animals, "animals") is None
    assert first_match("Cats and dogs", animals, "animals") == "cat"
    assert first_match("a dog, not a cat", animals, CATEGORIES["animals"]) == "dog"
    assert first_match("octopuses!", animals) == "octopus"
    assert first_match("", animals, "animals") is None
    trees = CATEGORIES["trees"].candidates
    assert first_match("Cherry blossoms", trees, "trees") == "cherry"
    assert first_match("Pineapple", trees, "trees") is None
