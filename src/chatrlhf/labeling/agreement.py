"""Agreement between labelers, and one ranking from several: pure maths over ranks (1 is best, equal ranks
tie), no database."""

from __future__ import annotations

from itertools import combinations


def aggregate_ranks(rankings: list[list[int]]) -> list[int]:
    """Mean rank per response across labelers, re-ranked densely (1 = best mean; equal means tie)."""
    # every response has the same number of labels, so comparing sums compares means exactly
    sums = [sum(column) for column in zip(*rankings)]
    dense = {s: i + 1 for i, s in enumerate(sorted(set(sums)))}
    return [dense[s] for s in sums]


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _agreement_counts(labels: dict[int, dict[int, list[int]]], only: int | None = None) -> tuple[int, int]:
    """(agreeing, total) relations over labeler pairs and response pairs; `only`: pairs with that labeler."""
    agree = total = 0
    for by_labeler in labels.values():
        for a, b in combinations(sorted(by_labeler), 2):
            if only is not None and only not in (a, b):
                continue
            ra, rb = by_labeler[a], by_labeler[b]
            for i, j in combinations(range(len(ra)), 2):
                total += 1
                agree += _sign(ra[i] - ra[j]) == _sign(rb[i] - rb[j])
    return agree, total


def _ratio(agree: int, total: int) -> float | None:
    return agree / total if total else None


def pairwise_agreement(labels: dict[int, dict[int, list[int]]]) -> float | None:
    """Fraction of (task, labeler pair, response pair) where both labelers give the same relation.

    labels[task_id][labeler_id] = ranks aligned to the task's stored response order; the relation of responses
    i < j is "i better", "j better" or "tie". None when no task has two labelers.
    """
    return _ratio(*_agreement_counts(labels))
