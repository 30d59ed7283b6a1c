"""The dataclasses of every command's config: shared sections first, then the stages, then the commands
around them. Each key is read by the command that accepts it; `tests/test_structure.py` checks that."""

from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.configs.choices import (
    AdvantageEstimator,
    DemoFormat,
    DPOLoss,
    Dtype,
    KLEstimator,
    Listwise,
    LogprobsFrom,
    LossWeighting,
    LRScheduler,
    OnInvalid,
    RankingFormat,
    ReportSink,
    RewardSource,
    Verifier,
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
class DPOConfig(SupervisedConfig):
    """DPO and its listwise forms from rankings, pairs, HH text or OpenAssistant trees, no reward model."""

    data: RankingData = help_field(RankingData(), "rankings or pairs (the reward stage's formats)")
    output_dir: str = help_field("runs/dpo", "where the policy, metrics and plots go")
    reference_model: str = help_field(
        "", "model of log pi_ref, computed once before training; empty: the starting model"
    )
    batch_size: int = help_field(4, "prompts (each with all its K answers) per forward pass")
    lr: float = help_field(1e-6, "peak learning rate")
    beta: float = help_field(0.1, "weight of the log-ratio to the reference in the implicit reward")
    loss: DPOLoss = help_field(
        DPOLoss.sigmoid, "sigmoid: -log sigmoid(beta margin) (DPO) | ipo: (margin - 1/(2 beta))^2 (IPO)"
    )
    listwise: Listwise = help_field(
        Listwise.off,
        "off: a prompt's ranked pairs | plackett_luce: the likelihood of its whole ranking (needs loss "
        "sigmoid) | lipo: its pairs weighted by LiPO-lambda's rank and score gaps",
    )
    eval_fraction: float = help_field(0.1, "share of prompts held out for accuracy when data.eval is empty")
    share_prompt: bool = help_field(
        True, "pack a prompt and its K answers into one row, so the prompt is forwarded once"
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
    reward: RewardSource = help_field(
        RewardSource.model,
        "model: the reward model's score (RLHF) | judge: the `judge`'s score (RL from a verifier)",
    )
    reward_model: str = help_field("", "reward model checkpoint (output_dir of `chatrlhf reward`)")
    judge: Verifier = help_field(
        Verifier.rule,
        "reward: judge scores each rollout with: rule (the constraints a prompt states or its record lists, "
        "IFEval's instructions by lm-eval's checkers included) | ifeval (share of a record's IFEval "
        "instructions followed) | reference (the record's `answer` or `reference`)",
    )
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
        "the other answers to its prompt | grpo: that return minus its prompt's mean, over their standard "
        "deviation; rloo and grpo use no value model and need samples_per_prompt >= 2",
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
