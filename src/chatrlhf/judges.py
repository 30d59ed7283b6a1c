"""Judges that stand in for people: here, the rule judge of the built-in task's checkable constraints.

A constraint is named by the task that made the prompt (`lowercase`, `bullets`, `short`, `question`);
`satisfies` says whether an answer meets it, the gold signal the demo reports as a success rate.
"""

from __future__ import annotations

import re

BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")


def _lowercase(answer: str) -> bool:
    return any(c.isalpha() for c in answer) and answer == answer.lower()


def _bullets(answer: str, count: int = 3) -> bool:
    lines = [line for line in answer.splitlines() if line.strip()]
    return len(lines) == count and all(BULLET.match(line) for line in lines)


def _short(answer: str, limit: int = 15) -> bool:
    return 1 <= len(answer.split()) <= limit


def _question(answer: str) -> bool:
    return answer.rstrip().endswith("?")


RULES = {"lowercase": _lowercase, "bullets": _bullets, "short": _short, "question": _question}


def satisfies(answer: str, constraint: str) -> bool:
    """Whether `answer` meets the named constraint of the built-in task."""
    return RULES[constraint](answer)
