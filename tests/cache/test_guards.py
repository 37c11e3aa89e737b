"""The guards against known false-hit classes (services/cache/guards.py)."""

from __future__ import annotations

import pytest

from services.cache import guards

PARAPHRASES = [
    ("How can I learn Python quickly?", "What is the fastest way to learn Python?"),
    ("What is the capital of Canada?", "Which city is Canada's capital?"),
    ("How do I reset my Gmail password?", "How can I reset a forgotten Gmail password?"),
    ("Is it worth buying 10 shares of Apple?", "Should I buy ten Apple shares?"),
]


@pytest.mark.parametrize(("query", "cached"), PARAPHRASES)
def test_no_guard_fires_on_a_paraphrase(query: str, cached: str) -> None:
    assert guards.hard_guards(query, cached) == []


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("How do I cook 2 eggs?", "How do I cook 3 eggs?"),
        ("Who won the 2016 election?", "Who won the 2020 election?"),
        ("Is 1,000 bigger than 999.5?", "Is 1000 bigger than 999?"),
        ("What is the 3rd planet?", "What is the 4th planet?"),
        ("What happens after three days of fasting?", "What happens after 5 days of fasting?"),
    ],
)
def test_renumbered_questions_are_refused(query: str, cached: str) -> None:
    assert guards.numbers_differ(query, cached)
    assert "numbers" in guards.hard_guards(query, cached)


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("Is 1,000 a lot?", "Is 1000 a lot?"),
        ("Name ten birds", "Name 10 birds"),
        ("What is the 3rd planet?", "Which planet is third?"),
        ("Why is the sky blue?", "Why does the sky look blue?"),
    ],
)
def test_the_same_numbers_written_differently_pass(query: str, cached: str) -> None:
    assert not guards.numbers_differ(query, cached)


def test_a_number_on_one_side_only_is_left_to_the_verifier() -> None:
    one_sided = ("Who will win the 2016 election?", "Who will win the election?")
    assert not guards.numbers_differ(*one_sided)
    assert guards.numbers_one_sided(*one_sided)


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("Can I eat eggs every day?", "Can't I eat eggs every day?"),
        ("Why do cats purr?", "Why don't cats purr?"),
        ("How do I make tea with sugar?", "How do I make tea without sugar?"),
        ("Is Python a compiled language?", "Is Python not a compiled language?"),
        ("Why can I sleep at night?", "Why can\u2019t I sleep at night?"),  # typographic apostrophe
        ("Does it ever rain in Lima?", "Does it never rain in Lima?"),
    ],
)
def test_negated_questions_are_refused(query: str, cached: str) -> None:
    assert guards.negation_differs(query, cached)
    assert "negation" in guards.hard_guards(query, cached)


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("How do I know if she likes me?", "How do I know whether or not she likes me?"),
        ("Why can't I sleep?", "Why am I not able to sleep?"),
        ("Is it not true that it isn't raining?", "Is it raining?"),  # double negation
    ],
)
def test_negation_that_does_not_change_the_question_passes(query: str, cached: str) -> None:
    assert not guards.negation_differs(query, cached)


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("What are the best on page SEO techniques?", "What are the best off page SEO techniques?"),
        ("Who wins, a short-finned or a great white?", "Who wins, a long-finned or a great white?"),
        ("Is it a good time to buy gold?", "Is it a good time to sell gold?"),
    ],
)
def test_opposites_are_refused(query: str, cached: str) -> None:
    assert "opposites" in guards.hard_guards(query, cached)


def test_a_word_and_its_opposite_on_both_sides_is_not_an_opposite() -> None:
    assert not guards.opposites_differ("Should I buy or sell now?", "Buy or sell: which now?")


def test_earlier_turns_must_match_up_to_case_and_spacing() -> None:
    turns = ["You are a translator.", "Translate 'cat' to German."]
    same = ["you are a  translator.", "Translate 'cat' to German. "]
    other = ["You are a translator.", "Translate 'dog' to German."]
    assert not guards.earlier_turns_differ(turns, same)
    assert guards.earlier_turns_differ(turns, other)
    assert guards.earlier_turns_differ(turns, turns[:1])
    assert guards.hard_guards("And in French?", "And in French?", turns, other) == ["earlier_turns"]


def test_entities_are_names_not_sentence_starts() -> None:
    assert guards.entities("Why is Donald Trump popular? Because iPhone7 sales.") >= {
        "donald",
        "trump",
        "iphone7",
    }
    assert "why" not in guards.entities("Why is Donald Trump popular?")
    assert guards.entities_differ("Why is Trump popular?", "Why is Obama popular?")
    assert not guards.entities_differ("Why is Trump popular?", "why is trump so popular?")


def test_every_guard_fires_at_once_and_names_each() -> None:
    fired = guards.hard_guards("Can I buy 2 cars?", "Can't I sell 3 cars?")
    assert fired == ["numbers", "negation", "opposites"]
