"""`chatrlhf sample` -> `label auto` -> `label export` -> the reward stage's reader, as a user runs them."""

from __future__ import annotations

import json

from conftest import chatrlhf, write_jsonl

from chatrlhf.judges import RuleJudge
from chatrlhf.labeling.auto import label
from chatrlhf.labeling.store import Store, TaskIn
from chatrlhf.preferences import load_rankings

PROMPTS = [
    {"prompt": "Describe tea in at most 5 words.", "reference": "Tea is a drink."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Name three bullet points about rain."}]},
    {"prompt": "Say something about maps, in all lowercase."},
]  # fmt: skip


def test_sample_then_auto_label_then_export(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    db = str(tmp_path / "labels.db")
    args = [
        "--prompts",
        prompts,
        "--k",
        "4",
        "--db",
        db,
        "--model",
        tiny_model,
        "--sampling.max_new_tokens",
        "6",
    ]
    result = chatrlhf("sample", *args, "--labels_per_task", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    store = Store(db)
    assert store.progress()["tasks"] == 3
    tasks = store.rankings(min_labels=0)  # nothing ranked yet
    assert tasks == []

    result = chatrlhf("label", "auto", "--db", db, "--judge", "rule", "--noise", "0.2", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "auto-rule-1: ranked" in result.stdout and "auto-rule-2: ranked" in result.stdout
    progress = store.progress()
    assert progress["complete"] == 3 and progress["submissions"] == 6

    out = tmp_path / "rankings.jsonl"
    result = chatrlhf("label", "export", "--db", db, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records  # a task whose two noisy rankings average to a full tie is left out
    for record in records:
        source = PROMPTS[record["task_id"] - 1]
        assert len(record["responses"]) == 4 == len(set(record["responses"]))  # K distinct answers
        assert record["meta"]["seeds"] and record["meta"]["model"] == tiny_model
        assert record["meta"].get("reference") == source.get("reference")
        assert record["labels"] == 2
        assert record["prompt"] == source.get("messages", [{"role": "user", "content": source.get("prompt")}])
    assert len(load_rankings(str(out))) == len(records)  # the reward stage reads the export

    result = chatrlhf("label", "export", "--db", db, "--out", str(out), "--per_labeler", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    per_labeler = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["labeler"] for r in per_labeler) == ["auto-rule-1"] * 3 + ["auto-rule-2"] * 3


def _labelled(folder, seed: int) -> list[dict]:
    store = Store(str(folder / "labels.db"))
    prompts = ["Describe tea in at most 5 words.", "Describe rain in at most 5 words."]
    answers = ["a b c", "a b c d e f g", "a b c d e f g h i j k l", "one two three four five six"]
    store.add_tasks(TaskIn([{"role": "user", "content": p}], answers, {}, labels_per_task=3) for p in prompts)
    done = label(store, RuleJudge(), noise=0.3, labelers=0, seed=seed)
    assert done.submitted == {"auto-rule-1": 2, "auto-rule-2": 2, "auto-rule-3": 2, "auto-rule-4": 0}
    assert not done.tied and sorted(done.judged) == [1, 2]
    return store


def test_simulated_labelers_agreement_is_what_their_rankings_give(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    store = _labelled(tmp_path / "a", seed=7)
    per_labeler = store.rankings(per_labeler=True)
    assert len(per_labeler) == 6
    # agreement by hand: for each task, each pair of labelers, each pair of answers: same relation?
    same = total = 0
    for task_id in (1, 2):
        ranks = [r["ranks"] for r in per_labeler if r["task_id"] == task_id]
        for a in range(3):
            for b in range(a + 1, 3):
                for i in range(4):
                    for j in range(i + 1, 4):
                        rel = [(x[i] > x[j]) - (x[i] < x[j]) for x in (ranks[a], ranks[b])]
                        same, total = same + (rel[0] == rel[1]), total + 1
    assert total == 2 * 3 * 6
    assert store.progress()["agreement"] == same / total
    assert 0.3 < same / total < 1.0  # noise 0.3 on scores ~0.2 apart: labelers disagree, as people do
    # the same seed ranks the same way; another seed differently
    assert _labelled(tmp_path / "b", seed=7).rankings(per_labeler=True) == per_labeler
    assert _labelled(tmp_path / "c", seed=8).rankings(per_labeler=True) != per_labeler


def test_label_auto_says_what_it_left_unranked_and_why(tmp_path):
    def tasks(db: str) -> None:
        answers = {
            "Describe tea in at most 3 words.": ["Hot leaf water.", "Tea is a drink made from leaves."],
            "Describe tea in at most 9 words.": ["Tea is hot.", "Tea is a drink."],  # both meet it: a tie
            "Tell me about tea.": ["Tea is hot.", "Tea is a drink."],  # no constraint: both score 0
        }
        Store(db).add_tasks(TaskIn([{"role": "user", "content": p}], a, {}) for p, a in answers.items())

    db = str(tmp_path / "exact.db")
    tasks(db)
    result = chatrlhf("label", "auto", "--db", db, "--judge", "rule")
    out = " ".join(result.stdout.split())  # as printed, less the console's line wrapping
    assert result.returncode == 0, result.stderr[-2000:]
    assert "auto-rule-1: ranked 1 tasks" in out
    assert "2 tasks skipped, every answer tied: the rule judge scored all their answers the same" in out
    assert "--noise 0.1 (say) makes the simulated labelers choose between equal answers" in out
    assert "the rule judge finds no constraint in 1 of 3 prompts" in out
    assert Store(db).progress()["complete"] == 1

    db = str(tmp_path / "noisy.db")
    tasks(db)
    result = chatrlhf("label", "auto", "--db", db, "--judge", "rule", "--noise", "0.1")
    out = " ".join(result.stdout.split())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "auto-rule-1: ranked 3 tasks" in out and "skipped" not in out
    assert Store(db).progress()["complete"] == 3


def test_sample_refuses_bad_input_before_writing(tiny_model, tmp_path):
    bad = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    db = tmp_path / "labels.db"
    result = chatrlhf("sample", "--prompts", bad, "--db", str(db), "--model", tiny_model)
    assert result.returncode == 2
    assert "prompts.jsonl:2" in result.stderr and "prompt" in result.stderr
    assert "Traceback" not in result.stderr
    result = chatrlhf("sample", "--prompts", bad, "--db", str(db), "--k", "1")
    assert result.returncode == 2 and "--k must be at least 2" in result.stderr
    result = chatrlhf("label", "auto", "--db", str(tmp_path / "x.db"), "--judge", "magic")
    assert (
        result.returncode == 2
        and "`judge` must be one of rule | reference | ifeval | rm | llm, got 'magic'" in result.stderr
    )
