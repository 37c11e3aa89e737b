"""Guards against the known classes of false semantic hits.

An embedding says two prompts are *about* the same thing; it is nearly blind
to the small words that make them ask different things. Each guard here looks
for one such difference between a query and a cached prompt. They are pure
functions of the two texts (no model, no I/O), cheap enough to run on every
candidate, and each errs towards "different": a guard that fires turns a
would-be hit into a miss, which costs one model call, never a wrong answer.

* :func:`numbers_differ` — the prompts mention different numbers ("2 eggs" /
  "3 eggs", "in 2016" / "in 2017"; "ten" and "10" are the same). A number on
  one side only ("the 2016 election" / "the election") is left to the
  verifier: in the data it mostly only adds precision.
* :func:`negation_differs` — one prompt is negated and the other is not
  ("can I" / "can't I", "with sugar" / "without sugar").
* :func:`opposites_differ` — one prompt has a word where the other has its
  opposite ("on-page" / "off-page SEO", "short-finned" / "long-finned").
* :func:`earlier_turns_differ` — the conversations before the last user
  message differ (same follow-up question, different context). The semantic
  layer already scopes its search by the earlier turns
  (:mod:`services.cache.scope`), so there it never fires; it is here for
  callers that compare whole conversations.
* :func:`entities_differ` — a name (a capitalised word inside the sentence, or
  a word with a digit or inner capital such as "iPhone7") is in one prompt and
  not the other ("Trump" / "Obama"). Capitalisation is a weak signal, so this
  one is a feature of the verifier rather than a hard refusal.

:func:`hard_guards` runs the guards that refuse outright and names those that
fired. Measured on the QQP training half, pairs at cosine >= 0.85: they
refuse 6.6% of the pairs, of which 33% are labelled duplicates (69% of those
they let through), at a cost of 3.3% of the duplicates (numbers: 27%
duplicates among those it refuses; negation 40%; opposites 42%).
:mod:`services.cache.verifier` refuses on them, and :mod:`services.cache.features`
uses them and the finer signals as the verifier's features.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*", re.UNICODE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?(?!\w)|\d+")

_NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000",
    "third": "3", "fourth": "4", "fifth": "5", "sixth": "6",
    "seventh": "7", "eighth": "8", "ninth": "9", "tenth": "10", "twice": "2", "triple": "3",
}  # fmt: skip

_NEGATIONS = _wordset(
    "not no never none nobody nothing neither nor nowhere without cannot cant dont doesnt "
    "didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt "
    "neednt aint nope non"
)

_EITHER_WAY = re.compile(r"\bor (?:not|no)\b")
_AUX = _wordset("do does did is are was were wo would should could has have had must need ca")

#: Words too common to carry the meaning of a question (used by the lexical features).
STOPWORDS = _wordset(
    "a an the and or but if of at by for with about against between into through during "
    "before after above below to from up down in out on off over under again further then "
    "once here there all any both each few more most other some such only own same so than "
    "too very s t can will just should now i me my myself we our ours you your yours he "
    "him his she her it its they them their what which who whom this that these those am "
    "is are was were be been being have has had having do does did doing would could ought "
    "i'm you're it's that's what's there's let's how why when where get got best good way "
    "ways one someone something anyone anything people much many also like really thing "
    "things make use used using know want need go going"
)


def normalise(text: str) -> str:
    """Lower-cased NFKC text with typographic apostrophes made plain."""
    return unicodedata.normalize("NFKC", text).replace("\u2019", "'").lower()


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased, apostrophes dropped ("don't" -> "dont")."""
    return [w.replace("'", "") for w in _WORD.findall(normalise(text))]


def content_words(text: str) -> list[str]:
    """:func:`words` without :data:`STOPWORDS` and negations."""
    return [w for w in words(text) if w not in STOPWORDS and w not in _NEGATIONS]


def numbers(text: str) -> Counter[str]:
    """The numbers ``text`` mentions, as canonical strings (digits or number words).

    "1,000" and "1000" are the same number; "10" and "ten" too; "3rd" is "3".
    Words that are numbers only sometimes ("one", "first", "second") are not
    counted.
    """
    found: Counter[str] = Counter()
    for raw in _NUMBER.findall(normalise(text)):
        value = re.sub(r"(st|nd|rd|th)$", "", raw.replace(",", "")).lstrip("+")
        try:
            number = float(value)
        except ValueError:
            continue
        found[f"{number:g}"] += 1
    for word in words(text):
        if word in _NUMBER_WORDS:
            found[f"{float(_NUMBER_WORDS[word]):g}"] += 1
    return found


def numbers_differ(a: str, b: str) -> bool:
    """Whether both texts mention numbers, and not the same set of them.

    A number in only one text ("the 2016 election" / "the election") is left to
    the verifier (:func:`numbers_one_sided`): it often only adds precision.
    """
    na, nb = set(numbers(a)), set(numbers(b))
    return bool(na) and bool(nb) and na != nb


def numbers_one_sided(a: str, b: str) -> bool:
    """Whether exactly one of the texts mentions a number."""
    return bool(numbers(a)) != bool(numbers(b))


def negations(text: str) -> int:
    """How many negation words ``text`` has ("n't" counts, so does "without")."""
    # "whether or not" / "or no" ask both ways: they negate nothing.
    tokens = words(_EITHER_WAY.sub(" ", normalise(text)))
    return sum(1 for w in tokens if w in _NEGATIONS or (w.endswith("nt") and w[:-2] in _AUX))


def negation_differs(a: str, b: str) -> bool:
    """Whether one text is negated and the other is not (odd vs even negations)."""
    return negations(a) % 2 != negations(b) % 2


def earlier_turns_differ(query_turns: Sequence[str], cached_turns: Sequence[str]) -> bool:
    """Whether the turns before the last user message differ.

    Args:
        query_turns: The query's earlier messages (system prompt and every turn
            before its last user message), in order.
        cached_turns: The same for the cached prompt.

    The comparison is exact up to case and whitespace: a follow-up ("and in
    French?") means something else after another earlier turn, and an
    embedding of the whole conversation hides a changed turn behind the
    shared ones.
    """
    if len(query_turns) != len(cached_turns):
        return True
    return any(_squash(q) != _squash(c) for q, c in zip(query_turns, cached_turns, strict=True))


def _squash(text: str) -> str:
    return " ".join(normalise(text).split())


def entities(text: str) -> set[str]:
    """Words that look like names: capitalised inside a sentence, or with a digit or
    inner capital ("iPhone7", "COVID19"); lower-cased."""
    out: set[str] = set()
    sentence_start = True
    for match in re.finditer(r"\S+", unicodedata.normalize("NFKC", text)):
        token = match.group()
        word = re.sub(r"^[^\w]+|[^\w]+$", "", token)
        if word:
            looks_named = (
                (word[0].isupper() and not sentence_start and word.lower() != "i")
                or (any(c.isdigit() for c in word) and any(c.isalpha() for c in word))
                or any(c.isupper() for c in word[1:])
            )
            if looks_named and word.lower() not in STOPWORDS:
                out.add(word.lower())
        sentence_start = token[-1] in ".?!:" if token else sentence_start
    return out


def entities_differ(a: str, b: str) -> bool:
    """Whether a name in one text is missing from the other (compared as words)."""
    words_a, words_b = set(words(a)), set(words(b))
    return any(e not in words_b for e in entities(a) - entities(b)) or any(
        e not in words_a for e in entities(b) - entities(a)
    )


_OPPOSITES = (
    ("on", "off"), ("in", "out"), ("before", "after"), ("up", "down"), ("best", "worst"),
    ("more", "less"), ("most", "least"), ("high", "low"), ("higher", "lower"),
    ("long", "short"), ("longer", "shorter"), ("big", "small"), ("bigger", "smaller"),
    ("male", "female"), ("men", "women"), ("man", "woman"), ("buy", "sell"),
    ("buying", "selling"), ("open", "close"), ("start", "stop"), ("win", "lose"),
    ("good", "bad"), ("pros", "cons"), ("advantages", "disadvantages"), ("fast", "slow"),
    ("increase", "decrease"), ("gain", "lose"), ("old", "new"), ("first", "last"),
    ("hot", "cold"), ("import", "export"), ("rich", "poor"), ("legal", "illegal"),
    ("positive", "negative"), ("maximum", "minimum"), ("cheap", "expensive"),
    ("easy", "hard"), ("to", "from"), ("above", "below"), ("inside", "outside"),
)  # fmt: skip


def opposites_differ(a: str, b: str) -> bool:
    """Whether one text has a word where the other has its opposite
    ("on page" / "off page", "short-finned" / "long-finned", "buy" / "sell")."""
    words_a, words_b = set(words(a)), set(words(b))
    return any(
        (x in words_a and y in words_b and x not in words_b and y not in words_a)
        or (y in words_a and x in words_b and y not in words_b and x not in words_a)
        for x, y in _OPPOSITES
    )


def hard_guards(
    query: str,
    cached: str,
    query_turns: Sequence[str] = (),
    cached_turns: Sequence[str] = (),
) -> list[str]:
    """The names of the guards that refuse this pair outright (empty: none fired).

    Names: ``numbers``, ``negation``, ``opposites``, ``earlier_turns``.
    """
    fired = []
    if numbers_differ(query, cached):
        fired.append("numbers")
    if negation_differs(query, cached):
        fired.append("negation")
    if opposites_differ(query, cached):
        fired.append("opposites")
    if earlier_turns_differ(query_turns, cached_turns):
        fired.append("earlier_turns")
    return fired
