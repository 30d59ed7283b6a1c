"""Demonstrations written by code for the IFEval-format task: drafts edited until lm-eval's checkers pass them."""

from __future__ import annotations

import random
from collections import Counter

from chatrlhf.ifeval.checkers import follows
from chatrlhf.ifeval.edit import comply, sentences_of
from chatrlhf.ifeval.kinds import KINDS
from chatrlhf.ifeval.task import make_prompts, split_topics

DRAFT = """**{Topic}: A Short Guide**

{Topic} have fascinated people for a long time. Some visit them every year, and others read about them at home.

Here are a few reasons why:
1. They change with the weather, so no two visits are alike.
2. Artists and writers return to {topic} again and again.
3. Children often ask the best questions about {topic}.

If you want to learn more, start with a good book and a notebook. I think you will find that {topic} reward the
patience you give them. Curiosity is the only ticket you need, and the journey is worth"""


def _draft(topic: str) -> str:
    return DRAFT.format(Topic=topic.capitalize(), topic=topic)


def test_a_draft_loses_its_markdown_headings_and_the_sentence_cut_short():
    sentences = sentences_of(_draft("rivers"))
    assert sentences[0] == "Rivers have fascinated people for a long time."
    assert "They change with the weather, so no two visits are alike." in sentences
    assert not any("Guide" in s or "reasons why" in s or s.endswith("worth") for s in sentences)
    assert not any(c in s for s in sentences for c in "*#")


def test_edited_drafts_follow_every_instruction_by_lm_evals_checkers():
    train, _ = split_topics()
    rows = make_prompts(train, 400, 3, "e")
    made, failed, kinds_made = 0, Counter(), set()
    for row in rows:
        text = comply(row, _draft(row["topic"]), random.Random(0))
        if text is None:
            failed.update(row["instruction_id_list"])
            continue
        made += 1
        kinds_made.update(row["instruction_id_list"])
        for kind, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            assert follows(kind, {k: v for k, v in kwargs.items() if v}, row["prompt"], text), (kind, text)
        assert row["topic"] in text.lower() or row["topic"].upper() in text
        # the draft's own words survive the edit (its first sentence, up to case and commas)
        first = sentences_of(_draft(row["topic"]))[0].replace(",", "").lower()
        assert first.split()[1] in text.lower()
    assert made >= 0.9 * len(rows), failed.most_common()
    assert kinds_made == set(KINDS)  # every kind the task draws is edited into some demonstration


def test_no_demonstration_is_made_from_a_draft_without_a_finished_sentence():
    row = make_prompts(["bees"], 1, 0, "x")[0]
    assert comply(row, "bees bees honey", random.Random(0)) is None
    assert comply(row, "", random.Random(0)) is None


def test_drafts_without_a_finished_sentence_give_no_demonstration():
    from chatrlhf.ifeval.edit import demonstrations

    rows = make_prompts(["bees"], 2, 0, "x")
    assert demonstrations(rows, ["", "bees bees honey"], 0) == []


def test_ranking_tasks_hold_answers_that_follow_the_instructions_to_different_degrees():
    from chatrlhf.ifeval.edit import ranking_tasks
    from chatrlhf.ifeval.task import conflicts
    from chatrlhf.judges import RuleJudge

    train, _ = split_topics()
    rows = make_prompts(train, 60, 5, "r")
    tasks = ranking_tasks(rows, [_draft(r["topic"]) for r in rows], 0, conflicts())
    assert len(rows) <= len(tasks) <= 2 * len(rows)
    judge, spread = RuleJudge(), 0
    for task in tasks:
        answers = task["answers"]
        assert len(answers) == len(set(answers)) >= 2 and answers[-1] == _draft(task["topic"]).strip()
        meta = {k: v for k, v in task.items() if k not in ("prompt", "answers")}
        scores = judge.scores([{"role": "user", "content": task["prompt"]}], answers, meta)
        assert scores[0] == max(scores)  # the draft edited to follow everything comes first
        spread += scores[0] > min(scores)
    assert spread >= 0.8 * len(tasks)  # and most tasks have something to rank (the rest tie, and are skipped)
