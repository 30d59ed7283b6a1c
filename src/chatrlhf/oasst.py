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
