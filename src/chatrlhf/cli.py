"""The `chatrlhf` command: one sub-command per stage, each `--config FILE.yaml` plus `--dotted.key value`.

    chatrlhf sft --config sft.yaml --max_steps 20 --data.train demos.jsonl
    chatrlhf pretrain --data.train corpus.txt --output_dir runs/pt
    chatrlhf demo
    chatrlhf label labeler add alice --db labels.db

A command may be several words (`label serve`); each parses its config and calls its stage's `train(cfg)` /
`run(cfg)`. Each sub-command parses its config and calls its stage's `train(cfg)` / `run(cfg)`; a mistake in the
user's files or flags ends with a message naming where, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from chatrlhf.config import PretrainConfig, SFTConfig, field_help, load_config
from chatrlhf.demo import DemoConfig
from chatrlhf.errors import UserError
from chatrlhf.eval import EvalConfig
from chatrlhf.labeling.auto import LabelAutoConfig
from chatrlhf.labeling.commands import LabelerAddConfig, LabelExportConfig, LabelServeConfig
from chatrlhf.pipeline import PipelineConfig
from chatrlhf.ppo import PPOConfig
from chatrlhf.reward import RewardConfig, ScoreConfig
from chatrlhf.sample import SampleConfig
from chatrlhf.serve.app import ServeConfig
from chatrlhf.terminal import ChatConfig


def _sft(cfg):
    from chatrlhf.sft import train

    train(cfg)


def _pretrain(cfg):
    from chatrlhf.sft import pretrain

    pretrain(cfg)


def _reward(cfg):
    from chatrlhf.reward import train

    train(cfg)


def _score(cfg):
    from chatrlhf.reward import score

    score(cfg)


def _ppo(cfg):
    from chatrlhf.ppo import train

    train(cfg)


def _sample(cfg):
    from chatrlhf.sample import run

    run(cfg)


def _label_auto(cfg):
    from chatrlhf.labeling.auto import run

    run(cfg)


def _label_serve(cfg):
    from chatrlhf.labeling.commands import serve

    serve(cfg)


def _label_labeler_add(cfg):
    from chatrlhf.labeling.commands import add_labeler

    add_labeler(cfg)


def _label_export(cfg):
    from chatrlhf.labeling.commands import export

    export(cfg)


def _eval(cfg):
    from chatrlhf.eval import run

    run(cfg)


def _pipeline(cfg):
    from chatrlhf.pipeline import run

    run(cfg)


def _serve(cfg):
    from chatrlhf.serve.app import run

    run(cfg)


def _chat(cfg):
    from chatrlhf.terminal import run

    run(cfg)


def _demo(cfg):
    from chatrlhf.demo import run

    run(cfg)


@dataclass
class Command:
    config: type
    run: Callable
    help: str
    positional: str = ""  # config key a leading bare argument fills: `chatrlhf chat runs/x/ppo`


COMMANDS = {
    "demo": Command(DemoConfig, _demo, "the whole pipeline on the default model with the built-in task"),
    "pretrain": Command(PretrainConfig, _pretrain, "causal-LM training on raw text (stage 0)"),
    "sft": Command(SFTConfig, _sft, "supervised fine-tuning on demonstrations (stage 1)"),
    "reward": Command(
        RewardConfig, _reward, "reward model from rankings, pairs, HH or OpenAssistant trees (stage 2)"
    ),
    "sample": Command(
        SampleConfig, _sample, "K answers per prompt from a model, as ranking tasks in the labeling DB"
    ),
    "label serve": Command(
        LabelServeConfig, _label_serve, "the ranking web app and its JSON API for labelers"
    ),
    "label labeler add": Command(
        LabelerAddConfig, _label_labeler_add, "add a labeler and print their token", positional="name"
    ),
    "label auto": Command(
        LabelAutoConfig, _label_auto, "simulated labelers rank the open tasks with a judge"
    ),
    "label export": Command(
        LabelExportConfig, _label_export, "write the collected rankings as JSONL for the reward stage"
    ),
    "ppo": Command(PPOConfig, _ppo, "PPO against a reward model (stage 3)"),
    "pipeline": Command(
        PipelineConfig, _pipeline, "every stage from one config: SFT, then sample, rank, RM, PPO"
    ),
    "eval": Command(
        EvalConfig, _eval, "win-rate of a policy over a baseline by a judge, with KL and samples"
    ),
    "chat": Command(ChatConfig, _chat, "chat with a checkpoint in the terminal", positional="model"),
    "serve": Command(
        ServeConfig, _serve, "OpenAI-compatible API and web chat page for a checkpoint", positional="model"
    ),
    "score": Command(ScoreConfig, _score, "print a reward model's scores of given answers"),
}


GROUP_HELP = {
    "label": "ranking: the labeling web app, labeler tokens, simulated labelers, export",
    "label labeler": "labelers of the ranking app",
}


def _epilog(config: type) -> str:
    rows = field_help(config)
    width = max(len(name) for name, _, _ in rows) + 2
    lines = ["config keys (YAML, or --key value on the command line):"]
    lines += [f"  --{name:<{width}} {text} [default: {default!r}]" for name, text, default in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """One argparse sub-parser per command word; `label serve` is `label` then `serve`."""
    parser = argparse.ArgumentParser(prog="chatrlhf", description="Train a chat model the InstructGPT way.")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(dest="command0", metavar="COMMAND", required=True)
    }
    for name, command in COMMANDS.items():
        words = tuple(name.split())
        for depth in range(1, len(words)):  # the group words (`label`, `label labeler`) get their own parsers
            if words[:depth] not in groups:
                group = groups[words[: depth - 1]].add_parser(
                    words[depth - 1], help=GROUP_HELP.get(" ".join(words[:depth]), "...")
                )
                groups[words[:depth]] = group.add_subparsers(
                    dest=f"command{depth}", metavar="COMMAND", required=True
                )
        p = groups[words[:-1]].add_parser(
            words[-1],
            help=command.help,
            description=command.help,
            epilog=_epilog(command.config),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML config file")
        p.set_defaults(command=name)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the stage's own progress
    if command.positional and overrides and not overrides[0].startswith("--"):
        overrides = [f"--{command.positional}", *overrides]  # `chatrlhf serve runs/x/ppo`
    try:
        cfg = load_config(command.config, args.config, overrides)
        command.run(cfg)
    except UserError as e:
        print(f"chatrlhf {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"chatrlhf {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
