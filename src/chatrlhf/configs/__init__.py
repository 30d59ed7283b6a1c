"""Every command's configuration: the YAML schema and the command line of each stage.

A config is a dataclass whose fields are the keys (nested dataclasses are nested mappings); `loader` reads them
from YAML and `--dotted.key value` overrides, `choices` holds the closed choices as enums, `stages`, `loop` and
`serving` the dataclasses. Only the standard library and PyYAML are imported here, so the pipeline, the demo and
`chatrlhf --help` import these without loading any stage (or torch).

    shared          PromptData, TextData, RankingData, DemoData, SamplingConfig, LoraConfig, TrainConfig,
                    SupervisedConfig
    stages          SFTConfig, PretrainConfig, RewardConfig, ScoreConfig, PPOConfig, DPOConfig
    loop            SampleConfig, LabelAutoConfig, EvalConfig, IFEvalConfig, PipelineConfig, DemoConfig
    serving         ChatConfig, ServeConfig, LabelServeConfig, LabelerAddConfig, LabelExportConfig
"""

from chatrlhf.configs.choices import (
    AdvantageEstimator,
    Benchmark,
    Choice,
    DemoFormat,
    DemoTask,
    DPOLoss,
    Dtype,
    JudgeName,
    KLEstimator,
    Labeler,
    Listwise,
    LogprobsFrom,
    LossWeighting,
    LRScheduler,
    OnInvalid,
    Optimizer,
    RankingFormat,
    ReportSink,
    RewardSource,
    Verifier,
)
from chatrlhf.configs.loader import ConfigError, field_help, from_dict, load_config, save_config, to_dict
from chatrlhf.configs.loop import (
    DemoConfig,
    EvalConfig,
    IFEvalConfig,
    LabelAutoConfig,
    PipelineConfig,
    SampleConfig,
)
from chatrlhf.configs.serving import (
    ChatConfig,
    LabelerAddConfig,
    LabelExportConfig,
    LabelServeConfig,
    ServeConfig,
)
from chatrlhf.configs.stages import (
    DemoData,
    DPOConfig,
    LoraConfig,
    PPOConfig,
    PretrainConfig,
    PromptData,
    RankingData,
    RewardConfig,
    SamplingConfig,
    ScoreConfig,
    SFTConfig,
    SupervisedConfig,
    TextData,
    TrainConfig,
)

__all__ = [
    "AdvantageEstimator",
    "Benchmark",
    "ChatConfig",
    "Choice",
    "ConfigError",
    "DemoConfig",
    "DemoData",
    "DemoFormat",
    "DPOConfig",
    "DPOLoss",
    "DemoTask",
    "Dtype",
    "EvalConfig",
    "IFEvalConfig",
    "JudgeName",
    "KLEstimator",
    "LRScheduler",
    "Listwise",
    "LabelAutoConfig",
    "LabelExportConfig",
    "LabelServeConfig",
    "Labeler",
    "LabelerAddConfig",
    "LogprobsFrom",
    "LoraConfig",
    "LossWeighting",
    "OnInvalid",
    "Optimizer",
    "PPOConfig",
    "PipelineConfig",
    "PretrainConfig",
    "PromptData",
    "RankingData",
    "RankingFormat",
    "ReportSink",
    "RewardSource",
    "RewardConfig",
    "SFTConfig",
    "SampleConfig",
    "SamplingConfig",
    "ScoreConfig",
    "ServeConfig",
    "SupervisedConfig",
    "TextData",
    "TrainConfig",
    "Verifier",
    "field_help",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
