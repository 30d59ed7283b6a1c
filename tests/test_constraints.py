"""The rule judge's constraint parser: the phrasings people write, read as the constraints they mean, and never
as two constraints that contradict each other."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_DATA

from chatrlhf.constraints import Constraint, parse_constraints, unconstrained

MAX, MIN, BULLETS = "max_words", "min_words", "bullets"
LOWER, UPPER, QUESTION = Constraint("lowercase"), Constraint("uppercase"), Constraint("question")


def words(low: int | None, high: int | None) -> list[Constraint]:
    return ([Constraint(MIN, low)] if low else []) + ([Constraint(MAX, high)] if high else [])


PHRASINGS = [
    # word limits: at most N
    ("Describe tea in at most 15 words.", words(None, 15)),
    ("Answer in no more than 12 words.", words(None, 12)),
    ("Reply in not more than 12 words.", words(None, 12)),
    ("Reply in up to 30 words.", words(None, 30)),
    ("Use a maximum of 25 words.", words(None, 25)),
    ("Answer in maximum 25 words.", words(None, 25)),
    ("Keep it within 40 words.", words(None, 40)),
    ("Make it no longer than 40 words.", words(None, 40)),
    ("Do not exceed 50 words.", words(None, 50)),
    ("Don't use more than 30 words.", words(None, 30)),
    ("I don't want anything longer than 30 words.", words(None, 30)),
    ("Answer in 20 words or fewer.", words(None, 20)),
    ("Answer in 20 words or less.", words(None, 20)),
    ("Answer in 20 or fewer words.", words(None, 20)),
    ("Summarise it, 50 words max.", words(None, 50)),
    ("Answer in at most fifteen words.", words(None, 15)),
    # strictly fewer than N
    ("Use fewer than 10 words.", words(None, 9)),
    ("Write less than 20 words.", words(None, 19)),
    ("Keep it under 50 words.", words(None, 49)),
    ("Respond in fewer than twenty words.", words(None, 19)),
    # at least N, strictly more than N
    ("Write at least 50 words.", words(50, None)),
    ("Use no fewer than 40 words.", words(40, None)),
    ("Write no less than 60 words.", words(60, None)),
    ("Use a minimum of 80 words.", words(80, None)),
    ("Do not write fewer than 40 words.", words(40, None)),
    ("Write 200 words or more.", words(200, None)),
    ("Write 200 or more words.", words(200, None)),
    ("The essay should be 600+ words long.", words(600, None)),
    ("Write more than 100 words.", words(101, None)),
    ("Write an answer of over 100 words.", words(101, None)),
    ("Write at least twenty-five words.", words(25, None)),
    # both bounds
    ("Write between 50 and 80 words.", words(50, 80)),
    ("Answer in 10-20 words.", words(10, 20)),
    ("Answer in 10 to 20 words.", words(10, 20)),
    ("Answer in exactly 5 words.", words(5, 5)),
    # bullet points, in digits and in words
    ("Describe tea as exactly 3 bullet points.", [Constraint(BULLETS, 3)]),
    ("Give me three bullet points about rain.", [Constraint(BULLETS, 3)]),
    ("List three bullet points about tea.", [Constraint(BULLETS, 3)]),
    ("Use 4 bullets.", [Constraint(BULLETS, 4)]),
    ("Answer with twelve bullet points.", [Constraint(BULLETS, 12)]),
    ("Write exactly 9 very short bullet points.", [Constraint(BULLETS, 9)]),
    ("Write a bulleted list of 5 items about maps.", [Constraint(BULLETS, 5)]),
    ("Make a 3-bullet list of tips.", [Constraint(BULLETS, 3)]),
    ("List 3 facts about tea as bullet points.", [Constraint(BULLETS, 3)]),
    ("Name exactly 3 dogs using markdown bullet points.", [Constraint(BULLETS, 3)]),
    ("Use at least 3 bullet points.", []),  # a bound, not a count the bullets kind checks
    # letter case
    ("Write in all lowercase.", [LOWER]),
    ("Tell me about tea, writing in all lowercase letters.", [LOWER]),
    ("use only lowercase letters", [LOWER]),
    ("Answer in lower case.", [LOWER]),
    ("Reply in lowercase only.", [LOWER]),
    ("No capital letters are allowed.", [LOWER]),
    ("Do not use any capital letters.", [LOWER]),
    ("It should not contain any capital letters.", [LOWER]),
    ("All letters in your response must be lower case letters.", [LOWER]),
    ("Reply in all caps.", [UPPER]),
    ("Reply ALL CAPITAL LETTERS please", [UPPER]),
    ("Write your answer in capital letters.", [UPPER]),
    ("RESPOND IN UPPERCASE ONLY.", [UPPER]),
    ("Your answer should be in all capitals.", [UPPER]),
    ("Capitalize every letter.", [UPPER]),
    ("Do not write in all caps.", []),
    ("Use at least 5 words in all capital letters.", []),  # some words, not the whole answer
    # ending with a question
    ("Say one fact about tea and end with a question.", [QUESTION]),
    ("Describe tea, ending with a question.", [QUESTION]),
    ("Finish your reply with a question.", [QUESTION]),
    ("Conclude with a question.", [QUESTION]),
    ("Close with a question.", [QUESTION]),
    ("Your reply should end with a question.", [QUESTION]),
    ("End your answer with a follow-up question.", [QUESTION]),
    ("End by asking me a question.", [QUESTION]),
    ("The last sentence must be a question.", [QUESTION]),
    ("Don't end with a question.", []),
    ("Describe tea without ending with a question.", []),
    # words to include or avoid
    ("Include the word cup.", [Constraint("include", "cup")]),
    ('Use the word "river" twice.', [Constraint("include", "river")]),
    ('Mention "Argentinian" in the post.', [Constraint("include", "argentinian")]),
    ("Include the keywords waste, material and meal.", [Constraint("include", w) for w in ("waste", "material", "meal")]),
    ("Do not use the word leaf.", [Constraint("exclude", "leaf")]),
    ("Avoid the word tea.", [Constraint("exclude", "tea")]),
    ("Never say the word 'sorry'.", [Constraint("exclude", "sorry")]),
    ("Write it without using the word rain.", [Constraint("exclude", "rain")]),
    ("Do not include 'can' and 'ride' in your story.", [Constraint("exclude", "can"), Constraint("exclude", "ride")]),
    ("Avoid using the following keywords: sleep, cook, feed", [Constraint("exclude", w) for w in ("sleep", "cook", "feed")]),
    ("The word 'moon' must not appear.", [Constraint("exclude", "moon")]),
    # two or three at once, read in the order stated
    ("Answer in 20 words or fewer, in all lowercase.", [Constraint(MAX, 20), LOWER]),
    ("Use fewer than 10 words and end with a question.", [Constraint(MAX, 9), QUESTION]),
    ("Describe tea in at most 15 words, in all lowercase, and end with a question.", [Constraint(MAX, 15), LOWER, QUESTION]),
    ("Write at least 50 words and answer in all caps.", [Constraint(MIN, 50), UPPER]),
    ("Describe tea. Do not use the word leaf, and include the word cup.", [Constraint("exclude", "leaf"), Constraint("include", "cup")]),
    ("Give 3 bullet points about maps in all lowercase and do not use the word road.",
     [Constraint(BULLETS, 3), LOWER, Constraint("exclude", "road")]),
    # numbers and words that state no constraint
    ("Tell me a story.", []),
    ("List 3 facts about tea.", []),
    ("Give me 5 reasons to learn French.", []),
    ("Summarise the 12 words of the poem.", []),
    ("Write 5 words that rhyme with cat.", []),
    ("Name five bullet journal ideas.", []),
    ("Use the words of the poem in a new order.", []),
    ("Describe the difference between uppercase and lowercase letters.", []),
    ("What is the capital of France?", []),
    ("List all capitals of Europe.", []),
    ("Is 'at least' two words?", []),
    ("Write 3 paragraphs about the sea.", []),
    ("Contain 6 or more exclamation marks.", []),
]  # fmt: skip


@pytest.mark.parametrize("text,expected", PHRASINGS, ids=[t for t, _ in PHRASINGS])
def test_phrasings_read_as_meant(text, expected):
    assert parse_constraints(text) == expected


def test_contradictions_in_one_prompt_keep_the_first_demand():
    assert parse_constraints("Use all lowercase. Reply in all caps.") == [LOWER]
    assert parse_constraints("Include the word tea. Do not use the word tea.") == [
        Constraint("include", "tea")
    ]
    assert parse_constraints("Write at least 50 words, at most 20 words.") == [Constraint(MIN, 50)]
    # repeated bounds keep the tightest, where the first stated them
    assert (
        parse_constraints("At most 30 words. No more than 20 words, at least 5 words.") == words(5, 20)[::-1]
    )
    assert parse_constraints("Use 3 bullet points. Use 4 bullet points.") == [Constraint(BULLETS, 3)]
    assert parse_constraints("Use fewer than 1 word.") == []  # a limit no answer can meet is no limit to read


FRAGMENTS = [text.rstrip(".") for text, _ in PHRASINGS] + [
    "don't", "not", "no", "never", "at least", "at most", "more than", "fewer than", "words", "word",
    "lowercase", "uppercase", "capital letters", "caps", "the word tea", "a question", "bullet points",
    "3", "twelve", "0", "1", "between 9 and 2 words", "exactly 0 words", "the word", "'tea'",
]  # fmt: skip


def consistent(found: list[Constraint]) -> str | None:
    """Why a reading contradicts itself, or None."""
    kinds = [c.kind for c in found]
    bounds = {c.kind: c.value for c in found if c.kind in (MAX, MIN)}
    if len(set(found)) < len(found):
        return "a constraint twice"
    if any(kinds.count(k) > 1 for k in (MAX, MIN, BULLETS)):
        return "two values of one bound"
    if any(isinstance(c.value, int) and c.kind in (MAX, MIN, BULLETS) and c.value < 1 for c in found):
        return "a count below 1"
    if bounds.get(MIN, 0) > bounds.get(MAX, float("inf")):
        return "min_words above max_words"
    if LOWER in found and UPPER in found:
        return "lowercase and uppercase"
    included = {c.value for c in found if c.kind == "include"}
    if included & {c.value for c in found if c.kind == "exclude"}:
        return "include and exclude of one word"
    return None


def test_no_phrase_yields_contradictory_constraints():
    rng = random.Random(0)
    joins = [" ", ", ", " and ", ". ", "; then ", " but "]
    texts = [a + rng.choice(joins) + b for a in FRAGMENTS for b in FRAGMENTS]
    texts += [rng.choice(joins).join(rng.choices(FRAGMENTS, k=rng.randint(3, 6))) for _ in range(3000)]
    checked = 0
    for text in texts:
        for variant in (text, text.upper(), f"Describe tea. {text}."):
            found = parse_constraints(variant)
            assert consistent(found) is None, (variant, found, consistent(found))
            assert found == parse_constraints(variant)  # the same text, the same reading
            checked += bool(found)
    assert checked > 10000  # most of the texts state something: the property is tested, not skipped


def test_unconstrained_counts_prompts_the_rule_judge_cannot_score():
    def user(text):
        return [{"role": "user", "content": text}]

    prompts = [
        user("Tell me about tea."),
        user("Describe tea in at most 15 words."),
        user("Hi"),
        user("Hello"),
    ]
    metas = [{}, {}, {"constraints": [{"kind": "lowercase"}]}, {"where": "p.jsonl:4"}]
    assert unconstrained(prompts, metas) == 2
    assert unconstrained([], []) == 0


IFEVAL_KINDS = {  # IFEval instruction id -> what the parser should read from the prompt's words
    "length_constraints:number_words": lambda kw: Constraint(
        MAX if kw["relation"] == "less than" else MIN,
        kw["num_words"] - 1 if kw["relation"] == "less than" else kw["num_words"],
    ),
    "change_case:english_lowercase": lambda kw: LOWER,
    "change_case:english_capital": lambda kw: UPPER,
    "detectable_format:number_bullet_lists": lambda kw: Constraint(BULLETS, kw["num_bullets"]),
}


def test_reads_the_checkable_instructions_of_ifeval_prompts():
    """IFEval's 541 prompts were written by people; its kwargs say which limits each one states."""
    path = SHARED_DATA / "ifeval" / "input_data.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (set CHATRLHF_SHARED_DATA)")
    read = stated = 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        found = parse_constraints(row["prompt"])
        assert consistent(found) is None, (row["prompt"], found)
        for instruction, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            if instruction in IFEVAL_KINDS:
                stated += 1
                read += IFEVAL_KINDS[instruction](kwargs) in found
    assert stated > 140 and read / stated > 0.93, f"{read} of {stated}"
