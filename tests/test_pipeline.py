"""`chatrlhf eval` and `chatrlhf pipeline`: the numbers, repeatability, resume, and waiting for people."""

from __future__ import annotations

import json

import pytest
from conftest import chatrlhf, make_tiny_model, write_jsonl

from chatrlhf.eval import bootstrap_ci
from chatrlhf.labeling.store import Store

PROMPTS = [
    {"prompt": f"Describe {topic} in at most 5 words, in all lowercase."}
    for topic in ("tea", "rain", "maps", "salt")
] + [
    {"prompt": f"Describe {topic} as exactly 2 bullet points."}
    for topic in ("jazz", "bread", "glass", "cats")
]
DEMOS = [
    {"prompt": "Describe tea in at most 5 words, in all lowercase.", "completion": "tea is a warm drink."}
] * 4


def test_paired_success_difference_interval():
    # the policy meets the constraints on 3 of 4 prompts where the baseline meets 1; pairs resampled together
    diffs = [[1.0], [1.0], [0.0], [0.0]]
    lo, hi = bootstrap_ci(diffs, seed=0)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert bootstrap_ci([[1.0]] * 6, seed=0) == (1.0, 1.0)


def test_bootstrap_interval():
    assert bootstrap_ci([[1.0], [1.0], [1.0]], seed=0) == (1.0, 1.0)
    lo, hi = bootstrap_ci([[1.0, 0.0]] * 10 + [[0.5]] * 10, seed=0)
    assert lo <= 0.5 <= hi and hi - lo < 0.3


def test_eval_of_a_model_against_itself_is_all_ties_and_zero_kl(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "eval"
    args = ["--policy", tiny_model, "--baseline", tiny_model, "--prompts", prompts, "--judge", "rule"]
    result = chatrlhf("eval", *args, "--sampling.max_new_tokens", "6", "--samples", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((out / "eval.json").read_text())
    assert figures["pairs"] == 16 and figures["ties"] == 16 and figures["win_rate"] == 0.5
    assert figures["win_rate_ci"] == [0.5, 0.5]
    assert abs(figures["kl"]) < 1e-3  # same weights: log-ratios cancel up to float error
    assert figures["success_rate"]["policy"] == figures["success_rate"]["baseline"]
    assert figures["success_diff_ci"] == [0.0, 0.0]  # the same answers: every paired difference is 0
    assert "decisive win-rate" in (out / "eval.md").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 16


def test_eval_warns_about_prompts_the_rule_judge_reads_no_constraint_in(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2] + [{"prompt": "Hello there."}])
    args = [
        "--policy",
        tiny_model,
        "--baseline",
        tiny_model,
        "--prompts",
        prompts,
        "--sampling.max_new_tokens",
        "4",
    ]
    result = chatrlhf("eval", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finds no constraint in 1 of 3 prompts" in " ".join(result.stderr.split())


def test_eval_of_different_models(tiny_model, tokenizer, tmp_path):
    other = make_tiny_model(tmp_path / "other", tokenizer, seed=5)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = [
        "--policy",
        other,
        "--baseline",
        tiny_model,
        "--prompts",
        prompts,
        "--sampling.max_new_tokens",
        "6",
    ]
    third = make_tiny_model(tmp_path / "third", tokenizer, seed=6)
    result = chatrlhf(
        "eval", *args, "--sampling.temperature", "1.0", "--base", third, "--output", str(tmp_path / "e")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert figures["wins"] + figures["ties"] + figures["losses"] == 8
    assert figures["win_rate"] == pytest.approx((figures["wins"] + 0.5 * figures["ties"]) / 8)
    lo, hi = figures["win_rate_ci"]
    assert lo <= figures["win_rate"] <= hi
    assert figures["kl"] > 0.01  # two random models disagree (near-uniform, so only a little)
    groups = figures["by_constraints"]  # the same pairs, split by the kind of prompt
    assert set(groups) == {"max_words 5, lowercase", "bullets 2"}
    assert [g["pairs"] for g in groups.values()] == [4, 4]
    weighted = sum(g["win_rate"] * g["pairs"] for g in groups.values()) / 8
    assert weighted == pytest.approx(figures["win_rate"])
    success = sum(g["policy_success"] * g["pairs"] for g in groups.values()) / 8
    assert success == pytest.approx(figures["success_rate"]["policy"])
    assert "| bullets 2 | 4 |" in (tmp_path / "e" / "eval.md").read_text()
    decisive = figures["wins"] + figures["losses"]
    if decisive:
        assert figures["decisive_win_rate"] == pytest.approx(figures["wins"] / decisive)
    rates = figures["success_rate"]
    assert set(rates) == {"policy", "baseline", "base"}  # the starting model is scored too
    for name, (lo, hi) in figures["success_ci"].items():
        assert lo <= rates[name] <= hi
    lo, hi = figures["success_diff_ci"]
    assert lo <= rates["policy"] - rates["baseline"] <= hi
    rows = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    assert all(set(r["met"]) == {"policy", "baseline", "base"} for r in rows)
    base_met = sum(r["met"]["base"] for r in rows) / len(rows)
    assert base_met == pytest.approx(rates["base"])


def _pipeline_files(tmp_path) -> list[str]:
    return [
        "--demonstrations",
        write_jsonl(tmp_path / "demos.jsonl", DEMOS),
        "--prompts",
        write_jsonl(tmp_path / "prompts.jsonl", PROMPTS),
        "--eval_prompts",
        write_jsonl(tmp_path / "eval.jsonl", PROMPTS[:4]),
    ]


def _config(tmp_path, model: str) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"model: {model}\nseed: 3\nsample:\n  k: 3\n  sampling:\n    max_new_tokens: 6\nlabel:\n  noise: 0.1\n"
        "sft:\n  max_steps: 2\n  batch_size: 2\nreward:\n  epochs: 1\n  batch_size: 4\n  eval_fraction: 0.25\n"
        "ppo:\n  max_steps: 2\n  batch_size: 4\n  sampling:\n    max_new_tokens: 6\n  save_every: 0\n"
        "eval:\n  sampling:\n    max_new_tokens: 6\n"
    )
    return str(path)


def _figures(out) -> dict:
    state = json.loads((out / "pipeline.json").read_text())
    drop = ("timing/", "tokens_per_s", "seconds")
    return {
        stage: {k: v for k, v in record.items() if not k.startswith(drop) and not k.endswith(drop)}
        for stage, record in state["stages"].items()
    }


def test_pipeline_twice_with_one_seed_gives_the_same_numbers(tiny_model, tmp_path):
    files, cfg = _pipeline_files(tmp_path), _config(tmp_path, tiny_model)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = chatrlhf("pipeline", "--config", cfg, *files, "--output_dir", str(out), "--iterations", "2")
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = _figures(outs[0]), _figures(outs[1])
    assert list(first) == [
        "sft", "iter1/sample", "iter1/label", "iter1/rm", "iter1/ppo",
        "iter2/sample", "iter2/label", "iter2/rm", "iter2/ppo", "eval",
    ]  # fmt: skip
    first["iter1/sample"].pop("model"), second["iter1/sample"].pop("model")
    first["iter2/sample"].pop("model"), second["iter2/sample"].pop("model")
    assert first == second
    run = json.loads((outs[0] / "iter2" / "ppo" / "run.json").read_text())
    assert run["lineage"]["reference"] == str(outs[0] / "sft")  # KL to the SFT model, not to iteration 1
    assert run["lineage"]["parent"] == str(outs[0] / "iter1" / "ppo")
    report = (outs[0] / "report.md").read_text()
    assert "iteration 2: reward model" in report and "![PPO, iteration 2](iter2/ppo/ppo_curves.png)" in report
    assert report.index("![base -> SFT -> PPO](success_by_model.png)") < report.index("## Stages")
    assert (outs[0] / "success_by_model.png").stat().st_size > 0
    assert set(first["eval"]["success_rate"]) == {"policy", "baseline", "base"}


@pytest.mark.parametrize("optimizer", ["dpo", "grpo"])
def test_pipeline_runs_each_optimizer_from_the_same_sft_model_and_rankings(tiny_model, tmp_path, optimizer):
    files, cfg = _pipeline_files(tmp_path), _config(tmp_path, tiny_model)
    out = tmp_path / optimizer
    extra = ["--dpo.max_steps", "2", "--dpo.batch_size", "2"] if optimizer == "dpo" else []
    result = chatrlhf(
        "pipeline", "--config", cfg, *files, "--output_dir", str(out), "--optimizer", optimizer, *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stages = list(_figures(out))
    if optimizer == "dpo":
        assert stages == ["sft", "iter1/sample", "iter1/label", "iter1/dpo", "eval"]
        run = json.loads((out / "iter1" / "dpo" / "run.json").read_text())
        assert run["lineage"]["reference"] == str(out / "sft")
        assert run["config"]["data"]["train"] == str(out / "iter1" / "rankings.jsonl")
        report = (out / "report.md").read_text()
        assert "sample -> rank -> DPO" in report and "iteration 1: DPO | held-out implicit-reward" in report
    else:
        assert stages == ["sft", "iter1/sample", "iter1/label", "iter1/rm", "iter1/ppo", "eval"]
        run = json.loads((out / "iter1" / "ppo" / "run.json").read_text())
        assert run["config"]["advantage_estimator"] == "grpo" and run["config"]["samples_per_prompt"] == 4
        assert not (out / "iter1" / "ppo" / "value").exists()
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluated["config"]["policy"] == str(out / "iter1" / optimizer.replace("grpo", "ppo"))


def test_compare_runs_every_optimiser_from_the_same_sft_model_and_rankings(tiny_model, tmp_path):
    from rich.console import Console

    from chatrlhf import compare
    from chatrlhf.configs import PipelineConfig, load_config

    files, cfg_path = _pipeline_files(tmp_path), _config(tmp_path, tiny_model)
    out = tmp_path / "run"
    flags = [
        *files,
        "--output_dir",
        str(out),
        "--ppo.advantage_estimator",
        "rloo",
        "--ppo.samples_per_prompt",
        "2",
    ]
    result = chatrlhf("pipeline", "--config", cfg_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(PipelineConfig, cfg_path, flags)
    rows = compare.run(cfg, Console())["compare"]
    assert [r["optimizer"] for r in rows] == list(compare.ARMS)
    assert rows[0]["policy"] == str(out / "iter1" / "ppo")  # the demo's own first round, not trained again
    for r in rows:
        lo, hi = r["success_ci"]
        assert 0 <= lo <= r["success"] <= hi <= 1 and r["train_seconds"] > 0 and r["kl"] == r["kl"]
        assert r["sft_success"] == rows[0]["sft_success"]  # one SFT model, one held-out set
    grpo = json.loads((out / "compare" / "grpo" / "run.json").read_text())
    assert grpo["config"]["advantage_estimator"] == "grpo"
    assert grpo["lineage"]["reward_model"] == str(out / "iter1" / "rm")
    verifier = json.loads((out / "compare" / "grpo_from_the_judge" / "run.json").read_text())
    assert verifier["config"]["reward"] == "judge" and verifier["lineage"]["reward_model"] == "judge rule"
    for folder, form in (("dpo", "off"), ("dpo_plackett-luce", "plackett_luce"), ("dpo_lipo-lambda", "lipo")):
        run = json.loads((out / "compare" / folder / "run.json").read_text())
        assert run["config"]["listwise"] == form and run["lineage"]["reference"] == str(out / "sft")
        assert run["config"]["data"]["train"] == str(out / "iter1" / "rankings.jsonl")
    report = (out / "report.md").read_text()
    assert report.count("## Optimisers compared") == 1 and "| DPO, LiPO-λ |" in report
    assert (out / "compare" / "compare.png").stat().st_size > 0
    written = (out / "compare" / "dpo" / "run.json").stat().st_mtime
    assert compare.run(cfg, Console())["compare"] == rows  # finished arms are read back
    assert (out / "compare" / "dpo" / "run.json").stat().st_mtime == written
    assert (out / "report.md").read_text().count("## Optimisers compared") == 1


def test_pipeline_waits_for_people_then_resumes_without_redoing_stages(tiny_model, tmp_path):
    files, cfg = _pipeline_files(tmp_path), _config(tmp_path, tiny_model)
    out = tmp_path / "run"
    args = ["pipeline", "--config", cfg, *files, "--output_dir", str(out), "--labeler", "human"]
    result = chatrlhf(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chatrlhf label serve --db" in result.stdout and "--resume true" in result.stdout
    assert list(_figures(out)) == ["sft", "iter1/sample"]
    sft_written = (out / "sft" / "run.json").stat().st_mtime_ns

    again = chatrlhf(*args)
    assert (
        again.returncode == 2 and "--resume true" in again.stderr
    )  # a finished stage is never silently redone

    result = chatrlhf(*args, "--resume", "true")  # nobody has ranked yet: still waiting
    assert result.returncode == 0 and "waiting for rankings" in result.stdout

    # stopped after the tasks reached the database, before the stage was recorded: none are added twice
    state = json.loads((out / "pipeline.json").read_text())
    del state["stages"]["iter1/sample"]
    (out / "pipeline.json").write_text(json.dumps(state))
    result = chatrlhf(*args, "--resume", "true")
    assert result.returncode == 0 and "8 ranking tasks of iteration 1 already in" in result.stdout
    assert len(Store(str(out / "labels.db")).task_ids(iteration=1)) == 8

    # people rank (a simulated labeler stands in), then the run continues from where it stopped
    ranked = chatrlhf("label", "auto", "--db", str(out / "labels.db"), "--judge", "rule", "--noise", "0.1")
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    result = chatrlhf(*args, "--resume", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sft: finished earlier, skipped" in result.stdout
    assert list(_figures(out))[-1] == "eval" and (out / "report.md").is_file()
    assert (out / "sft" / "run.json").stat().st_mtime_ns == sft_written

    # stopped during PPO: its record is gone; --resume redoes PPO and what follows, nothing before
    state = json.loads((out / "pipeline.json").read_text())
    del state["stages"]["iter1/ppo"], state["stages"]["eval"]
    (out / "pipeline.json").write_text(json.dumps(state))
    rm_written = (out / "iter1" / "rm" / "run.json").stat().st_mtime_ns
    result = chatrlhf(*args, "--resume", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter1/rm: finished earlier, skipped" in result.stdout
    assert (out / "iter1" / "rm" / "run.json").stat().st_mtime_ns == rm_written
    assert list(_figures(out))[-2:] == ["iter1/ppo", "eval"]


def test_pipeline_refuses_a_judge_reward_in_its_ppo_section(tiny_model, tmp_path):
    files, cfg = _pipeline_files(tmp_path), _config(tmp_path, tiny_model)
    result = chatrlhf(
        "pipeline", "--config", cfg, *files, "--output_dir", str(tmp_path / "o"), "--ppo.reward", "judge"
    )
    assert result.returncode == 2 and "`ppo.reward: judge` would leave" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_pipeline_refuses_missing_files(tmp_path):
    result = chatrlhf("pipeline", "--output_dir", str(tmp_path / "x"), "--demonstrations", "nope.jsonl")
    assert result.returncode == 2 and "no such file: nope.jsonl" in result.stderr
    assert not (tmp_path / "x").exists()


def test_ranking_tasks_written_ahead_join_the_first_round(tiny_model, tmp_path):
    files, cfg = _pipeline_files(tmp_path), _config(tmp_path, tiny_model)
    written = [
        {"prompt": "Describe tea in at most 5 words.", "answers": ["tea is warm.", "Tea, a drink I like a lot."],
         "topic": "tea"},
        {"prompt": "Describe rain as 2 bullet points.", "answers": ["* wet\n* cold", "rain", "* wet"]},
    ]  # fmt: skip
    tasks = write_jsonl(tmp_path / "tasks.jsonl", written)
    out = tmp_path / "run"
    args = ["pipeline", "--config", cfg, *files, "--output_dir", str(out), "--labeler", "human"]
    result = chatrlhf(*args, "--ranking_tasks", tasks)
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(str(out / "labels.db"))
    assert len(store.task_ids(iteration=1)) == 8 + 2  # sampled ones and those written ahead, ranked together
    ahead = store.task_ids(source=tasks)
    assert len(ahead) == 2 and store.task_ids(source=tasks, topic="tea") == ahead[:1]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Hi.", "answers": "hello"}, "tasks.jsonl:2: field 'answers': expected a list"),
        (
            {"prompt": "Hi.", "answers": ["hello"]},
            "tasks.jsonl:2: field 'answers': expected two or more distinct",
        ),
        (
            {"prompt": "Hi.", "answers": ["a", "a"]},
            "tasks.jsonl:2: field 'answers': expected two or more distinct",
        ),
        (
            {"prompt": "Hi.", "answers": ["a", ""]},
            "tasks.jsonl:2: field 'answers': expected a list of non-empty",
        ),
        ({"answers": ["a", "b"]}, "tasks.jsonl:2"),
    ],
)
def test_a_bad_ranking_tasks_file_stops_the_pipeline_before_anything_is_written(tmp_path, record, message):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Hi.", "answers": ["a", "b"]}, record])
    out = tmp_path / "x"
    result = chatrlhf(
        "pipeline", *_pipeline_files(tmp_path), "--output_dir", str(out), "--ranking_tasks", tasks
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()
