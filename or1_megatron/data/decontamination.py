"""Decontamination: drop training problems whose word n-grams overlap an evaluation set's.

Owns text normalisation and the n-gram index. A training problem is contaminated when a large
share of its n-grams (lower-cased words, punctuation and LaTeX markup removed) occurs in the
evaluation problems; a text shorter than n words is compared whole. N-grams found in a large share of the
evaluation problems are prompt boilerplate ("Let's think step by step and output the final answer
within \\boxed{}"), not content, and are ignored.
"""
from __future__ import annotations

import collections
import logging
import re
from typing import Iterable, Sequence

from or1_megatron.data.records import ProblemRecord

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: `$x^{2}$` and `x^2` give the same words."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class NgramIndex:
    """The n-grams of a set of evaluation texts, with prompt boilerplate cut out.

    An n-gram in at least `boilerplate_share` of the texts (and in 2 or more) is boilerplate; the
    words it covers are removed from every text (evaluation and training alike) before n-grams are
    taken, so no n-gram straddles a problem and its instruction.
    """

    def __init__(self, texts: Iterable[str], n: int = 13, boilerplate_share: float = 0.2) -> None:
        self.n = n
        documents = [words(text) for text in texts]
        frequency: collections.Counter[tuple[str, ...]] = collections.Counter()
        for tokens in documents:
            frequency.update(ngrams(tokens, n))
        limit = max(2, boilerplate_share * len(documents))
        self.boilerplate = {gram for gram, count in frequency.items() if count >= limit and len(gram) == n}
        self.grams: set[tuple[str, ...]] = set()
        for tokens in documents:
            self.grams |= self.content_ngrams(tokens)

    def content_ngrams(self, tokens: Sequence[str]) -> set[tuple[str, ...]]:
        n = self.n
        covered = [False] * len(tokens)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i:i + n]) in self.boilerplate:
                covered[i:i + n] = [True] * n
        segments: list[list[str]] = [[]]
        for token, is_boilerplate in zip(tokens, covered):
            if is_boilerplate:
                if segments[-1]:
                    segments.append([])
            else:
                segments[-1].append(token)
        content = [token for segment in segments for token in segment]
        if len(content) < n:
            return {tuple(content)} if content else set()
        return {gram for segment in segments if len(segment) >= n for gram in ngrams(segment, n)}

    def overlap(self, text: str) -> float:
        """Share of the text's content n-grams that occur in the evaluation texts."""
        grams = self.content_ngrams(words(text))
        return len(grams & self.grams) / len(grams) if grams else 0.0


def decontaminate(train: Sequence[ProblemRecord], evaluation: Sequence[ProblemRecord],
                  n: int = 13, min_overlap: float = 0.5) -> tuple[list[ProblemRecord], list[ProblemRecord]]:
    """(kept, removed): a training record is removed when at least `min_overlap` of its n-grams
    occur in `evaluation`. A share, not "any n-gram": stock phrases of a competition ("where m and
    n are relatively prime positive integers. Find m+n") put single 13-grams into 18% of the
    AIME 1983-2023 problems that are not copies of AIME 2024/25; real copies share over 90%."""
    index = NgramIndex((record.question for record in evaluation), n)
    kept: list[ProblemRecord] = []
    removed: list[ProblemRecord] = []
    for record in train:
        (removed if index.overlap(record.question) >= min_overlap else kept).append(record)
    logger.info("decontamination (%d-grams, overlap >= %.2f, against %d evaluation problems): "
                "removed %d of %d training problems", n, min_overlap, len(evaluation), len(removed),
                len(train))
    return kept, removed
