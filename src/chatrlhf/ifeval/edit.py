"""Demonstrations written by code for the IFEval-format task: a draft answer to the bare request, edited until
lm-eval's checkers say it follows every instruction of the prompt, as a labeler rewrites a draft.

A small model rarely follows three instructions at once by chance (best of 4 samples found an answer for one
prompt in five), so SFT had little to learn from. Here the model's own plain answer keeps its content and
voice; code lays it out (bullets, sections, paragraphs), adds what is asked (a title, a postscript, keywords,
placeholders, an ending), cuts or extends its length, and changes case and punctuation last. Whatever the edit
gives is checked by lm-eval's checkers, never assumed: a draft that cannot be made to follow is left out.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field

from chatrlhf.ifeval.checkers import IFEvalItem, instruction_constraints

FILLERS = (  # no comma, none of the forbidden-word list, none of the letters q z x j k
    "There is always something new to notice about {topic}.",
    "People often find that {topic} rewards a second look.",
    "One good way to begin is to read a little about {topic} each day.",
    "The more one learns about {topic} the more there is to see.",
    "A calm afternoon is the perfect time to read about {topic}.",
    "Each season shows {topic} in a different light.",
    "Stories about {topic} tend to stay with the reader.",
    "Anyone can start to learn about {topic} with a single step.",
    "In the end {topic} is worth the time it needs.",
    "Those who study {topic} rarely run out of things to say.",
)
WORD_SENTENCES = (
    "This brings {word} to mind.",
    "There is {word} in it as well.",
    "One can see {word} in it too.",
)
TITLES = ("All About {Topic}", "A Note on {Topic}", "{Topic} in a Few Words", "Thoughts on {Topic}")
PLACEHOLDERS = ("name", "date", "place", "time", "address")
SWAPS = {"very": "", "also": "", "many": "lots of", "really": "", "important": "central", "great": "fine",
         "beautiful": "lovely", "amazing": "wonderful"}  # fmt: skip
LAYOUTS = (
    "detectable_format:number_bullet_lists",
    "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word",
    "detectable_format:multiple_sections",
    "combination:two_responses",
)
MAX_EDITS = 60
OTHER_SHARE = 0.5


@dataclass
class Draft:
    """The sentences of an answer and what the edits know: the topic, the fewest sentences the layout uses."""

    topic: str
    sentences: list[str]
    rng: random.Random
    floor: int = 1  # the fewest sentences the layout can use
    fillers: list[str] = field(default_factory=list)

    def add(self, sentence: str) -> None:
        self.sentences.append(sentence)

    def add_filler(self) -> bool:
        if not self.fillers:
            self.fillers = [f.format(topic=self.topic) for f in FILLERS]
            self.rng.shuffle(self.fillers)
        unused = [f for f in self.fillers if f not in self.sentences]
        if not unused:
            return False
        self.sentences.append(unused[0])
        return True

    def drop_last(self, where=lambda s: True) -> bool:
        """Drop the last sentence that `where` picks, keeping the layout's fewest and one naming the topic."""
        if len(self.sentences) <= self.floor:
            return False
        for i in range(len(self.sentences) - 1, -1, -1):
            rest = self.sentences[:i] + self.sentences[i + 1 :]
            if where(self.sentences[i]) and any(self.topic.lower() in s.lower() for s in rest):
                del self.sentences[i]
                return True
        return False


def sentences_of(answer: str) -> list[str]:
    """The answer's finished sentences with its markdown taken off (lists, headings, emphasis, dividers)."""
    lines = []
    for line in answer.splitlines():
        line = re.sub(r"^\s*(#+|\d+[.)]|[-*•]|>)\s+", "", line)
        line = re.sub(r"[*#_`<>\[\]]+", "", line).strip()
        if re.search(r"[.!?]$", line):  # a heading, a list's lead-in or an answer cut short: left out
            lines.append(line)
    text = re.sub(r"\s+", " ", " ".join(lines))
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text)
    return [p.strip() for p in parts if re.search(r"[.!?]$", p.strip()) and len(p.split()) >= 3]


def _kw(record: dict, name: str) -> dict:
    for kind, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
        if kind == name:
            return kwargs or {}
    return {}


def _swap_forbidden(sentence: str, words: list[str]) -> str:
    for word in words:
        swap = SWAPS.get(word.lower(), "")
        sentence = re.sub(rf"\b{re.escape(word)}\b", swap, sentence, flags=re.IGNORECASE)
    sentence = re.sub(r"\s{2,}", " ", sentence).strip()
    return sentence[:1].upper() + sentence[1:]


def _highlight(sentences: list[str], n: int) -> list[str]:
    """`*word*` around one word in the middle of each of the first n sentences (never at a line's start,
    where it would read as a bullet)."""
    out = list(sentences)
    for i in range(min(n + 1, len(out))):
        words = out[i].split()
        spots = [j for j in range(1, len(words) - 1) if re.fullmatch(r"[A-Za-z]{4,}", words[j])]
        if spots:
            j = spots[len(spots) // 2]
            words[j] = f"*{words[j]}*"
            out[i] = " ".join(words)
    return out


def _capitalise(sentences: list[str], n: int) -> list[str]:
    out, left = list(sentences), n + 1
    for i, sentence in enumerate(out):
        words = sentence.split()
        for j, word in enumerate(words):
            if left and j and re.fullmatch(r"[a-z]{5,}", word):
                words[j], left = word.upper(), left - 1
        out[i] = " ".join(words)
    return out


def _groups(sentences: list[str], n: int) -> list[list[str]]:
    size, extra = divmod(len(sentences), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        groups.append(sentences[start:end])
        start = end
    return groups


def _first_word(word: str, sentence: str) -> str:
    head = sentence[:1].lower() + sentence[1:] if sentence[1:2].islower() else sentence
    return f"{word.capitalize()} {head}"


def _layout(record: dict, sentences: list[str]) -> str:
    """The body laid out as the one layout instruction asks (none: paragraphs of three sentences)."""
    kinds = record["instruction_id_list"]
    layout = next((k for k in LAYOUTS if k in kinds), "")
    args = _kw(record, layout)
    if layout == "detectable_format:number_bullet_lists":
        n = args["num_bullets"]
        intro, items, rest = sentences[:1], sentences[1 : n + 1], sentences[n + 1 :]
        parts = [" ".join(intro), "\n".join(f"* {s}" for s in items)] + ([" ".join(rest)] if rest else [])
        return "\n\n".join(parts)
    if layout == "length_constraints:number_paragraphs":
        return "\n\n***\n\n".join(" ".join(g) for g in _groups(sentences, args["num_paragraphs"]))
    if layout == "length_constraints:nth_paragraph_first_word":
        groups = _groups(sentences, args["num_paragraphs"])
        k = args["nth_paragraph"] - 1
        groups[k] = [_first_word(args["first_word"], groups[k][0])] + groups[k][1:]
        return "\n\n".join(" ".join(g) for g in groups)
    if layout == "detectable_format:multiple_sections":
        groups = _groups(sentences, args["num_sections"])
        return "\n\n".join(f"{args['section_spliter']} {i + 1}\n{' '.join(g)}" for i, g in enumerate(groups))
    if layout == "combination:two_responses":
        return "\n\n******\n\n".join(" ".join(g) for g in _groups(sentences, 2))
    return "\n\n".join(" ".join(g) for g in _groups(sentences, max(1, (len(sentences) + 2) // 3)))


def render(record: dict, draft: Draft) -> str:
    """The draft as an answer: content, then layout, then what wraps it, then case and commas last."""
    kinds = record["instruction_id_list"]
    sentences = list(draft.sentences)
    if "keywords:forbidden_words" in kinds:
        sentences = [
            _swap_forbidden(s, _kw(record, "keywords:forbidden_words")["forbidden_words"]) for s in sentences
        ]
    if "detectable_format:number_highlighted_sections" in kinds:
        sentences = _highlight(
            sentences, _kw(record, "detectable_format:number_highlighted_sections")["num_highlights"]
        )
    capital = _kw(record, "change_case:capital_word_frequency")
    if capital.get("capital_relation") == "at least":
        sentences = _capitalise(sentences, capital["capital_frequency"])
    text = _layout(record, sentences)
    topic = draft.topic
    if "detectable_format:title" in kinds:
        title = TITLES[len(topic) % len(TITLES)].format(Topic=topic.title())
        text = f"<<{title}>>\n\n{text}"
    if "detectable_format:constrained_response" in kinds:
        text = f"My answer is yes. {text}"
    if "detectable_content:postscript" in kinds:
        marker = _kw(record, "detectable_content:postscript")["postscript_marker"].rstrip(".") + "."
        text = f"{text}\n\n{marker} Thank you for reading about {topic}."
    if "startend:end_checker" in kinds:
        text = f"{text}\n\n{_kw(record, 'startend:end_checker')['end_phrase']}"
    if "combination:repeat_prompt" in kinds:
        text = f"{_kw(record, 'combination:repeat_prompt')['prompt_to_repeat']}\n\n{text}"
    if "detectable_format:json_format" in kinds:
        text = json.dumps({"answer": text}, indent=2)
    if "startend:quotation" in kinds:
        text = f'"{text}"'
    if "change_case:english_lowercase" in kinds:
        text = text.lower()
    if "change_case:english_capital" in kinds:
        text = text.upper()
    if "punctuation:no_comma" in kinds:
        text = re.sub(r",\s*", " ", text)
    return text


def _needed(record: dict) -> int:
    """How many sentences the layout needs at least."""
    kinds = record["instruction_id_list"]
    for kind, key, extra in (
        ("detectable_format:number_bullet_lists", "num_bullets", 1),
        ("length_constraints:number_paragraphs", "num_paragraphs", 0),
        ("length_constraints:nth_paragraph_first_word", "num_paragraphs", 0),
        ("detectable_format:multiple_sections", "num_sections", 0),
    ):
        if kind in kinds:
            return _kw(record, kind)[key] + extra
    return 2 if "combination:two_responses" in kinds else 1


def _fix(record: dict, draft: Draft, kind: str, args: dict) -> bool:
    """One edit toward following `kind`; False when no edit is left to try."""
    relation = args.get("relation") or args.get("let_relation") or args.get("capital_relation")
    if kind in ("length_constraints:number_words", "length_constraints:number_sentences"):
        return draft.drop_last() if relation == "less than" else draft.add_filler()
    if kind == "keywords:existence":
        missing = [w for w in args["keywords"] if not re.search(w, " ".join(draft.sentences), re.IGNORECASE)]
        if missing:
            draft.add(draft.rng.choice(WORD_SENTENCES).format(word=missing[0]))
        return bool(missing)
    if kind == "keywords:frequency":
        word = args["keyword"]
        if relation == "less than":
            return draft.drop_last(lambda s: re.search(word, s, re.IGNORECASE) is not None)
        draft.add(draft.rng.choice(WORD_SENTENCES).format(word=word))
        return True
    if kind == "keywords:letter_frequency":
        letter = args["letter"]
        if relation == "less than":
            return draft.drop_last(lambda s: letter in s.lower())
        return draft.add_filler()
    if kind == "keywords:forbidden_words":
        words = args["forbidden_words"]
        return draft.drop_last(lambda s: any(re.search(rf"\b{w}\b", s, re.IGNORECASE) for w in words))
    if kind == "change_case:capital_word_frequency" and relation == "less than":
        return draft.drop_last(lambda s: any(w.isupper() for w in re.findall(r"\w+", s)))
    if kind == "detectable_content:number_placeholders":
        fields = PLACEHOLDERS[: args["num_placeholders"]]
        draft.add("Fill in " + " and ".join(f"[{f}]" for f in fields) + ".")
        return True
    if len(draft.sentences) < _needed(record) + 1:
        return draft.add_filler()
    return False


def comply(record: dict, draft_answer: str, rng: random.Random) -> str | None:
    """`draft_answer` edited to follow every instruction of `record` by lm-eval's strict checkers, or None
    where it has no finished sentence or the edits run out first."""
    draft = Draft(record["topic"], sentences_of(draft_answer), rng, _needed(record))
    if not draft.sentences:  # nothing of the model's own to edit: no demonstration made of fillers alone
        return None
    if not any(record["topic"].lower() in s.lower() for s in draft.sentences):
        draft.sentences.insert(0, FILLERS[0].format(topic=record["topic"]))
    while len(draft.sentences) < draft.floor:
        if not draft.add_filler():
            return None
    constraints = instruction_constraints(record["prompt"], record)
    for _ in range(MAX_EDITS):
        text = render(record, draft)
        failing = [c for c in constraints if not c.met(text)]
        if not failing:
            return text
        if not _fix(record, draft, failing[0].kind, failing[0].kwargs):
            return None
    return None


def variants(record: dict, draft_answer: str, rng: random.Random) -> list[str]:
    """Answers that follow the record's instructions to different degrees, for ranking: the draft edited to
    follow all of them, then some of them, then none (laid out plainly), then the draft as the model wrote it.
    Distinct texts only; none when fewer than two are left."""
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    partial = [s for n in range(1, len(ids)) for s in itertools.combinations(range(len(ids)), n)]
    subsets = [tuple(range(len(ids)))] + rng.sample(partial, min(2, len(partial))) + [()]
    out: list[str] = []
    for subset in subsets:
        part = {
            **record,
            "instruction_id_list": [ids[i] for i in subset],
            "kwargs": [kwargs[i] for i in subset],
        }
        text = comply(part, draft_answer, random.Random(rng.random()))
        if text and text not in out:
            out.append(text)
    if draft_answer.strip() and draft_answer.strip() not in out:
        out.append(draft_answer.strip())
    return out if len(out) >= 2 else []


def drafts(model_path: str, rows: list[dict], seed: int, max_new_tokens: int, console) -> list[str]:
    """The model's answer to each row's bare request, sampled at temperature 0.7 (continuous batching)."""
    from chatrlhf.configs import IFEvalConfig, SamplingConfig
    from chatrlhf.harness import autocast
    from chatrlhf.ifeval.benchmark import answer
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_dtype

    tokenizer = load_tokenizer(model_path)
    device = pick_device()
    model = load_causal_lm(model_path, tokenizer, device)
    bench = IFEvalConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7), seed=seed)
    items = [IFEvalItem(f"drafts:{i}", r["key"], r["request"], [], []) for i, r in enumerate(rows)]
    with autocast(device, resolve_dtype(bench.dtype)):
        return [text for text, _tokens in answer(model, tokenizer, items, bench, console)]


def demonstrations(rows: list[dict], draft_answers: list[str], seed: int) -> list[dict]:
    """Each row's draft edited by `comply`; rows whose edit fails, or whose answer the rule judge does not
    pass (it also asks that the topic be named), are left out."""
    from chatrlhf.judges import satisfies_all

    rng, out = random.Random(seed), []
    for row, draft_answer in zip(rows, draft_answers):
        text = comply(row, draft_answer, rng)
        meta = {k: v for k, v in row.items() if k != "prompt"}
        if text and satisfies_all([{"role": "user", "content": row["prompt"]}], text, meta):
            out.append(
                {"prompt": row["prompt"], "completion": text, "source": "edited", "draft": draft_answer}
            )
    return out


def ranking_tasks(rows: list[dict], draft_answers: list[str], seed: int, table: dict) -> list[dict]:
    """Ranking tasks from the drafts: each row, and the same request with other instructions, answered by
    `variants` of its draft. The simulated labeler ranks them beside the sampled answers; they show the reward
    model what following an instruction changes in an answer, one instruction at a time."""
    from chatrlhf.ifeval.task import make_prompt

    rng, out = random.Random(seed), []
    for row, draft_answer in zip(rows, draft_answers):
        other = make_prompt(rng, row["topic"], f"{row['key']}-other", table, row["request"])
        # every row, and other instructions for half of them: the reward model's time grows with its tasks
        for record in (row, other) if rng.random() < OTHER_SHARE else (row,):
            answers = variants(record, draft_answer, rng)
            if answers:
                out.append({**record, "answers": answers})
    return out
