"""The built-in instruction-following task in IFEval's format, made by the project's own code.

`chatrlhf demo --task ifeval` trains on these prompts and is then scored on IFEval itself, so nothing here may
come from IFEval: the requests are about the demo's own topics, and every instruction kind is worded here in
several ways of our own (a test checks that no 8-word sequence of an IFEval prompt occurs in what this makes).
What IFEval and these prompts share is the instruction ids and their arguments (`instruction_id_list` +
`kwargs`), so lm-eval's checkers score both the same way.

A prompt is a request ("Write a short blog post about bees.") followed by 1 to 3 instructions that lm-eval's own
conflict table allows together. The arguments are drawn in ranges an answer of a few hundred tokens can meet
(at least 40 to 120 words, not IFEval's 300 and more), since the demo's answers are short. One kind is left out:
`language:response_language` asks for languages the default model does not write.
"""

from __future__ import annotations

import random
import re

from chatrlhf.ifeval.checkers import _lm_eval_module
from chatrlhf.ifeval.kinds import KINDS

# the built-in demo's 16 topics, and 24 more
TOPICS = (
    "the moon", "bees", "volcanoes", "rain", "bicycles", "libraries", "coffee", "whales",
    "trains", "forests", "penguins", "deserts", "pianos", "bridges", "apples", "clouds",
    "lighthouses", "chess", "gardening", "rivers", "kites", "bread baking", "owls", "snow",
    "museums", "tea", "maps", "sailing", "fireflies", "pottery", "markets", "thunderstorms",
    "camping", "violins", "honey", "glaciers", "sunflowers", "bakeries", "dolphins", "comets",
)  # fmt: skip
HELD_OUT_TOPICS = ("whales", "trains", "forests", "clouds", "owls", "tea", "comets", "pottery")

# what is asked; each keeps to one sentence without commas, so that it can be repeated back under no_comma
REQUESTS = (
    "Write a short blog post about {topic}.",
    "Explain {topic} to a curious ten year old.",
    "Write a letter to a friend telling them about {topic}.",
    "Write a short poem about {topic}.",
    "Give advice to someone who wants to learn more about {topic}.",
    "Describe a day spent around {topic}.",
    "Write a short story that features {topic}.",
    "Write an advertisement for a weekend trip about {topic}.",
    "Summarize what people find interesting about {topic}.",
    "Write a diary entry about {topic}.",
)
QUESTIONS = (
    "Is it worth learning about {topic}?",
    "Would a child enjoy a book about {topic}?",
    "Should everyone know a little about {topic}?",
    "Would {topic} make a good subject for a school project?",
)
# a request repeated back under no_comma could not be followed if it had a comma; these pairs stay apart
_OWN_CONFLICTS = {("combination:repeat_prompt", "punctuation:no_comma")}


def conflicts() -> dict[str, set[str]]:
    """lm-eval's table of instructions that cannot go together, made symmetric, plus our own pairs."""
    registry = _lm_eval_module("instructions_registry")
    table = registry.conflict_make({k: set(v) for k, v in registry.INSTRUCTION_CONFLICTS.items()})
    for a, b in _OWN_CONFLICTS:
        table.setdefault(a, set()).add(b)
        table.setdefault(b, set()).add(a)
    return table


def _pick_kinds(rng: random.Random, n: int, table: dict[str, set[str]]) -> list[str]:
    picked: list[str] = []
    for name in rng.sample(sorted(KINDS), len(KINDS)):
        if len(picked) == n:
            break
        if name == "detectable_format:constrained_response":
            continue  # asks for a yes/no question: chosen separately
        if all(name not in table.get(p, ()) and p not in table.get(name, ()) for p in picked):
            picked.append(name)
    # a repeated request comes first in the answer: its instruction goes last, after what it repeats
    return sorted(picked, key=lambda k: k == "combination:repeat_prompt")


def make_prompt(
    rng: random.Random, topic: str, key: str, table: dict[str, set[str]], request: str = ""
) -> dict:
    """One IFEval-format record about `topic`: a request (drawn, or the one given) and 1-3 instructions with
    their kwargs."""
    if request.endswith("?") or (not request and rng.random() < 0.04):
        # constrained_response asks a yes/no question, and conflicts with every other instruction
        names = ["detectable_format:constrained_response"]
        request = request or rng.choice(QUESTIONS).format(topic=topic)
    else:
        names = _pick_kinds(rng, rng.choices((1, 2, 3), weights=(55, 33, 12))[0], table)
        request = request or rng.choice(REQUESTS).format(topic=topic)
    sentences, kwargs = [request], []
    for name in names:
        kind = KINDS[name]
        args, fields, relation = kind.draw(rng, topic)
        if name == "combination:repeat_prompt":
            args = {"prompt_to_repeat": " ".join(sentences)}
        text = rng.choice(kind.wordings[relation]).format(**fields)
        sentences.append(text[0].upper() + text[1:])
        kwargs.append(args)
    return {
        "key": key,
        "prompt": " ".join(sentences),
        "instruction_id_list": names,
        "kwargs": kwargs,
        "topic": topic,
        "request": request,
    }


def make_prompts(topics: list[str], n: int, seed: int, prefix: str) -> list[dict]:
    """`n` records over `topics` in turn, seeded; keys are `prefix`-0, `prefix`-1, ..."""
    rng, table = random.Random(seed), conflicts()
    return [make_prompt(rng, topics[i % len(topics)], f"{prefix}-{i}", table) for i in range(n)]


def split_topics() -> tuple[list[str], list[str]]:
    """The training topics and the held-out ones."""
    return [t for t in TOPICS if t not in HELD_OUT_TOPICS], list(HELD_OUT_TOPICS)


def word_ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Every sequence of `n` words of `text`, lowercased, punctuation dropped (the overlap test's unit)."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
