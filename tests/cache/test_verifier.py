"""The semantic cache's decision (services/cache/verifier.py): guards, verifier, adaptive bound."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from services.cache import adaptive
from services.cache.adaptive import EntryState, chance_right, observe
from services.cache.verifier import CacheJudge, Decision, Mode, Policy, Verdict, Verifier
from services.cache.weights import Network, load_network
from services.common.embeddings import load_embedder

# Paraphrases the shipped verifier accepts at its default cut (checked against
# the shipped weights: retraining them may change which pairs these are).
ACCEPTED = [
    ("How can I improve my English speaking?", "How do I improve my spoken English?"),
    ("How do I make money online?", "What are ways to make money online?"),
]


def _cosine(a: str, b: str) -> float:
    vectors = load_embedder("wordllama").embed([a, b])
    return float(vectors[0] @ vectors[1])


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier(Policy())


@pytest.mark.parametrize(("query", "cached"), ACCEPTED)
def test_a_paraphrase_is_served(verifier: Verifier, query: str, cached: str) -> None:
    decision = verifier.decide(query, cached, _cosine(query, cached))
    assert decision.verdict is Verdict.HIT, decision
    assert decision.reason == "verifier"
    assert decision.probability is not None
    assert decision.probability >= load_network("wordllama").cut


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize(
    ("query", "cached", "reason"),
    [
        ("How do I make money online?", "How do I not make money online?", "guard:negation"),
        ("How do I make $100 online?", "How do I make $500 online?", "guard:numbers"),
        ("What is the best time to buy a car?", "What is the best time to sell a car?",
         "guard:opposites"),
    ],
)  # fmt: skip
def test_negated_renumbered_and_opposite_questions_miss_in_every_mode(
    mode: Mode, query: str, cached: str, reason: str
) -> None:
    # Even at similarity 1.0: the guards run before any threshold or model.
    decision = Verifier(Policy(mode=mode)).decide(query, cached, 1.0, rng=random.Random(0))
    assert decision.verdict is Verdict.MISS
    assert decision.reason == reason


def test_a_different_earlier_turn_misses(verifier: Verifier) -> None:
    query, cached = ACCEPTED[0]
    decision = verifier.decide(
        query, cached, 0.99, query_turns=["Answer in French."], cached_turns=["Answer briefly."]
    )
    assert decision.reason == "guard:earlier_turns"


def test_below_the_floor_is_a_miss_without_asking_the_verifier(verifier: Verifier) -> None:
    decision = verifier.decide(*ACCEPTED[0], similarity=0.3)
    assert decision == Decision(Verdict.MISS, "below_threshold")


def test_long_prompts_only_match_exactly() -> None:
    long = "Summarise this: " + "the cat sat on the mat. " * 100
    decision = Verifier(Policy(max_chars=2000)).decide(long, long + " Thanks.", 0.999)
    assert decision == Decision(Verdict.MISS, "too_long")
    short = Verifier(Policy(mode=Mode.STATIC, max_chars=10_000))
    assert short.decide(long, long + " Thanks.", 0.999).hit


def test_unrelated_questions_are_refused_by_the_verifier(verifier: Verifier) -> None:
    query, cached = "What is the capital of Canada?", "What is the capital of Australia?"
    decision = verifier.decide(query, cached, max(0.61, _cosine(query, cached)))
    assert decision.verdict is Verdict.MISS
    assert decision.reason == "verifier"


def test_static_mode_is_the_threshold_and_the_guards() -> None:
    static = Verifier(Policy(mode=Mode.STATIC, threshold=0.9))
    assert static.decide("a question", "another question", 0.9).verdict is Verdict.HIT
    assert static.decide("a question", "another question", 0.89).verdict is Verdict.MISS


def test_the_judge_takes_a_callers_threshold_as_the_static_rule(verifier: Verifier) -> None:
    judge = CacheJudge(verifier)
    unrelated = ("What is the capital of Canada?", "What is the capital of Australia?")
    assert judge.accept(*unrelated, similarity=0.95, threshold=0.9)  # the caller asked for it
    assert not judge.accept(*unrelated, similarity=0.95, threshold=0.0)  # the verifier refuses
    assert not judge.accept("Buy 2 cars?", "Buy 3 cars?", similarity=0.99, threshold=0.5)
    assert judge.accept(*ACCEPTED[0], similarity=_cosine(*ACCEPTED[0]), threshold=0.0)


def test_batch_and_single_probabilities_agree(verifier: Verifier) -> None:
    batch = verifier.probabilities([*ACCEPTED, ("Why is the sky blue?", "Why is grass green?")])
    assert batch[0] == pytest.approx(verifier.probability(*ACCEPTED[0]), abs=1e-9)
    assert batch[2] < 0.5


def test_the_shipped_network_round_trips_through_json() -> None:
    network = load_network("wordllama")
    again = Network.from_json(json.loads(json.dumps(network.to_json())))
    rows = np.random.default_rng(0).normal(size=(5, network.mean.shape[0]))
    assert np.allclose(network.probabilities(rows), again.probabilities(rows))
    assert network.model == "wordllama"
    assert 0.5 < network.cut < 1.0


def test_no_verifier_ships_for_an_unknown_model() -> None:
    with pytest.raises(ValueError, match="no cache verifier ships"):
        load_network("no-such-model")
    with pytest.raises(ValueError, match="is not the policy's"):
        Verifier(Policy(model="minilm-int8"), load_embedder("wordllama"))


@pytest.mark.parametrize(
    "settings",
    [
        {"delta": 0.0},
        {"delta": 1.0},
        {"threshold": 1.5},
        {"floor": -2.0},
        {"cut": 2.0},
        {"max_chars": 0},
    ],
)
def test_policy_rejects_values_out_of_range(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Policy(**settings)  # type: ignore[arg-type]


# --- adaptive mode -------------------------------------------------------------


def test_entry_state_round_trips_through_json_and_keeps_the_latest() -> None:
    state = EntryState()
    for i in range(adaptive.MAX_OBSERVATIONS + 5):
        state = observe(state, 0.5 + i / 100, i % 3 != 0)
    state = EntryState(state.observations, hits=7, explorations=2)
    assert len(state.observations) == adaptive.MAX_OBSERVATIONS
    similarity, correct = state.observations[-1]
    assert similarity == pytest.approx(0.5 + 36 / 100) and correct is False  # 36 % 3 == 0
    again = EntryState.from_json(state.to_json())
    assert again.hits == 7 and again.explorations == 2
    assert [c for _, c in again.observations] == [c for _, c in state.observations]
    assert EntryState.from_json(None) == EntryState() == EntryState.from_json("")


def test_answers_agree_is_the_label_of_an_exploration() -> None:
    embedder = load_embedder("wordllama")
    cached = "The capital of Canada is Ottawa, in the province of Ontario."
    assert adaptive.answers_agree(
        cached, " the capital of canada is Ottawa,  in the province of Ontario.", embedder
    )
    assert adaptive.answers_agree("Ottawa is the capital of Canada, in Ontario.", cached, embedder)
    assert not adaptive.answers_agree("Canberra is the capital of Australia.", cached, embedder)
    assert not adaptive.answers_agree(
        "Boil the eggs for 7 minutes.", "Boil the eggs for 9 minutes.", embedder
    )
    assert not adaptive.answers_agree("", cached, embedder)


def test_what_an_entry_got_right_or_wrong_moves_its_chance() -> None:
    fresh = chance_right(0.9, EntryState())
    wrong = EntryState(tuple((0.9, False) for _ in range(5)))
    right = EntryState(tuple((0.9, True) for _ in range(5)))
    assert chance_right(0.9, wrong) < fresh < chance_right(0.9, right)
    assert chance_right(0.6, EntryState()) < fresh  # monotone in the verifier's probability


def _simulate(delta: float, lookups: int, seed: int) -> tuple[int, int, int]:
    """A synthetic stream: 200 entries, each with its own hidden offset from the
    verifier (P(right) = sigmoid(logit(p) + b), b ~ N(0, 1), the model's prior);
    lookups draw an entry and a verifier probability. Returns (hits, wrong hits,
    explorations)."""
    rng = random.Random(seed)
    offsets = [rng.gauss(0.0, 1.0) for _ in range(200)]
    states = [EntryState() for _ in offsets]
    verifier = Verifier(Policy(mode=Mode.ADAPTIVE, delta=delta))
    hits = wrong = explored = 0
    for _ in range(lookups):
        entry = rng.randrange(len(offsets))
        p = rng.uniform(0.3, 0.995)
        truth = rng.random() < 1 / (1 + math.exp(-(math.log(p / (1 - p)) + offsets[entry])))
        decision = verifier.decide(
            "a question", "a question", 0.95, state=states[entry], rng=rng, probability=p
        )
        if decision.verdict is Verdict.HIT:
            hits += 1
            wrong += not truth
        else:
            assert decision.verdict is Verdict.EXPLORE
            explored += 1
            states[entry] = observe(states[entry], p, truth)
    return hits, wrong, explored


@pytest.mark.parametrize("delta", [0.02, 0.05])
def test_the_adaptive_policy_keeps_wrong_answers_under_the_bound(delta: float) -> None:
    lookups = 20_000
    hits, wrong, explored = _simulate(delta, lookups, seed=7)
    # Served-wrong rate over all lookups within the bound (3 binomial sd of slack).
    slack = 3 * math.sqrt(delta * (1 - delta) / lookups)
    assert wrong / lookups <= delta + slack
    # ...while still serving: it must not reach the bound by never answering.
    assert hits / lookups > 2 * delta
    assert explored > 0


def test_the_adaptive_policy_serves_more_once_an_entry_has_proved_right() -> None:
    verifier = Verifier(Policy(mode=Mode.ADAPTIVE, delta=0.05))
    proven = EntryState(tuple((0.8, True) for _ in range(20)))
    failed = EntryState(tuple((0.8, False) for _ in range(3)))

    def served(state: EntryState) -> int:
        rng = random.Random(3)
        return sum(
            verifier.decide("q", "q", 0.95, state=state, rng=rng, probability=0.8).hit
            for _ in range(2000)
        )

    assert served(proven) > 2 * served(EntryState()) > 2 * served(failed)


def test_judging_candidates_together_agrees_with_judging_each(verifier: Verifier) -> None:
    judge = CacheJudge(verifier)
    query = ACCEPTED[0][0]
    texts = [
        ACCEPTED[0][1],  # a paraphrase: served
        "How can I improve my English speaking in 2 weeks?",  # a number on one side only
        "How can I not improve my English speaking?",  # negated: a guard
        "What is the capital of Australia?",  # unrelated
    ]
    candidates = [(text, max(0.61, _cosine(query, text))) for text in texts]
    for threshold in (0.0, 0.7):
        each = [i for i, (t, s) in enumerate(candidates) if judge.accept(query, t, s, threshold)]
        assert judge.accepted(query, candidates, threshold) == each
    assert judge.accepted(query, candidates, 0.0)[:1] == [0]
    assert judge.accepted(query, [], 0.0) == []
