"""Task analysis: the type and complexity the router sees in a prompt."""

from __future__ import annotations

import pytest

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router import tasks


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Translate 'good morning, how are you?' into French.", chat_api.TASK_TYPE_TRANSLATION),
        ("Summarize this article in three bullet points: ...", chat_api.TASK_TYPE_SUMMARIZATION),
        (
            "Extract every person and date from the text below as JSON with fields name, date.",
            chat_api.TASK_TYPE_EXTRACTION,
        ),
        (
            "Classify the sentiment of this review: 'awful service'",
            chat_api.TASK_TYPE_CLASSIFICATION,
        ),
        (
            "Write a Python function that parses a CSV file.\n```python\ndef parse(path):\n```",
            chat_api.TASK_TYPE_CODE,
        ),
        (
            "Tom has 12 apples and buys 3 times as many. How many apples does he have in total?",
            chat_api.TASK_TYPE_MATH,
        ),
        ("Write a short poem about the sea at night.", chat_api.TASK_TYPE_CREATIVE_WRITING),
        (
            "Which of the following is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:",
            chat_api.TASK_TYPE_REASONING,
        ),
        ("hello there, nice to meet you", chat_api.TASK_TYPE_CHAT),
        ("", chat_api.TASK_TYPE_CHAT),
    ],
)
def test_the_task_type_is_inferred_from_the_prompt(
    prompt: str, expected: chat_api.TaskType.ValueType
) -> None:
    assert tasks.analyze(prompt).task_type == expected


def test_a_type_the_caller_states_is_kept() -> None:
    analysis = tasks.analyze("Translate this into German", chat_api.TASK_TYPE_CODE)
    assert analysis.task_type == chat_api.TASK_TYPE_CODE


def test_complexity_grows_with_length_steps_and_specialist_vocabulary() -> None:
    simple = tasks.analyze("What is the capital of France?")
    expert = tasks.analyze(
        " ".join(
            [
                "Consider the Hamiltonian eigendecomposition of a non-commutative operator.",
                "Derive the thermodynamically consistent renormalization of 3 + 4 * x = 12.",
                "Then prove the characterization holds for 17, 23, 42 and 91 simultaneously?",
                "Finally, what are the implications for electrodynamics and superconductivity?",
            ]
            * 20
        )
    )
    assert simple.complexity == chat_api.COMPLEXITY_SIMPLE
    assert expert.complexity == chat_api.COMPLEXITY_EXPERT
    assert simple.describe() == "chat task, simple"


def test_features_are_named_and_bounded() -> None:
    analysis = tasks.analyze("How much is 2 + 2? And 3 * 3?" * 50)
    assert len(analysis.features) == len(tasks.FEATURE_NAMES)
    assert all(0.0 <= f <= 1.0 for f in analysis.features)
    one_hot = analysis.features[: len(tasks.FEATURE_NAMES) - 8]
    assert sorted(one_hot)[-1] == 1.0 and sum(one_hot) == 1.0
    assert tasks.FEATURE_NAMES[one_hot.index(1.0)] == "type_math"


def test_the_analysis_reads_the_system_prompt_and_the_last_user_message() -> None:
    def message(role: chat_pb2.Role.ValueType, text: str) -> chat_pb2.Message:
        return chat_pb2.Message(role=role, content=[chat_pb2.ContentPart(text=text)])

    messages = [
        message(chat_pb2.ROLE_SYSTEM, "You are a translator."),
        message(chat_pb2.ROLE_USER, "Write a poem"),
        message(chat_pb2.ROLE_ASSISTANT, "Roses are red"),
        message(chat_pb2.ROLE_USER, "Now translate it into Spanish"),
    ]
    text = tasks.prompt_text(messages)
    assert text == "You are a translator.\nNow translate it into Spanish"
    assert tasks.analyze(text).task_type == chat_api.TASK_TYPE_TRANSLATION
