"""VQA-style answer normalisation and exact-match scoring.

Why: a free-form answer ("Two.", "the Circle") must count as right when it says the same thing as the
reference ("2", "circle"); the rules are the usual VQA ones, kept small: lower case, punctuation and articles
removed, number words to digits, whitespace collapsed.
"""

from __future__ import annotations

import re

NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# A period between digits is a decimal point and stays; every other punctuation mark becomes a space.
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: 'The Two circles.' -> '2 circles'."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(NUMBERS.get(word, word) for word in words if word not in ARTICLES)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the prediction says the reference answer, after normalisation of both."""
    return normalize_answer(prediction) == normalize_answer(answer)
