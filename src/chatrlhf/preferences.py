"""Preference data: K ranked answers per prompt, from every format people keep them in.

- rankings (InstructGPT): `{"prompt": str | messages, "responses": [str, ...], "ranks": [int, ...]}`, rank 1 best,
  equal ranks are ties; without `ranks` the responses are taken as listed best to worst.
- pairs (TRL style): `{"prompt", "chosen", "rejected"}`; chosen/rejected are text or assistant messages, and the
  prompt may be messages or absent when chosen/rejected hold the whole conversation.
- Anthropic HH: `{"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}`.
- OpenAssistant trees: every group of ranked sibling replies is one ranking (see `oasst.py`).
All become `Ranking` records; a bad one raises `DataError` with file, line and field. So does a
contradictory one: a pair whose chosen and rejected answers are the same text, or a ranking giving one
answer two different ranks (the same answer at the same rank is a tie, and fine).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from chatrlhf.oasst import ranked_groups
from chatrlhf.records import DataError, InvalidRecords, Record, check_messages, parse_file


@dataclass
class Ranking:
    where: str
    prompt: list[dict[str, str]]  # conversation ending in a user turn
    responses: list[str]  # K >= 2 answers
    ranks: list[int]  # (K,) 1 is best; equal ranks are ties


def check_ranking(ranking: Ranking) -> Ranking:
    where, k = ranking.where, len(ranking.responses)
    if k < 2:
        raise DataError(f"{where}: field `responses` needs at least 2 answers, got {k}")
    for i, response in enumerate(ranking.responses):
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: field `responses[{i}]` is empty or not text")
    if len(ranking.ranks) != k:
        raise DataError(f"{where}: field `ranks` has {len(ranking.ranks)} entries for {k} responses")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranking.ranks):
        raise DataError(f"{where}: field `ranks` must be integers >= 1 (1 is best), got {ranking.ranks}")
    if len(set(ranking.ranks)) < 2:
        raise DataError(
            f"{where}: field `ranks`: all answers tie ({ranking.ranks}), so there is no preference to learn"
        )
    first: dict[str, int] = {}  # answer text -> index of its first occurrence
    for i, response in enumerate(ranking.responses):
        j = first.setdefault(response.strip(), i)
        if ranking.ranks[j] != ranking.ranks[i]:
            raise DataError(
                f"{where}: field `responses[{i}]` is the same text as `responses[{j}]` but ranked "
                f"{ranking.ranks[i]} against {ranking.ranks[j]}: a contradictory preference"
            )
    return ranking


def _distinct_pair(chosen: str, rejected: str, where: str) -> None:
    if chosen.strip() == rejected.strip():
        raise DataError(
            f"{where}: fields `chosen` and `rejected` hold the same answer: a contradictory preference"
        )


def _prompt(data: dict[str, Any], where: str) -> list[dict[str, str]]:
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        return check_messages(prompt, where, "prompt", last_role="user")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field `prompt` is missing, empty or not text")
    return [{"role": "user", "content": prompt}]


def _answer(value: Any, where: str, field: str) -> tuple[list[dict[str, str]], str]:
    """(conversation before the answer, answer text) of a chosen/rejected field."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field `{field}` is empty")
        return [], value
    if isinstance(value, list) and value:
        messages = check_messages(value, where, field, last_role="assistant") if len(value) > 1 else value
        last = messages[-1]
        if (
            not isinstance(last, dict)
            or last.get("role") != "assistant"
            or not str(last.get("content", "")).strip()
        ):
            raise DataError(f"{where}: field `{field}` must end in a non-empty assistant message")
        return list(messages[:-1]), last["content"]
    raise DataError(f"{where}: field `{field}` must be text or a list of messages")


HH_TURN = re.compile(r"\n\nHuman: |\n\nAssistant: ")


def parse_hh(text: str, where: str, field: str) -> list[dict[str, str]]:
    """Anthropic HH text into messages; it must end in an assistant turn."""
    if not text.startswith("\n\nHuman: "):
        raise DataError(f"{where}: field `{field}` does not start with '\\n\\nHuman: '")
    roles = ["user" if m.group() == "\n\nHuman: " else "assistant" for m in HH_TURN.finditer(text)]
    contents = HH_TURN.split(text)[1:]
    messages = [{"role": r, "content": c.strip()} for r, c in zip(roles, contents)]
    if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise DataError(f"{where}: field `{field}` must end in a non-empty Assistant turn")
    return messages


def from_record(record: Record) -> Ranking:
    data, where = record.data, record.where
    if "responses" in data:
        responses = data["responses"]
        if not isinstance(responses, list):
            raise DataError(f"{where}: field `responses` must be a list of answers")
        ranks = data.get("ranks", list(range(1, len(responses) + 1)))
        if not isinstance(ranks, list):
            raise DataError(f"{where}: field `ranks` must be a list of integers")
        return check_ranking(Ranking(where, _prompt(data, where), responses, ranks))
    if "chosen" in data and "rejected" in data:
        if "prompt" not in data and isinstance(data["chosen"], str) and isinstance(data["rejected"], str):
            chosen, rejected = (
                parse_hh(data["chosen"], where, "chosen"),
                parse_hh(data["rejected"], where, "rejected"),
            )
            if chosen[:-1] != rejected[:-1]:
                raise DataError(
                    f"{where}: fields `chosen` and `rejected` differ before their final Assistant turn"
                )
            _distinct_pair(chosen[-1]["content"], rejected[-1]["content"], where)
            return check_ranking(
                Ranking(where, chosen[:-1], [chosen[-1]["content"], rejected[-1]["content"]], [1, 2])
            )
        context_c, chosen = _answer(data["chosen"], where, "chosen")
        context_r, rejected = _answer(data["rejected"], where, "rejected")
        if "prompt" in data:
            prompt = _prompt(data, where) + context_c
        else:
            if context_c != context_r or not context_c:
                raise DataError(
                    f"{where}: without `prompt`, `chosen` and `rejected` must share the conversation before the answer"
                )
            prompt = check_messages(context_c, where, "chosen", last_role="user")
        _distinct_pair(chosen, rejected, where)
        return check_ranking(Ranking(where, prompt, [chosen, rejected], [1, 2]))
    raise DataError(
        f"{where}: expected fields `prompt`, `responses`, `ranks` (rankings) or `chosen`, `rejected` (pairs)"
    )


def load_rankings(source: str, fmt: str = "auto", invalid: InvalidRecords | None = None) -> list[Ranking]:
    """Rankings from any of the supported preference formats."""
    return parse_file(source, fmt, invalid, from_record, tree_rankings)


def tree_rankings(source: str, records: list[Record], invalid: InvalidRecords | None = None) -> list[Ranking]:
    """Every group of ranked, human-written sibling replies of every OpenAssistant tree, one ranking each."""
    invalid = invalid or InvalidRecords()

    def rankings(record: Record) -> list[Ranking]:
        return [check_ranking(Ranking(record.where, *group)) for group in ranked_groups(record)]

    kept = [r for groups in invalid.keep(source, records, rankings) for r in groups]
    if not kept:
        raise DataError(f"{source}: no ranked sibling replies in the trees")
    return kept
