"""The configs of the commands that serve: terminal chat, the OpenAI-compatible server, the ranking app."""

from __future__ import annotations

from dataclasses import dataclass

from chatrlhf.configs.loader import help_field
from chatrlhf.configs.stages import DB_HELP, SamplingConfig


@dataclass
class ChatConfig:
    model: str = help_field("", "checkpoint to chat with; empty for the default model")
    system: str = help_field("", "system prompt (empty: the chat template's default)")
    sampling: SamplingConfig = help_field(
        SamplingConfig(max_new_tokens=256, temperature=0.7), "how answers are drawn"
    )


@dataclass
class ServeConfig:
    model: str = help_field("", "checkpoint to serve (path or hub id); empty for the default model")
    host: str = help_field("127.0.0.1", "address to listen on")
    port: int = help_field(8000, "port to listen on")
    api_key: str = help_field("", "require `Authorization: Bearer KEY` on /v1 routes; empty: no key")
    served_name: str = help_field("", "model id clients use; empty: the checkpoint folder's name")
    max_batch: int = help_field(8, "most answers generated together")
    max_tokens: int = help_field(1024, "largest max_tokens a request may ask for")
    max_prompt_tokens: int = help_field(4096, "longest prompt accepted")
    system_prompt: str = help_field("", "system turn for conversations that have none")


@dataclass
class LabelServeConfig:
    db: str = help_field("labels.db", DB_HELP)
    host: str = help_field("127.0.0.1", "address to listen on (0.0.0.0 for labelers on other machines)")
    port: int = help_field(8100, "port to listen on")


@dataclass
class LabelerAddConfig:
    name: str = help_field("", "the new labeler's name (unique)")
    db: str = help_field("labels.db", DB_HELP)
    admin: bool = help_field(False, "may see progress and agreement, add labelers and export")


@dataclass
class LabelExportConfig:
    db: str = help_field("labels.db", DB_HELP)
    out: str = help_field("rankings.jsonl", "JSONL file to write, in the reward stage's rankings format")
    per_labeler: bool = help_field(
        False, "one record per submission instead of ranks aggregated across labelers"
    )
    min_labels: int = help_field(1, "leave out tasks ranked by fewer labelers than this")
