"""The constraints a prompt states in words, read into checkable `Constraint`s: the grammar behind the rule
judge and the built-in task's success.

`parse_constraints` reads an instruction ("in at most 15 words", "as exactly 3 bullet points", "in all
lowercase", "end with a question", "include the word X") with a list of phrase patterns; where phrases overlap
the first (then the longer) wins, and `_reconcile` makes the readings one consistent set. `constraints_of`
takes a record's explicit `constraints` field instead when it has one, plus "about" its `topic`. Each
`Constraint` says whether an answer meets it and gives partial credit for how close it came.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatrlhf.ifeval.checkers import InstructionConstraint

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


def constraints_of(prompt: list[dict], meta: dict) -> list[Constraint | InstructionConstraint]:
    """A record's IFEval instructions (`instruction_id_list` + `kwargs`, checked by lm-eval's checkers), or its
    explicit `constraints` ([{"kind", "value"}]), or else those its last user turn states; plus "about" its
    `topic` when the record names one (word salad that happens to follow an instruction does not name it)."""
    found: list[Constraint | InstructionConstraint]
    if meta.get("instruction_id_list"):
        from chatrlhf.ifeval.checkers import instruction_constraints

        found = list(instruction_constraints(prompt[-1]["content"], meta))
    elif meta.get("constraints"):
        found = [Constraint(c["kind"], c.get("value", 0)) for c in meta["constraints"]]
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


def satisfies_all(prompt: list[dict], answer: str, meta: dict | None = None) -> bool:
    """Whether the answer meets every constraint the prompt states (the built-in task's success)."""
    constraints = constraints_of(prompt, meta or {})
    return bool(constraints) and all(c.met(answer) for c in constraints)
