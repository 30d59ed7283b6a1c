"""The dataclasses of every command's config: shared sections first, then the stages, then the commands
around them. Each key is read by the command that accepts it; `tests/test_structure.py` checks that."""

from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.configs.choices import (
    AdvantageEstimator,
    Benchmark,
    DemoFormat,
    DemoTask,
    Dtype,
    JudgeName,
    KLEstimator,
    Labeler,
    LogprobsFrom,
    LossWeighting,
    LRScheduler,
    OnInvalid,
    RankingFormat,
    ReportSink,
)
from chatrlhf.configs.loader import help_field

DB_HELP = "labeling database: a SQLite file (path or sqlite:///x.db) or postgresql://user@host:port/db"


# --------------------------------------------------------------------------------------------------
# shared by every training stage


@dataclass
class PromptData:
    """The data keys every training stage reads."""

    train: str = help_field("", "training data: a .jsonl/.json/.parquet/.txt file or a `datasets` hub name")
    on_invalid: OnInvalid = help_field(
        OnInvalid.stop,
        "a record that fails validation: stop (naming file, line and field) | skip (leave it out, count it, "
        "record why in run.json)",
    )
    shuffle: bool = help_field(True, "shuffle the training samples every epoch (seeded)")
    system_prompt: str = help_field(
        "", "system turn added to conversations that have none (empty: the chat template's own default)"
    )


@dataclass
class TextData:
    """Raw text for pretraining: no conversations, so no format, system prompt or truncation."""

    train: str = help_field("", "training text: a .txt file, or JSONL/Parquet with a `text` field")
    eval: str = help_field("", "held-out text in the same format (optional)")
    max_length: int = help_field(1024, "tokens per packed row")
    on_invalid: OnInvalid = help_field(
        OnInvalid.stop, "a record that fails validation: stop (naming file, line and field) | skip"
    )
    shuffle: bool = help_field(True, "shuffle the rows every epoch (seeded)")


@dataclass
class RankingData(PromptData):
    """Rankings, pairs, HH text or OpenAssistant trees for the reward model."""

    eval: str = help_field("", "held-out data in the same format (optional)")
    format: RankingFormat = help_field(
        RankingFormat.auto, "record format (auto looks at the fields: rankings, pairs, HH text; oasst: trees)"
    )
    max_length: int = help_field(1024, "maximum tokens of one rendered sample")
    truncation: bool = help_field(
        False, "leave out samples longer than max_length instead of stopping with an error"
    )


@dataclass
class DemoData(PromptData):
    """Demonstrations for SFT."""

    eval: str = help_field("", "held-out data in the same format (optional)")
    format: DemoFormat = help_field(DemoFormat.auto, "record format (auto looks at the fields)")
    max_length: int = help_field(1024, "maximum tokens of one rendered sample")
    truncation: bool = help_field(
        False, "cut samples longer than max_length instead of stopping with an error"
    )
    packing: bool = help_field(False, "pack several short samples into one row of max_length tokens")


@dataclass
class SamplingConfig:
    """How answers are drawn: the one sampling block of every command that generates."""

    max_new_tokens: int = help_field(128, "longest answer in tokens")
    temperature: float = help_field(0.0, "sampling temperature; 0 is greedy")
    top_p: float = help_field(1.0, "nucleus sampling threshold")
    top_k: int = help_field(0, "sample among the k most likely tokens; 0 is off")
    min_new_tokens: int = help_field(0, "EOS is suppressed until an answer has this many tokens")


@dataclass
class LoraConfig:
    rank: int = help_field(0, "LoRA rank; 0 means LoRA is off and all weights train")
    alpha: float = help_field(16.0, "LoRA scaling alpha")
    dropout: float = help_field(0.0, "dropout on the LoRA input")
    targets: list[str] = help_field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "names of the linear modules that get adapters",
    )
    layers: int = help_field(
        0, "adapters only in the last N transformer layers, so backward stops below them; 0 means every layer"
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class TrainConfig:
    """Keys every training stage reads (pretraining, SFT, the reward model, PPO); each stage adds its own
    `data` section."""

    model: str = help_field(
        "", "hub id or local path of the starting model; empty for the default SmolLM2-135M-Instruct"
    )
    output_dir: str = help_field("runs/sft", "where the checkpoint, metrics and plots go")
    max_steps: int = help_field(0, "optimizer steps; 0 means run `epochs` over the data")
    epochs: float = help_field(1.0, "passes over the training data when max_steps is 0")
    batch_size: int = help_field(8, "samples per forward pass (per process)")
    lr: float = help_field(2e-5, "peak learning rate")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    warmup_ratio: float = help_field(0.03, "fraction of the steps with linear warmup before the cosine decay")
    lr_scheduler: LRScheduler = help_field(LRScheduler.cosine, "learning-rate decay after warmup")
    min_lr_ratio: float = help_field(0.0, "final learning rate as a fraction of lr (cosine)")
    max_grad_norm: float = help_field(1.0, "gradient clipping norm; 0 turns clipping off")
    seed: int = help_field(1234, "random seed of data order and initialisation")
    dtype: Dtype = help_field(
        Dtype.auto, "auto: bf16 on CUDA, and on a CPU where a timed matmul shows it faster than fp32"
    )
    lora: LoraConfig = help_field(LoraConfig(), "LoRA adapters (peft); rank 0 is off")
    freeze_layers: int = help_field(
        0,
        "full fine-tuning with the token embeddings and the first N transformer layers frozen (0: none); "
        "backward stops above them, and PPO runs shared frozen layers once per batch",
    )
    resume: bool = help_field(False, "continue from the last complete checkpoint in output_dir")
    save_every: int = help_field(100, "steps between resumable checkpoints; 0 saves only at the end")
    keep_checkpoints: int = help_field(2, "resumable checkpoints kept on disk")
    log_every: int = help_field(1, "steps between metric lines")
    report_to: list[ReportSink] = help_field([], "extra metric sinks (metrics.jsonl is always written)")
    overwrite: bool = help_field(False, "replace a finished run in output_dir instead of stopping")


@dataclass
class SupervisedConfig(TrainConfig):
    """Keys of the stages that fit a loss over a dataset (pretraining, SFT, the reward model)."""

    grad_accum: int = help_field(1, "forward passes accumulated into one optimizer step")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward to save memory")
    eval_every: int = help_field(0, "steps between evaluations on data.eval; 0 evaluates only at the end")


# --------------------------------------------------------------------------------------------------
# the training stages


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning on demonstrations: loss on assistant tokens only."""

    data: DemoData = help_field(DemoData(), "demonstrations")


@dataclass
class PretrainConfig(SupervisedConfig):
    """Causal-LM training on raw text (stage 0), packed into rows of data.max_length."""

    data: TextData = help_field(TextData(), "raw text")
    output_dir: str = help_field("runs/pretrain", "where the checkpoint, metrics and plots go")
    lr: float = help_field(5e-5, "peak learning rate")


@dataclass
class RewardConfig(SupervisedConfig):
    """Reward model from rankings, pairs, Anthropic HH text or OpenAssistant trees."""

    data: RankingData = help_field(RankingData(), "rankings or pairs")
    output_dir: str = help_field("runs/reward", "where the reward model, metrics and plots go")
    batch_size: int = help_field(
        1,
        "prompts (each with all its K answers) per forward pass; 1 gives small data the most optimizer "
        "steps (measured on real rankings: docs/stages.md)",
    )
    lr: float = help_field(1e-5, "peak learning rate")
    epochs: float = help_field(1.0, "passes over the rankings; more than one overfits (InstructGPT)")
    eval_fraction: float = help_field(0.1, "share of prompts held out for accuracy when data.eval is empty")
    pairs_as_independent: bool = help_field(
        False, "train on shuffled single pairs instead of one batch element per prompt (for comparison)"
    )
    share_prompt: bool = help_field(
        True,
        "pack a prompt and its K answers into one row, so the prompt is forwarded once and nothing is padded",
    )
    loss_weighting: LossWeighting = help_field(
        LossWeighting.prompt,
        "prompt: every prompt weighs the same, whatever its K | pair: every comparison weighs the same, a prompt "
        "with K answers C(K,2) times (as TRL weighs pairs)",
    )
    normalize_with: str = help_field(
        "", "demonstrations file: after training, add a bias so their answers score mean 0 (InstructGPT)"
    )


@dataclass
class ScoreConfig:
    model: str = help_field("", "reward model checkpoint (output_dir of `chatrlhf reward`)")
    data: str = help_field("", "rankings or pairs file whose answers are scored")
    prompt: str = help_field("", "a single prompt to score (with --response)")
    response: list[str] = help_field([], "answers to --prompt (repeat the flag for several)")
    batch_size: int = help_field(8, "sequences per forward pass")
    max_length: int = help_field(2048, "longest sequence scored")


@dataclass
class PPOConfig(TrainConfig):
    """PPO against a reward model; `data.train` is the prompts file, `max_steps` counts PPO steps."""

    data: PromptData = help_field(PromptData(), "prompts: {'prompt': str | messages} or {'messages': [...]}")
    output_dir: str = help_field("runs/ppo", "where the policy, value model, metrics and plots go")
    reward_model: str = help_field("", "reward model checkpoint (output_dir of `chatrlhf reward`)")
    value_model: str = help_field(
        "", "checkpoint the separate value model starts from; empty: the reward model (InstructGPT)"
    )
    value_on_policy: bool = help_field(
        False,
        "no separate value model: a scalar head on the policy's last hidden state, trained with it in one "
        "backward (about half the update's cost)",
    )
    reference_model: str = help_field(
        "",
        "frozen model of the KL penalty; empty: the starting policy (set it to the SFT model when PPO "
        "continues from an earlier PPO policy)",
    )
    batch_size: int = help_field(8, "prompts per PPO step")
    share_trunk: bool = help_field(
        True,
        "run the layers the policy shares with the reference once per batch, for the reference, every "
        "update pass, and a value or reward model whose bottom is the same weights: the layers below LoRA "
        "in the last lora.layers, or the freeze_layers frozen ones",
    )
    samples_per_prompt: int = help_field(
        1, "answers drawn per prompt; a step has batch_size x samples_per_prompt rollouts"
    )
    advantage_estimator: AdvantageEstimator = help_field(
        AdvantageEstimator.gae,
        "gae: a value model and GAE (InstructGPT) | rloo: each answer's return minus the mean return of "
        "the other answers to its prompt, no value model (needs samples_per_prompt >= 2)",
    )
    lr: float = help_field(3e-6, "peak learning rate of policy and value")
    warmup_ratio: float = help_field(0.0, "fraction of the steps with linear warmup")
    lr_scheduler: LRScheduler = help_field(LRScheduler.linear, "learning-rate decay")
    save_every: int = help_field(20, "PPO steps between resumable checkpoints; 0 saves only at the end")
    max_prompt_length: int = help_field(512, "longest prompt in tokens; a longer one stops the run")
    sampling: SamplingConfig = help_field(
        SamplingConfig(max_new_tokens=64, temperature=1.0),
        "how rollouts are drawn; the temperature also scales the log-probs PPO recomputes",
    )
    ppo_epochs: int = help_field(4, "passes over each batch of rollouts")
    minibatches: int = help_field(1, "optimizer steps per pass over the rollouts")
    clip_range: float = help_field(0.2, "PPO ratio clip")
    value_clip: float = help_field(0.2, "value-function clip around the rollout values")
    vf_coef: float = help_field(0.1, "weight of the value loss")
    gamma: float = help_field(1.0, "discount")
    lam: float = help_field(0.95, "GAE lambda")
    kl_coef: float = help_field(0.02, "beta, the per-token KL penalty weight (InstructGPT 0.02)")
    kl_estimator: KLEstimator = help_field(KLEstimator.k1, "per-token KL estimator")
    logprobs_from: LogprobsFrom = help_field(
        LogprobsFrom.rollout,
        "where the PPO ratio's old log-probs and the KL's policy side come from: rollout (decoding's own, "
        "free) | forward (a forward of the policy over the finished rollouts, the same computation as the "
        "reference's and the update's; under bf16 decoding rounds differently)",
    )
    target_kl: float = help_field(0.0, "adaptive beta toward this KL per answer (0 keeps beta fixed)")
    kl_horizon: int = help_field(10000, "horizon of the adaptive KL controller, in episodes")
    missing_eos_penalty: float = help_field(0.0, "subtracted from the score of answers cut at max_new_tokens")
    reward_clip: float = help_field(0.0, "clip scores to [-c, c]; 0 is off")
    whiten_rewards: bool = help_field(False, "whiten per-token rewards within the batch")
    whiten_advantages: bool = help_field(True, "whiten advantages within the batch")
    ptx_coef: float = help_field(0.0, "PPO-ptx: weight of the pretraining loss (InstructGPT 27.8)")
    ptx_data: str = help_field("", "PPO-ptx text: {'text'} JSONL or .txt")
    ptx_batch_size: int = help_field(4, "pretraining rows per optimizer step")
    ptx_max_length: int = help_field(256, "tokens per pretraining row")
    ema_decay: float = help_field(
        0.0, "exponential moving average of the policy weights, exported instead; 0 is off"
    )
    sample_every: int = help_field(10, "steps between sample tables (samples.jsonl)")


# --------------------------------------------------------------------------------------------------
# sampling, labeling, evaluation and the whole loop


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
    seed: int = help_field(1234, "random seed")
    resume: bool = help_field(False, "continue an interrupted demo in output_dir")
