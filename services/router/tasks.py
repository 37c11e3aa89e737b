"""Task analysis: what kind of task a prompt is, and how hard it looks.

Cheap and pure: a handful of precompiled regular expressions over the last user
message (and the system prompt), no model and no I/O; tens of microseconds for a
typical prompt (the text is capped at :data:`MAX_CHARS`). The result is shown in
``Route``'s reason and is part of the learned policy's features
(:mod:`services.router.learning`).

* Task type: each type has a pattern of tell-tale words and shapes (a code
  fence, ``translate … into``, ``A. … B. … C.`` choices, arithmetic); the type
  with the most hits wins, ties going to the earlier type in :data:`_PATTERNS`;
  no hit at all is chat. A type the caller states (``RoutingHints.task_type``)
  is kept as is.
* Complexity: points for length, the number of sentences or steps, numbers
  and operators, specialist vocabulary (long words) and multi-part questions,
  mapped to simple (0-1 point), moderate (2-3), complex (4-5), expert (6+).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TypeAlias

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api

MAX_CHARS = 8_000

TaskType: TypeAlias = chat_api.TaskType.ValueType
Complexity: TypeAlias = chat_api.Complexity.ValueType

# Order matters only for ties: the more specific kinds come first.
_PATTERNS: tuple[tuple[TaskType, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        (
            chat_api.TASK_TYPE_TRANSLATION,
            r"\btranslat\w*|\binto (?:english|french|german|spanish|italian|chinese|japanese"
            r"|portuguese|russian|arabic|korean|dutch)\b|\bin (?:french|german|spanish|italian"
            r"|chinese|japanese|portuguese|russian)\b",
        ),
        (
            chat_api.TASK_TYPE_SUMMARIZATION,
            r"\bsummar\w*|\btl;?dr\b|\bkey (?:points|takeaways)\b|\bcondense\b|\bin a nutshell\b"
            r"|\bbrief overview\b",
        ),
        (
            chat_api.TASK_TYPE_EXTRACTION,
            r"\bextract\w*|\bpull out\b|\blist (?:all|every)\b|\bas json\b|\bjson (?:object|with)\b"
            r"|\bparse\b|\bfields?\b|\bnamed entit\w*",
        ),
        (
            chat_api.TASK_TYPE_CLASSIFICATION,
            r"\bclassif\w*|\bcategori[sz]\w*|\bsentiment\b|\blabel (?:it|this|the)\b"
            r"|\bis (?:this|it) (?:spam|positive|negative)\b|\bwhich category\b",
        ),
        (
            chat_api.TASK_TYPE_CODE,
            r"```|\bdef \w+\(|\bclass \w+[:(]|\bfunction\b|\bimport \w+|#include|\bpython\b"
            r"|\bjavascript\b|\btypescript\b|\bjava\b|\brust\b|\bgolang\b|\bc\+\+|\bsql\b"
            r"|\bregex\b|\bcompile\w*|\bstack ?trace\b|\bbug\b|\brefactor\w*|\bunit tests?\b"
            r"|\bcode\b|\bscript\b|[{};]\s*\n",
        ),
        (
            chat_api.TASK_TYPE_MATH,
            r"\bhow (?:many|much)\b|\bcalculat\w*|\bsolve\b|\bequation\w*|\bpercent\w*|%"
            r"|\baverage\b|\bprobabilit\w*|\bintegral\b|\bderivative\b|\bsum of\b|\btotal\b"
            r"|\$\s?\d|\d\s*[-+*/^=\u00d7\u00f7]\s*\d"
            r"|\b\d+(?:\.\d+)?\s*(?:dollars|cents|hours|minutes"
            r"|miles|meters|km|kg|pounds|years|days)\b",
        ),
        (
            chat_api.TASK_TYPE_CREATIVE_WRITING,
            r"\b(?:write|compose) (?:me )?(?:a|an) (?:\w+ )?(?:poem|story|song|haiku|limerick"
            r"|essay|slogan|tagline|joke|script|letter)\b|\bpoem\b|\bstory\b|\bhaiku\b"
            r"|\bslogan\b|\bimagine\b|\bfiction\w*",
        ),
        (
            chat_api.TASK_TYPE_REASONING,
            r"\bwhy\b|\bexplain\w*|\bwhich of the following\b|\bstatement \d\b"
            r"|\btrue or false\b|\bprove\b|\blogic\w*|\binfer\w*|\bdeduc\w*|\bconclu\w*"
            r"|\bimpl(?:y|ies)\b|\bcompare\b|(?m:^\s*[A-D][.)] )",
        ),
    )
)

_TYPES: tuple[TaskType, ...] = (
    chat_api.TASK_TYPE_CHAT,
    chat_api.TASK_TYPE_CODE,
    chat_api.TASK_TYPE_MATH,
    chat_api.TASK_TYPE_REASONING,
    chat_api.TASK_TYPE_SUMMARIZATION,
    chat_api.TASK_TYPE_TRANSLATION,
    chat_api.TASK_TYPE_EXTRACTION,
    chat_api.TASK_TYPE_CLASSIFICATION,
    chat_api.TASK_TYPE_CREATIVE_WRITING,
)

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_OPERATOR = re.compile(r"[-+*/^=<>\u00d7\u00f7\u221a\u2211\u222b]")
_SENTENCE = re.compile(r"[.!?](?:\s|$)|\n")
_QUESTION = re.compile(r"\?")
_CHOICES = re.compile(r"^\s*[A-D][.)]\s", re.MULTILINE)
_LONG_WORD_CHARS = 11

FEATURE_NAMES: tuple[str, ...] = (
    *(f"type_{chat_api.TaskType.Name(t).removeprefix('TASK_TYPE_').lower()}" for t in _TYPES),
    "complexity",
    "log_words",
    "numbers",
    "operators",
    "long_words",
    "sentences",
    "questions",
    "choices",
)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskAnalysis:
    """What a prompt asks for.

    Attributes:
        task_type: The task type (given by the caller or inferred).
        complexity: The inferred complexity.
        features: Numbers in about 0..1 describing the prompt, named by
            :data:`FEATURE_NAMES` (one-hot task type, then complexity and the
            measurements it came from).
    """

    task_type: TaskType
    complexity: Complexity
    features: tuple[float, ...]

    def describe(self) -> str:
        """E.g. "math task, moderate"."""
        kind = chat_api.TaskType.Name(self.task_type).removeprefix("TASK_TYPE_").lower()
        level = chat_api.Complexity.Name(self.complexity).removeprefix("COMPLEXITY_").lower()
        return f"{kind.replace('_', ' ')} task, {level}"


def prompt_text(messages: Sequence[chat_pb2.Message]) -> str:
    """The text the analysis reads: the system prompt and the last user message."""
    system: list[str] = []
    last_user = ""
    for message in messages:
        text = "\n".join(p.text for p in message.content if p.WhichOneof("part") == "text")
        if message.role == chat_pb2.ROLE_SYSTEM:
            system.append(text)
        elif message.role == chat_pb2.ROLE_USER:
            last_user = text
    return "\n".join([*system, last_user]) if system else last_user


def analyze(text: str, given: TaskType = chat_api.TASK_TYPE_UNSPECIFIED) -> TaskAnalysis:
    """Analyses one prompt.

    Args:
        text: The prompt (see :func:`prompt_text`); only the first
            :data:`MAX_CHARS` characters are read.
        given: The task type the caller stated, if any; kept when set.
    """
    text = text[:MAX_CHARS]
    task_type = given or _infer_type(text)
    words = _WORD.findall(text)
    n_words = len(words)
    numbers = len(_NUMBER.findall(text))
    operators = len(_OPERATOR.findall(text))
    long_words = sum(1 for w in words if len(w) >= _LONG_WORD_CHARS)
    sentences = len(_SENTENCE.findall(text))
    questions = len(_QUESTION.findall(text))
    choices = len(_CHOICES.findall(text))
    long_share = long_words / n_words if n_words else 0.0

    points = 0
    points += (n_words > 40) + (n_words > 150) + (n_words > 600)
    points += (sentences > 3) + (sentences > 8)
    points += (numbers > 3) + (operators > 4)
    points += (long_share > 0.06) + (long_share > 0.12)
    points += questions > 1
    complexity: Complexity
    if points <= 1:
        complexity = chat_api.COMPLEXITY_SIMPLE
    elif points <= 3:
        complexity = chat_api.COMPLEXITY_MODERATE
    elif points <= 5:
        complexity = chat_api.COMPLEXITY_COMPLEX
    else:
        complexity = chat_api.COMPLEXITY_EXPERT

    features = (
        *(1.0 if task_type == t else 0.0 for t in _TYPES),
        complexity / 4.0,
        min(math.log1p(n_words) / 8.0, 1.0),
        min(numbers / 20.0, 1.0),
        min(operators / 20.0, 1.0),
        min(long_share * 5.0, 1.0),
        min(sentences / 20.0, 1.0),
        min(questions / 5.0, 1.0),
        min(choices / 4.0, 1.0),
    )
    return TaskAnalysis(task_type, complexity, features)


def _infer_type(text: str) -> TaskType:
    best: TaskType = chat_api.TASK_TYPE_CHAT
    best_hits = 0
    for kind, pattern in _PATTERNS:
        hits = len(pattern.findall(text))
        if hits > best_hits:
            best, best_hits = kind, hits
    return best
