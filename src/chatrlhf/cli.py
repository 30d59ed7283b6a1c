"""The `chatrlhf` command: one sub-command per stage, each `--config FILE.yaml` plus `--dotted.key value`.

    chatrlhf sft --config sft.yaml --max_steps 20 --data.train demos.jsonl
    chatrlhf pretrain --data.train corpus.txt --output_dir runs/pt
    chatrlhf demo

Each sub-command parses its config and calls its stage's `train(cfg)` / `run(cfg)`; a mistake in the
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
from chatrlhf.ppo import PPOConfig
from chatrlhf.reward import RewardConfig, ScoreConfig
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


COMMANDS = {
    "demo": Command(DemoConfig, _demo, "the whole pipeline on the default model with the built-in task"),
    "pretrain": Command(PretrainConfig, _pretrain, "causal-LM training on raw text (stage 0)"),
    "sft": Command(SFTConfig, _sft, "supervised fine-tuning on demonstrations (stage 1)"),
    "reward": Command(
        RewardConfig, _reward, "reward model from rankings, pairs, HH or OpenAssistant trees (stage 2)"
    ),
    "ppo": Command(PPOConfig, _ppo, "PPO against a reward model (stage 3)"),
    "chat": Command(ChatConfig, _chat, "chat with a checkpoint in the terminal"),
    "serve": Command(ServeConfig, _serve, "OpenAI-compatible API and web chat page for a checkpoint"),
    "score": Command(ScoreConfig, _score, "print a reward model's scores of given answers"),
}


POSITIONAL_MODEL = ("chat", "serve")


def _epilog(config: type) -> str:
    rows = field_help(config)
    width = max(len(name) for name, _, _ in rows) + 2
    lines = ["config keys (YAML, or --key value on the command line):"]
    lines += [f"  --{name:<{width}} {text} [default: {default!r}]" for name, text, default in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatrlhf", description="Train a chat model the InstructGPT way.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=_epilog(command.config),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML config file")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if args.command in POSITIONAL_MODEL and overrides and not overrides[0].startswith("--"):
        overrides = ["--model", *overrides]  # `chatrlhf serve runs/x/ppo`
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
