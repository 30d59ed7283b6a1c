"""The instruction kinds of the built-in IFEval-format task: how each draws its checker's arguments, and its
wordings, all of our own (none of IFEval's stock sentences; `task.py` assembles prompts from them)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WORDS = ("history", "future", "people", "simple", "morning", "color", "water", "journey", "quiet", "season")
COMMON_WORDS = ("very", "also", "many", "really", "important", "great", "beautiful", "amazing")
FIRST_WORDS = ("today", "imagine", "first", "finally", "sometimes", "however", "yesterday", "there")
END_PHRASES = (
    "Thanks for reading.",
    "That is all I know.",
    "Hope this helps!",
    "Let me know what you think.",
    "Enjoy the rest of your day.",
)
SPLITTERS = ("Section", "SECTION", "Part", "PART")
LESS, AT_LEAST = "less than", "at least"


@dataclass(frozen=True)
class Kind:
    """One instruction id: how its arguments are drawn, and its wordings. `draw` returns the checker's
    kwargs and the fields its wordings name (the same, or phrased for text); the wording set is picked by
    the relation where one is drawn."""

    id: str
    wordings: dict[str, tuple[str, ...]]  # by relation ("" where the kind has none)
    draw: Callable[[random.Random, str], tuple[dict, dict, str]] = lambda rng, topic: ({}, {}, "")


def _quoted(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _topic_word(topic: str) -> str:
    return topic.split()[-1]


def _relation(rng: random.Random, less: tuple[int, int], more: tuple[int, int]) -> tuple[str, int]:
    relation = rng.choice((LESS, AT_LEAST))
    low, high = less if relation == LESS else more
    return relation, rng.randint(low, high)


def _capital_words(rng, topic):
    relation, n = _relation(rng, (2, 5), (1, 4))
    return {"capital_relation": relation, "capital_frequency": n}, {"n": n}, relation


def _placeholders(rng, topic):
    n = rng.randint(1, 4)
    return {"num_placeholders": n}, {"n": n}, ""


def _postscript(rng, topic):
    marker = rng.choice(("P.S.", "P.P.S"))
    return {"postscript_marker": marker}, {"marker": marker}, ""


def _sections(rng, topic):
    n, splitter = rng.randint(2, 4), rng.choice(SPLITTERS)
    return {"section_spliter": splitter, "num_sections": n}, {"n": n, "splitter": splitter}, ""


def _count(key: str, low: int, high: int):
    def draw(rng, topic):
        n = rng.randint(low, high)
        return {key: n}, {"n": n}, ""

    return draw


def _existence(rng, topic):
    words = rng.sample(WORDS, rng.randint(1, 2))
    return {"keywords": words}, {"words": _quoted(words)}, ""


def _forbidden(rng, topic):
    words = rng.sample(COMMON_WORDS, rng.randint(1, 3))  # never the topic: the judge asks that it be named
    return {"forbidden_words": words}, {"words": _quoted(words)}, ""


def _frequency(rng, topic):
    relation, n = _relation(rng, (2, 4), (2, 4))
    word = _topic_word(topic) if relation == AT_LEAST and rng.random() < 0.5 else rng.choice(WORDS)
    return {"keyword": word, "frequency": n, "relation": relation}, {"word": word, "n": n}, relation


def _letters(rng, topic):
    relation = rng.choice((LESS, AT_LEAST))
    if relation == LESS:
        letter, n = rng.choice("qzxjk"), rng.randint(2, 4)
    else:
        letter, n = rng.choice("aeiostnr"), rng.randint(5, 15)
    return (
        {"letter": letter, "let_frequency": n, "let_relation": relation},
        {"letter": letter, "n": n},
        relation,
    )


def _nth_paragraph(rng, topic):
    n = rng.randint(2, 4)
    k, word = rng.randint(1, n), rng.choice(FIRST_WORDS)
    kwargs = {"num_paragraphs": n, "nth_paragraph": k, "first_word": word}
    return kwargs, {"n": n, "k": k, "word": word.capitalize()}, ""


def _sentences(rng, topic):
    relation, n = _relation(rng, (3, 6), (3, 6))
    return {"relation": relation, "num_sentences": n}, {"n": n}, relation


def _words(rng, topic):
    relation, n = _relation(rng, (30, 80), (40, 120))
    return {"relation": relation, "num_words": n}, {"n": n}, relation


def _ending(rng, topic):
    phrase = rng.choice(END_PHRASES)
    return {"end_phrase": phrase}, {"phrase": phrase}, ""


KINDS = {
    kind.id: kind
    for kind in (
        Kind(
            "change_case:english_lowercase",
            {
                "": (
                    "Write your whole reply in lowercase letters only and capitalize nothing.",
                    "No capital letters anywhere please: lowercase from start to end.",
                    "Keep every letter of the answer lowercase.",
                    "Respond in English using small letters throughout, with no uppercase at all.",
                )
            },
        ),
        Kind(
            "change_case:english_capital",
            {
                "": (
                    "Answer entirely in uppercase letters.",
                    "Write all of it in CAPITAL LETTERS, every single word.",
                    "Every letter you write must be a capital one.",
                    "Respond in English with every letter in uppercase.",
                )
            },
        ),
        Kind(
            "change_case:capital_word_frequency",
            {
                AT_LEAST: (
                    "Stress at least {n} words by writing them in all caps, LIKE THIS.",
                    "Put {n} or more words entirely in capitals for emphasis.",
                ),
                LESS: (
                    "Write fewer than {n} words entirely in capital letters.",
                    "Keep all-caps words rare: fewer than {n} of them.",
                ),
            },
            _capital_words,
        ),
        Kind(
            "combination:repeat_prompt",
            {
                "": (
                    "Start by copying my request above exactly as written (not this sentence) and then answer it.",
                    "Begin your reply by restating everything before this sentence word for word; only then respond.",
                    "Before answering, write out my request above without changing a word (leave out this "
                    "instruction), then give your answer.",
                )
            },
        ),
        Kind(
            "combination:two_responses",
            {
                "": (
                    "Give two different answers with a line of six asterisks (******) between them.",
                    "Write two separate versions and put ****** between the two.",
                    "Provide two different replies, divided by a row of six asterisks (******).",
                )
            },
        ),
        Kind(
            "detectable_content:number_placeholders",
            {
                "": (
                    "Leave {n} or more blanks in square brackets, for example [name], for the reader to fill in.",
                    "Include at least {n} fill-in fields written in square brackets like [date].",
                )
            },
            _placeholders,
        ),
        Kind(
            "detectable_content:postscript",
            {
                "": (
                    "End with a short note that starts with {marker}",
                    "After the main reply add a postscript beginning with {marker}",
                )
            },
            _postscript,
        ),
        Kind(
            "detectable_format:constrained_response",
            {
                "": (
                    'Say "My answer is yes." if so, "My answer is no." if not, and "My answer is maybe." if unsure.',
                    'Decide and reply "My answer is no." when you disagree, "My answer is yes." when you agree, '
                    'or "My answer is maybe." when in doubt.',
                )
            },
        ),
        Kind(
            "detectable_format:json_format",
            {
                "": (
                    "Format the entire reply as JSON.",
                    "Return your answer as one valid JSON object with nothing outside it.",
                    "Your whole output must be valid JSON; a markdown code block around it is fine.",
                )
            },
        ),
        Kind(
            "detectable_format:multiple_sections",
            {
                "": (
                    "Split your reply into {n} sections and start each one with {splitter} X, where X is its number.",
                    "Organize the answer in {n} parts labelled {splitter} 1, {splitter} 2 and so on.",
                )
            },
            _sections,
        ),
        Kind(
            "detectable_format:number_bullet_lists",
            {
                "": (
                    "Use exactly {n} markdown bullet points, each line starting with * and a space.",
                    "List exactly {n} points as a markdown list (lines beginning with *).",
                )
            },
            _count("num_bullets", 2, 5),
        ),
        Kind(
            "detectable_format:number_highlighted_sections",
            {
                "": (
                    "Mark {n} or more parts as highlighted with markdown, as in *this highlighted part*.",
                    "Put single asterisks around at least {n} key phrases, like *key phrase*, to highlight them.",
                )
            },
            _count("num_highlights", 1, 4),
        ),
        Kind(
            "detectable_format:title",
            {
                "": (
                    "Give it a title wrapped in double angle brackets, such as <<a title>>.",
                    "Start with a title in the form <<title here>>.",
                )
            },
        ),
        Kind(
            "keywords:existence",
            {"": ("Make sure your answer uses {words}.", "Work {words} into your answer.")},
            _existence,
        ),
        Kind(
            "keywords:forbidden_words",
            {"": ("Never use the words {words}.", "Avoid the words {words} entirely.")},
            _forbidden,
        ),
        Kind(
            "keywords:frequency",
            {
                AT_LEAST: (
                    'Use the word "{word}" at least {n} times.',
                    'The word "{word}" should appear {n} or more times.',
                ),
                LESS: (
                    'Use the word "{word}" fewer than {n} times.',
                    'Mention "{word}" only rarely: fewer than {n} times.',
                ),
            },
            _frequency,
        ),
        Kind(
            "keywords:letter_frequency",
            {
                AT_LEAST: (
                    'Include the letter "{letter}" {n} or more times.',
                    "Use the letter {letter} {n} times or more.",
                ),
                LESS: (
                    'Use the letter "{letter}" fewer than {n} times.',
                    "Let the letter {letter} appear under {n} times.",
                ),
            },
            _letters,
        ),
        Kind(
            "length_constraints:nth_paragraph_first_word",
            {
                "": (
                    'Write {n} paragraphs separated by a blank line; paragraph {k} must begin with the word "{word}".',
                    'Use {n} paragraphs with an empty line between them, and open paragraph number {k} with "{word}".',
                )
            },
            _nth_paragraph,
        ),
        Kind(
            "length_constraints:number_paragraphs",
            {
                "": (
                    "Write exactly {n} paragraphs with the markdown divider *** between each pair of them.",
                    "Give {n} paragraphs and separate them with *** lines.",
                )
            },
            _count("num_paragraphs", 2, 4),
        ),
        Kind(
            "length_constraints:number_sentences",
            {
                AT_LEAST: ("Write no fewer than {n} sentences.", "Use {n} sentences or more."),
                LESS: ("Keep it under {n} sentences.", "Stay below {n} sentences in total."),
            },
            _sentences,
        ),
        Kind(
            "length_constraints:number_words",
            {
                AT_LEAST: ("Write at least {n} words.", "The answer needs {n} words or more."),
                LESS: ("Keep the answer under {n} words.", "Use fewer than {n} words in total."),
            },
            _words,
        ),
        Kind(
            "punctuation:no_comma",
            {
                "": (
                    "Do not use any commas.",
                    "Avoid commas completely in your reply.",
                    "Write without a single comma.",
                )
            },
        ),
        Kind(
            "startend:end_checker",
            {
                "": (
                    'End your reply with the exact words "{phrase}" and write nothing after them.',
                    'The last words of the answer must be "{phrase}"',
                    'Close your response with exactly this phrase and add nothing after it: "{phrase}"',
                )
            },
            _ending,
        ),
        Kind(
            "startend:quotation",
            {
                "": (
                    "Put the whole reply inside double quotation marks.",
                    "Wrap everything you write in double quotes from the first word to the last.",
                    "Enclose the complete response in one pair of double quotation marks.",
                )
            },
        ),
    )
}
LEFT_OUT = ("language:response_language",)
