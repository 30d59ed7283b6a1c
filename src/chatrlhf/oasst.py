"""OpenAssistant message trees (`{"message_tree_id", "prompt": {message with "replies"}}` per line).

Demonstrations: per tree, the best-ranked path from the root prompt down (lowest `rank` among the
human-written siblings at each level), ending at an assistant message. Synthetic (model-written) and
deleted messages, and those that failed review, are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatrlhf.records import Conversation, DataError, InvalidRecords, Record

ROLE = {"prompter": "user", "assistant": "assistant"}


def usable(message: dict[str, Any]) -> bool:
    """A human-written message that survived review."""
    return (
        isinstance(message.get("text"), str)
        and bool(message["text"].strip())
        and message.get("role") in ROLE
        and not message.get("synthetic", False)
        and not message.get("deleted", False)
        and message.get("review_result", True) is not False
    )


def _best_reply(replies: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    candidates = [m for m in replies if usable(m)]
    if not candidates:
        return None
    # unranked replies come after ranked ones, in file order
    return min(candidates, key=lambda m: (m.get("rank") is None, m.get("rank") or 0))


def _root(record: Record) -> dict[str, Any]:
    root = record.data.get("prompt")
    if not isinstance(root, dict) or "replies" not in root:
        raise DataError(f"{record.where}: field `prompt` must be an OpenAssistant message with `replies`")
    return root


def _best_path(record: Record) -> Conversation | None:
    """The tree's best-ranked path, cut to end in an assistant turn; None when no usable one is left."""
    message = _root(record)
    if not usable(message) or message["role"] != "prompter":
        return None
    path = []
    while message is not None:
        path.append({"role": ROLE[message["role"]], "content": message["text"]})
        message = _best_reply(message.get("replies") or [])
    if path[-1]["role"] != "assistant":
        path.pop()
    return Conversation(record.where, path) if len(path) >= 2 else None


def tree_demonstrations(
    source: str, records: Sequence[Record], invalid: InvalidRecords | None = None
) -> list[Conversation]:
    """The best-ranked root-to-leaf path of each tree, cut to end in an assistant turn."""
    invalid = invalid or InvalidRecords()
    conversations = [c for c in invalid.keep(source, records, _best_path) if c is not None]
    if not conversations:
        raise DataError(f"{source}: no usable conversation in the trees")
    return conversations


def ranked_groups(record: Record) -> list[tuple[list[dict[str, str]], list[str], list[int]]]:
    """Every group of ranked, human-written sibling replies in one tree, as (prompt, answers, ranks) with
    rank 1 best; `preferences.load_rankings` makes them rankings.

    The prompt is the conversation from the root down to the replies' parent (itself along usable messages).
    """
    groups = []

    def walk(message: dict[str, Any], history: list[dict[str, str]]) -> None:
        history = history + [{"role": ROLE[message["role"]], "content": message["text"]}]
        replies = [m for m in message.get("replies") or [] if usable(m)]
        ranked = [m for m in replies if isinstance(m.get("rank"), int)]
        if message["role"] == "prompter" and len({m["rank"] for m in ranked}) >= 2:
            groups.append((history, [m["text"] for m in ranked], [m["rank"] + 1 for m in ranked]))
        for reply in replies:
            walk(reply, history)

    root = _root(record)
    if usable(root) and root["role"] == "prompter":
        walk(root, [])
    return groups
