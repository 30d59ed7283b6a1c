"""OpenAssistant message trees (`{"message_tree_id", "prompt": {message with "replies"}}` per line).

Demonstrations: per tree, the best-ranked path from the root prompt down (lowest `rank` among the
human-written siblings at each level), ending at an assistant message. Synthetic (model-written) and
deleted messages, and those that failed review, are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatrlhf.data import Conversation, DataError, Record

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


def tree_demonstrations(records: Sequence[Record]) -> list[Conversation]:
    """The best-ranked root-to-leaf path of each tree, cut to end in an assistant turn."""
    conversations = []
    for record in records:
        message = _root(record)
        if not usable(message) or message["role"] != "prompter":
            continue
        path = []
        while message is not None:
            path.append({"role": ROLE[message["role"]], "content": message["text"]})
            message = _best_reply(message.get("replies") or [])
        if path[-1]["role"] != "assistant":
            path.pop()
        if len(path) >= 2:
            conversations.append(Conversation(record.where, path))
    if not conversations:
        raise DataError(
            f"{records[0].where if records else 'OpenAssistant file'}: no usable conversation in the trees"
        )
    return conversations


def tree_rankings(records: Sequence[Record]):
    """Every group of ranked, human-written sibling replies as one ranking of K answers.

    The prompt is the conversation from the root down to the replies' parent (itself along usable messages).
    """
    from chatrlhf.preferences import Ranking

    rankings = []

    def walk(message: dict[str, Any], history: list[dict[str, str]], where: str) -> None:
        history = history + [{"role": ROLE[message["role"]], "content": message["text"]}]
        replies = [m for m in message.get("replies") or [] if usable(m)]
        ranked = [m for m in replies if isinstance(m.get("rank"), int)]
        if message["role"] == "prompter" and len({m["rank"] for m in ranked}) >= 2:
            rankings.append(
                Ranking(where, history, [m["text"] for m in ranked], [m["rank"] + 1 for m in ranked])
            )
        for reply in replies:
            walk(reply, history, where)

    for record in records:
        root = _root(record)
        if usable(root) and root["role"] == "prompter":
            walk(root, [], record.where)
    if not rankings:
        raise DataError(
            f"{records[0].where if records else 'OpenAssistant file'}: no ranked sibling replies in the trees"
        )
    return rankings
