"""IFEval: lm-eval's checkers on hand-written answers for every instruction type, IFEval-format records checked
before anything runs, and `chatrlhf eval --benchmark ifeval` end to end on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, chatrlhf, make_tiny_model, write_jsonl

from chatrlhf.ifeval.checkers import IFEvalItem, check, instruction_names, load_items
from chatrlhf.records import DataError

# (instruction, kwargs, an answer that follows it, one that does not); written here, checked by lm-eval
CASES = [
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "Nothing is shouted in this answer.", "NASA AND ESA MET TODAY."),
    ("change_case:english_capital", {},
     "THIS ANSWER IS WRITTEN ENTIRELY IN CAPITAL LETTERS ABOUT THE WEATHER TODAY.", "This one is not."),
    ("change_case:english_lowercase", {},
     "this answer is written entirely in small letters about the weather today.", "This Has Capitals."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi to the team."},
     "Say hi to the team. Hi, team!", "Hi, team!"),
    ("combination:two_responses", {}, "Tea is warm.\n******\nCoffee is strong.", "Tea is warm."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [place].", "Dear friend, see you there."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\nP.S. See you soon.", "Hello."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Perhaps, who knows."),
    ("detectable_format:json_format", {}, '{"city": "Paris"}', "city: Paris"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nRain falls.\nSection 2\nSun shines.", "Rain falls. Sun shines."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* salt\n* pepper", "* salt"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "Keep *calm* and *carry on*.", "Keep *calm* and carry on."),
    ("detectable_format:title", {}, "<<A Day Out>>\nWe walked.", "A Day Out\nWe walked."),
    ("keywords:existence", {"keywords": ["apple"]}, "I baked an apple pie.", "I baked a pie."),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "I like jazz.", "I like rock music."),
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2},
     "A story within a story.", "A single story."),
    ("keywords:letter_frequency", {"let_relation": "at least", "letter": "z", "let_frequency": 3},
     "Pizza at the zoo.", "Bread at the park."),
    ("language:response_language", {"language": "fr"},
     "Bonjour, je suis très content de vous voir aujourd'hui, merci beaucoup pour votre aide précieuse.",
     "Hello, I am very happy to see you today, thank you very much for your precious help."),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "weekend", "num_paragraphs": 2,
     "nth_paragraph": 1}, "Weekend plans are fun.\n\nWe rest.", "Monday plans are dull.\n\nWe work."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Rain.\n***\nSun.", "Rain. *** Sun. *** Fog."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Rain fell. It stopped.", "Rain fell. It stopped. The sun came. Birds sang."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "One two three four five six.", "One two."),
    ("punctuation:no_comma", {}, "No commas appear here.", "Yes, a comma appears."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "That is all. Any other questions?", "Any other questions? That is all."),
    ("startend:quotation", {}, '"Wrapped in quotes."', "Not wrapped."),
]  # fmt: skip


def item(instruction: str, kwargs: dict, prompt: str = "Write something.") -> IFEvalItem:
    return IFEvalItem("test:1", "1", prompt, [instruction], [kwargs])


def test_cases_cover_every_instruction_type():
    assert sorted(c[0] for c in CASES) == instruction_names()
    assert len(instruction_names()) == 25


@pytest.mark.parametrize("instruction,kwargs,follows,breaks", CASES, ids=[c[0] for c in CASES])
def test_lm_eval_checkers_judge_hand_written_answers(instruction, kwargs, follows, breaks):
    good, bad = check(item(instruction, kwargs), follows), check(item(instruction, kwargs), breaks)
    assert good.strict == [True] and good.loose == [True]
    assert bad.strict == [False] and bad.loose == [False]


def test_loose_reading_forgives_a_preamble_line_and_markdown_stars():
    no_comma = item("punctuation:no_comma", {})
    verdict = check(no_comma, "Sure, here it is:\nNo commas appear here")
    assert verdict.strict == [False] and verdict.loose == [True]
    title = item("startend:end_checker", {"end_phrase": "Goodbye."})
    verdict = check(title, "**Goodbye.**")
    assert verdict.strict == [False] and verdict.loose == [True]


def test_a_record_with_several_instructions_gets_one_verdict_each():
    several = IFEvalItem(
        "t:1", "1", "p", ["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["tea"]}]
    )
    assert check(several, "I drink coffee").loose == [True, False]
    assert check(several, "I drink tea, hot").loose == [False, True]


def test_the_checkers_load_without_the_rest_of_lm_eval():
    code = (
        "import sys; from chatrlhf.ifeval.checkers import check, IFEvalItem, punkt_source; "
        "check(IFEvalItem('w', 'k', 'p', ['length_constraints:number_sentences'], "
        "[{'relation': 'less than', 'num_sentences': 2}]), 'One. Two. Three.'); "
        "print(punkt_source()); print('datasets' in sys.modules, 'lm_eval.tasks' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False False"
    assert out.stdout.splitlines()[-2] in ("nltk data", "llama-index-core", "untrained Punkt")


def test_the_public_ifeval_file_reads_whole():
    path = SHARED_DATA / "ifeval" / "input_data.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set CHATRLHF_SHARED_DATA)")
    items = load_items(str(path))
    assert len(items) == 541
    assert {i for it in items for i in it.instruction_ids} == set(instruction_names())
    sample = load_items(str(path), limit=20, seed=3)
    assert len(sample) == 20 and sample == load_items(str(path), limit=20, seed=3)


GOOD = {"key": 1, "prompt": "Write about tea without commas.", "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}]}  # fmt: skip


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            {**GOOD, "instruction_id_list": ["punctuation:no_colon"]},
            "field 'instruction_id_list[0]': unknown instruction 'punctuation:no_colon'",
        ),
        (
            {
                **GOOD,
                "instruction_id_list": ["keywords:frequency"],
                "kwargs": [{"relation": "roughly", "keyword": "tea", "frequency": 2}],
            },
            "field 'kwargs[0]' (keywords:frequency): the checker refuses",
        ),
        (
            {
                **GOOD,
                "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"relation": "at least"}],
            },
            "field 'kwargs[0]' (length_constraints:number_words): missing num_words",
        ),
        (
            {
                **GOOD,
                "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"relation": "at least", "num_words": "many"}],
            },
            "field 'kwargs[0]' (length_constraints:number_words): the checker refuses",
        ),
        ({**GOOD, "kwargs": [{}, {}]}, "field 'kwargs': expected a list of 1 objects"),
        ({k: v for k, v in GOOD.items() if k != "prompt"}, "field 'prompt'"),
        ({**GOOD, "instruction_id_list": []}, "field 'instruction_id_list'"),
    ],
    ids=[
        "unknown-id",
        "refused-kwargs",
        "missing-kwarg",
        "wrong-type",
        "kwargs-length",
        "no-prompt",
        "no-ids",
    ],
)
def test_bad_records_stop_with_file_line_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "ifeval.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        load_items(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_a_bad_record_stops_the_command_before_anything_is_written(tmp_path, tiny_model):
    bad = {**GOOD, "instruction_id_list": ["punctuation:no_colon"]}
    path = write_jsonl(tmp_path / "ifeval.jsonl", [GOOD, bad])
    out = chatrlhf("eval", "--benchmark", "ifeval", "--policy", tiny_model, "--prompts", path,
                   "--output", str(tmp_path / "out"))  # fmt: skip
    assert out.returncode == 2
    assert f"{path}:2: field 'instruction_id_list[0]': unknown instruction" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_benchmark_is_refused_with_the_choices():
    out = chatrlhf("eval", "--benchmark", "mmlu")
    assert out.returncode == 2 and "'mmlu' is not one of ifeval" in out.stderr


def test_help_lists_the_benchmark_keys():
    out = chatrlhf("eval", "--benchmark", "ifeval", "--help")
    assert out.returncode == 0
    assert "--limit" in out.stdout and "lm-eval's own max_gen_toks is 1280" in out.stdout
    assert "--judge" not in out.stdout


def _records(n: int) -> list[dict]:
    kinds = [("punctuation:no_comma", {}), ("keywords:existence", {"keywords": ["tea"]}),
             ("length_constraints:number_words", {"relation": "less than", "num_words": 40}),
             ("detectable_format:title", {})]  # fmt: skip
    rows = []
    for i in range(n):
        picked = [kinds[i % 4], kinds[(i + 1) % 4]][: 1 + i % 2]
        rows.append({"key": 100 + i, "prompt": f"Tell me about item {i} in a few words.",
                     "instruction_id_list": [p[0] for p in picked], "kwargs": [p[1] for p in picked]})  # fmt: skip
    return rows


def test_benchmark_end_to_end_on_tiny_models(tmp_path, tokenizer, tiny_model):
    other = make_tiny_model(tmp_path / "other", tokenizer, seed=5)
    path = write_jsonl(tmp_path / "ifeval.jsonl", _records(10))
    out = chatrlhf("eval", "--benchmark", "ifeval", "--policy", tiny_model, "--baseline", other, "--prompts", path,
                   "--sampling.max_new_tokens", "12", "--batch_size", "4", "--output", str(tmp_path / "out"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    figures = json.loads((tmp_path / "out" / "ifeval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert figures["prompts"] == len(rows) == 10 and figures["instructions"] == 15
    assert [r["key"] for r in rows] == [str(100 + i) for i in range(10)]
    for who in ("policy", "baseline"):
        loose = [all(r[who]["loose"]) for r in rows]
        inst = [x for r in rows for x in r[who]["loose"]]
        overall = figures["scores"][who]["overall"]
        assert overall["prompt_loose"] == pytest.approx(sum(loose) / 10)
        assert overall["inst_loose"] == pytest.approx(sum(inst) / 15)
        lo, hi = figures["scores"][who]["overall_ci"]["inst_loose"]
        assert lo <= overall["inst_loose"] <= hi
        assert all(0 < r[who]["tokens"] <= 12 for r in rows)
        # the saved verdicts are lm-eval's on the saved answers
        for r, rec in zip(rows, _records(10)):
            again = check(
                IFEvalItem("t", "k", rec["prompt"], rec["instruction_id_list"], rec["kwargs"]),
                r[who]["answer"],
            )
            assert again.loose == r[who]["loose"] and again.strict == r[who]["strict"]
    diff = figures["difference"]["prompt_loose"]
    assert diff == pytest.approx(figures["scores"]["policy"]["overall"]["prompt_loose"]
                                 - figures["scores"]["baseline"]["overall"]["prompt_loose"])  # fmt: skip
    assert set(figures["difference_by_type"]) == set(figures["scores"]["policy"]["by_type"])
    report = (tmp_path / "out" / "ifeval.md").read_text()
    assert "prompt-level loose" in report and "punctuation:no_comma" in report and "punkt_tab" in report


def test_a_model_against_itself_differs_by_nothing(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "ifeval.jsonl", _records(6))
    out = chatrlhf("eval", "--benchmark", "ifeval", "--policy", tiny_model, "--baseline", tiny_model,
                   "--prompts", path, "--sampling.max_new_tokens", "8", "--output", str(tmp_path / "out"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    figures = json.loads((tmp_path / "out" / "ifeval.json").read_text())
    assert all(v == 0 for v in figures["difference"].values())
    assert all(tuple(ci) == (0, 0) for ci in figures["difference_ci"].values())
    assert Path(tmp_path / "out" / "answers.jsonl").exists()


# the rule judge on IFEval-format records a user brings

TWO = {
    "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
    "kwargs": [{}, {"keywords": ["tea"]}],
}
ASK = [{"role": "user", "content": "Write about tea, with no commas."}]


def test_the_rule_judge_gives_part_credit_by_the_share_of_instructions_met():
    from chatrlhf.judges import RuleJudge, constraints_of, satisfies_all

    answers = ["I drink tea every day", "I drink coffee every day", "Tea, hot and sweet", "Coffee, black"]
    assert RuleJudge().scores(ASK, answers, TWO) == [1.0, 0.5, 0.5, 0.0]
    assert [satisfies_all(ASK, a, TWO) for a in answers] == [True, False, False, False]
    described = [c.describe() for c in constraints_of(ASK, TWO)]
    assert described == ["punctuation:no_comma", "keywords:existence (keywords=['tea'])"]


def test_simulated_labelers_rank_ifeval_records_by_the_checkers(tmp_path):
    from chatrlhf.judges import RuleJudge
    from chatrlhf.labeling.auto import label
    from chatrlhf.labeling.store import Store, TaskIn

    store = Store(str(tmp_path / "labels.db"))
    answers = ["Coffee, black", "I drink tea every day", "I drink coffee every day"]
    store.add_tasks([TaskIn(ASK, answers, TWO, labels_per_task=1)])
    label(store, RuleJudge(), noise=0.0, labelers=1)
    (record,) = store.rankings()
    assert record["ranks"] == [3, 1, 2]  # none met, both met, one met


def test_prompt_files_with_ifeval_fields_are_checked_when_read(tmp_path):
    from chatrlhf.data import load_prompts

    good = {"prompt": "Write about tea, with no commas.", **TWO}
    (conv,) = load_prompts(write_jsonl(tmp_path / "good.jsonl", [good]))
    assert conv.extra["instruction_id_list"] == TWO["instruction_id_list"]
    bad = {**good, "kwargs": [{}, {"keyword": ["tea"]}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}:2: field 'kwargs[1]' (keywords:existence): missing keywords")
