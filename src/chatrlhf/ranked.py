"""Rankings as token sequences, for the stages that learn from them (the reward model, DPO).

Each ranking becomes one item: its K prompt + answer sequences, where the answers begin, the ranks and the
(winner, loser) pairs they make. A prompt's K answers stay one item, so a stage forwards the prompt once and
sees the whole ranking (pairwise losses over its pairs, listwise ones over its order).
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chatrlhf.chat_template import answer_ids
from chatrlhf.losses import ranking_pairs
from chatrlhf.preferences import Ranking
from chatrlhf.records import DataError


@dataclass
class RankedItem:
    """One prompt's K answers, tokenized, with the pairs their ranks make."""

    sequences: list[list[int]]  # K x (T_k,) prompt + answer, ending at the answer's end-of-turn token
    pairs: list[tuple[int, int]]  # (winner, loser) indices
    ranks: list[int] = field(default_factory=list)  # (K,) 1 is best; equal ranks tie
    answer_start: int = 0  # index of the answers' first token (the rendered prompt's length)
    reference: list[float] = field(default_factory=list)  # (K,) the reference model's log-probs (DPO)


def pair_agreement(scores: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, float, float]:
    """(the pairs as a (P, 2) long tensor, how many of them `scores` (K,) order as ranked, the summed margin
    score(winner) - score(loser)); no gradient flows through the counts."""
    index = torch.tensor(pairs, dtype=torch.long, device=scores.device)
    margin = (scores[index[:, 0]] - scores[index[:, 1]]).detach()
    return index, float((margin > 0).sum()), float(margin.sum())


def tokenize_rankings(
    rankings: Sequence[Ranking], tokenizer, max_length: int, truncation: bool, system_prompt: str = ""
) -> list[RankedItem]:
    """One item per ranking. A sequence over `max_length` stops with an error naming the record, or with
    `truncation` leaves the ranking out (counted on stderr)."""
    items, dropped = [], 0
    for r in rankings:
        spans = [answer_ids(tokenizer, r.prompt, resp, system_prompt) for resp in r.responses]
        longest = max(len(ids) for ids, _ in spans)
        if longest > max_length:
            if not truncation:
                raise DataError(
                    f"{r.where}: field `responses`: {longest} tokens with the prompt, more than "
                    f"data.max_length={max_length} (raise it, or set data.truncation: true to drop such records)"
                )
            dropped += 1
            continue
        seqs = [ids for ids, _ in spans]
        start = min(s for _, s in spans)
        items.append(RankedItem(seqs, ranking_pairs(r.ranks), list(r.ranks), start))
    if dropped:
        print(f"warning: {dropped} ranking(s) longer than data.max_length dropped", file=sys.stderr)
    return items


def split_by_prompt(
    rankings: list[Ranking], fraction: float, seed: int
) -> tuple[list[Ranking], list[Ranking]]:
    """Hold out a share of the prompts: every ranking of one prompt lands on the same side."""
    groups: dict[str, list[Ranking]] = defaultdict(list)
    for r in rankings:
        groups[json.dumps(r.prompt, sort_keys=True)].append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_eval = round(len(keys) * fraction) if fraction > 0 else 0
    if fraction > 0 and len(keys) > 1:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    held = set(keys[:n_eval])
    train = [r for k in keys if k not in held for r in groups[k]]
    return train, [r for k in keys[:n_eval] for r in groups[k]]


def independent_pairs(items: Sequence[RankedItem]) -> list[RankedItem]:
    """Every pair of every item as an item of its own (two answers, ranks 1 and 2)."""
    return [
        RankedItem(
            [item.sequences[w], item.sequences[loser]],
            [(0, 1)],
            [1, 2],
            item.answer_start,
            [item.reference[w], item.reference[loser]] if item.reference else [],
        )
        for item in items
        for w, loser in item.pairs
    ]
