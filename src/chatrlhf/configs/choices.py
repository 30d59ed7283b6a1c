"""The closed choices of config keys, as enums: the loader accepts only their values and `--help` lists them.

Each member is also its value as a string (`Dtype.bf16 == "bf16"`), so code compares with plain strings and
the resolved config saves as plain JSON.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class Dtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


class LRScheduler(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OnInvalid(Choice):
    stop = "stop"
    skip = "skip"


class DemoFormat(Choice):
    auto = "auto"
    messages = "messages"
    prompt_completion = "prompt_completion"
    oasst = "oasst"


class RankingFormat(Choice):
    auto = "auto"
    oasst = "oasst"


class ReportSink(Choice):
    tensorboard = "tensorboard"
    wandb = "wandb"


class LossWeighting(Choice):
    prompt = "prompt"
    pair = "pair"


class AdvantageEstimator(Choice):
    gae = "gae"
    rloo = "rloo"
    grpo = "grpo"


class Optimizer(Choice):
    ppo = "ppo"
    grpo = "grpo"
    rloo = "rloo"
    dpo = "dpo"


class RewardSource(Choice):
    model = "model"
    judge = "judge"


class Verifier(Choice):
    rule = "rule"
    reference = "reference"
    ifeval = "ifeval"


class DPOLoss(Choice):
    sigmoid = "sigmoid"
    ipo = "ipo"


class Listwise(Choice):
    off = "off"
    plackett_luce = "plackett_luce"
    lipo = "lipo"


class KLEstimator(Choice):
    k1 = "k1"
    k3 = "k3"


class LogprobsFrom(Choice):
    rollout = "rollout"
    forward = "forward"


class JudgeName(Choice):
    rule = "rule"
    reference = "reference"
    ifeval = "ifeval"
    rm = "rm"
    llm = "llm"


class Benchmark(Choice):
    ifeval = "ifeval"


class DemoTask(Choice):
    constraints = "constraints"
    ifeval = "ifeval"


class Labeler(Choice):
    auto = "auto"
    human = "human"
