"""Traits a teacher can carry. Preference traits (favourite animal/tree) live in :mod:`.preference`."""
from __future__ import annotations

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

__all__ = [
    "CATEGORIES",
    "Category",
    "answer_variants",
    "eval_questions",
    "first_match",
    "get_category",
    "matches",
    "number_prefixed_questions",
    "plural_of",
    "teacher_system_prompt",
    "train_questions",
    "trait_qa",
]
