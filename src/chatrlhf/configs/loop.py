"""The dataclasses of the commands around the training stages: sampling answers for ranking, the simulated
labelers, evaluation, the IFEval benchmark, and the whole loop (`pipeline`, `demo`)."""

from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.configs.choices import Benchmark, DemoTask, Dtype, JudgeName, Labeler, Optimizer
from chatrlhf.configs.loader import help_field
from chatrlhf.configs.stages import DPOConfig, PPOConfig, RewardConfig, SamplingConfig, SFTConfig


@dataclass
class SampleConfig:
    prompts: str = help_field("", "prompts file: {'prompt': str | messages} or {'messages': [...]} per line")
    k: int = help_field(4, "answers per prompt (K)")
    db: str = help_field("labels.db", "labeling database: a SQLite file or a postgresql:// URL")
    model: str = help_field("", "model to sample from; empty for the default SmolLM2-135M-Instruct")
    sampling: SamplingConfig = help_field(
        SamplingConfig(temperature=1.0), "how answers are drawn (InstructGPT samples at temperature 1)"
    )
    labels_per_task: int = help_field(1, "distinct labelers wanted for each task")
    batch_prompts: int = help_field(8, "prompts per generation batch (each gives K rows)")
    max_tries: int = help_field(4, "rounds of redrawing answers that repeat another")
    system_prompt: str = help_field("", "system turn added before each prompt that has none")
    seed: int = help_field(0, "random seed")


@dataclass
class LabelAutoConfig:
    db: str = help_field("labels.db", "labeling database: a SQLite file or a postgresql:// URL")
    judge: JudgeName = help_field(JudgeName.rule, "the judge that scores answers")
    noise: float = help_field(0.0, "std of the Gaussian noise added to judge scores (0: deterministic)")
    tie_margin: float = help_field(
        0.0, 'answers whose noisy scores are within this of the next better one tie ("equally good")'
    )
    labelers: int = help_field(0, "simulated labelers; 0 for as many as the tasks want (labels_per_task)")
    judge_model: str = help_field("", "rm: the reward model checkpoint; llm: the model name at the endpoint")
    llm_base_url: str = help_field("", "llm: OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    llm_api_key: str = help_field("", "llm: API key (default: $OPENAI_API_KEY)")
    seed: int = help_field(0, "random seed of the labelers' noise")


@dataclass
class EvalConfig:
    policy: str = help_field("", "the model being evaluated (a checkpoint folder or hub id)")
    baseline: str = help_field("", "the model it is compared with, e.g. the SFT checkpoint")
    base: str = help_field(
        "", "the starting model before SFT, whose answers are scored too (optional; 'default' for SmolLM2)"
    )
    prompts: str = help_field("", "held-out prompts file (extra fields such as `reference` reach the judge)")
    judge: JudgeName | None = help_field(
        None, "empty: rule (in a pipeline: the simulated labeler's `label.judge`)"
    )
    judge_model: str = help_field("", "rm: the gold reward model; llm: the model name at the endpoint")
    llm_base_url: str = help_field("", "llm: OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    llm_api_key: str = help_field("", "llm: API key (default: $OPENAI_API_KEY)")
    reward_model: str = help_field("", "a reward model whose mean scores are reported too (optional)")
    samples: int = help_field(1, "answers per prompt from each model")
    sampling: SamplingConfig = help_field(SamplingConfig(), "how answers are drawn (greedy by default)")
    batch_size: int = help_field(16, "prompts per generation batch")
    seed: int = help_field(0, "random seed (sampling and the bootstrap)")
    output: str = help_field("", "folder for eval.json, eval.md and samples.jsonl; empty only prints")
    show: int = help_field(8, "side-by-side rows in the printed table")


@dataclass
class IFEvalConfig:
    """`chatrlhf eval --benchmark ifeval`: IFEval's prompts answered by a model, scored by lm-eval's checkers."""

    benchmark: Benchmark = help_field(Benchmark.ifeval, "the public benchmark")
    policy: str = help_field(
        "", "the model answering (a checkpoint folder or hub id); empty: the default model"
    )
    baseline: str = help_field("", "a second model answering the same prompts, for the paired difference")
    prompts: str = help_field(
        "google/IFEval", "IFEval-format records (prompt, instruction_id_list, kwargs): a file or hub dataset"
    )
    limit: int = help_field(0, "answer a seeded sample of this many prompts; 0: every prompt")
    sampling: SamplingConfig = help_field(
        SamplingConfig(max_new_tokens=512),
        "greedy as lm-eval decodes; max_new_tokens 512 here, lm-eval's own max_gen_toks is 1280",
    )
    batch_size: int = help_field(
        64, "rows decoding at once (continuous batching: an ended row takes the next prompt)"
    )
    dtype: Dtype = help_field(Dtype.auto, "generation dtype; auto: the faster of bf16 and fp32 as measured")
    seed: int = help_field(0, "seed of the sample (`limit`) and the bootstrap")
    output: str = help_field("", "folder for ifeval.json, ifeval.md and answers.jsonl; empty only prints")
    show: int = help_field(4, "answers shown in the printed and written report")


@dataclass
class PipelineConfig:
    output_dir: str = help_field("runs/pipeline", "where every stage, the labeling DB and report.md go")
    model: str = help_field("", "starting model; empty for the default SmolLM2-135M-Instruct")
    demonstrations: str = help_field("", "SFT demonstrations file")
    prompts: str = help_field("", "prompts to sample answers for ranking and to run PPO on")
    eval_prompts: str = help_field("", "held-out prompts for the final evaluation")
    ranking_tasks: str = help_field(
        "", "JSONL of ranking tasks written ahead (prompt records + `answers`), ranked with round 1's"
    )
    iterations: int = help_field(1, "rounds of sample -> rank -> reward model -> PPO")
    optimizer: Optimizer = help_field(
        Optimizer.ppo,
        "ppo: a reward model, then PPO (InstructGPT) | grpo, rloo: a reward model, then PPO's loop with GRPO's "
        "or RLOO's advantages, no value model (ppo.samples_per_prompt, at least 4) | dpo: DPO on the "
        "rankings, no reward model",
    )
    labeler: Labeler = help_field(
        Labeler.auto, "auto: a simulated labeler with `label.judge` | human: people in the ranking app"
    )
    db: str = help_field("", "labeling database; empty: labels.db in output_dir")
    min_rankings: int = help_field(0, "human labeling: ranked tasks needed to go on; 0: every sampled task")
    seed: int = help_field(1234, "seed of every stage")
    resume: bool = help_field(False, "skip the finished stages of an earlier run in output_dir")
    overwrite: bool = help_field(False, "delete an earlier run in output_dir and start again")
    sample: SampleConfig = help_field(SampleConfig(), "sampling for ranking (prompts, db, model are set)")
    label: LabelAutoConfig = help_field(LabelAutoConfig(), "the simulated labeler: judge, noise (db is set)")
    sft: SFTConfig = help_field(SFTConfig(), "stage 1 settings (model, data.train, output_dir are set)")
    reward: RewardConfig = help_field(RewardConfig(), "stage 2 settings (starts from the SFT model)")
    ppo: PPOConfig = help_field(PPOConfig(), "stage 3 settings (policy, reference, reward model are set)")
    dpo: DPOConfig = help_field(
        DPOConfig(), "optimizer dpo: its settings (policy, reference, rankings are set)"
    )
    eval: EvalConfig = help_field(EvalConfig(), "final evaluation (policy, baseline, prompts are set)")


@dataclass
class DemoConfig:
    output_dir: str = help_field("runs/demo", "where the demo's stages and report go")
    task: DemoTask = help_field(
        DemoTask.constraints,
        "constraints: the built-in constraint task | ifeval: IFEval-format instructions on the demo's own "
        "topics, ending with IFEval itself for the starting, SFT and PPO models",
    )
    model: str = help_field("", "starting model; empty for the default SmolLM2-135M-Instruct")
    iterations: int = help_field(
        2, "rounds of sample -> rank -> reward model -> PPO (the second ranks the first's PPO answers)"
    )
    best_of: int = help_field(
        4, "constraints task: sampled answers per prompt from which a demonstration is picked"
    )
    sft_steps: int = help_field(
        0, "SFT optimizer steps of 4 demonstrations; 0: the task's (constraints 24, ifeval 160: two passes)"
    )
    k: int = help_field(6, "answers per prompt to rank")
    noise: float = help_field(0.05, "the simulated labeler's noise")
    tie_margin: float = help_field(0.1, "the simulated labeler ties answers whose scores differ by less")
    rm_epochs: float = help_field(
        0.0, "reward model passes over the rankings; 0: the task's (constraints 2, ifeval 1)"
    )
    ppo_steps: int = help_field(
        0, "PPO steps per iteration, each 8 prompts x 4 answers; 0: the task's (constraints 35, ifeval 24)"
    )
    max_new_tokens: int = help_field(
        0,
        "longest answer in tokens in training and the held-out eval; 0: the task's (constraints 48, ifeval 160)",
    )
    ifeval_prompts: str = help_field(
        "google/IFEval", "ifeval task: the IFEval-format records scored at the end (a file or hub dataset)"
    )
    ifeval_limit: int = help_field(0, "ifeval task: score a seeded sample of this many of them; 0: all")
    ifeval_max_new_tokens: int = help_field(
        512, "ifeval task: longest IFEval answer, the same for every model"
    )
    compare: bool = help_field(
        False,
        "constraints task: then PPO, GRPO, DPO, Plackett-Luce and LiPO-lambda DPO, one round each from the same "
        "SFT model and rankings, and GRPO rewarded by the judge itself, side by side in compare/ and report.md",
    )
    seed: int = help_field(1234, "random seed")
    resume: bool = help_field(False, "continue an interrupted demo in output_dir")
