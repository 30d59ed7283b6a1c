"""The `chatrlhf` command: one sub-command per stage, each `--config FILE.yaml` plus `--dotted.key value`.

    chatrlhf sft --config sft.yaml --max_steps 20 --data.train demos.jsonl
    chatrlhf pretrain --data.train corpus.txt --output_dir runs/pt
    chatrlhf demo
    chatrlhf label labeler add alice --db labels.db

A command may be several words (`label serve`); each parses its config and calls its stage's `train(cfg)` /
`run(cfg)`; a mistake in the user's files or flags ends with a message naming where, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from chatrlhf import configs
from chatrlhf.configs import field_help, load_config
from chatrlhf.errors import UserError


@dataclass
class Command:
    module: str  # imported only when the command runs, so `chatrlhf --help` loads no torch
    config: str  # its config dataclass in `chatrlhf.configs`
    entry: str  # the module's function that takes that config
    help: str
    positional: str = ""  # config key a leading bare argument fills: `chatrlhf chat runs/x/ppo`

    def config_class(self) -> type:
        return getattr(configs, self.config)

    def load(self):
        return self.config_class(), getattr(importlib.import_module(self.module), self.entry)


COMMANDS = {
    "demo": Command(
        "chatrlhf.demo", "DemoConfig", "run", "the whole pipeline on the default model with the built-in task"
    ),
    "pretrain": Command(
        "chatrlhf.sft", "PretrainConfig", "pretrain", "causal-LM training on raw text (stage 0)"
    ),
    "sft": Command(
        "chatrlhf.sft", "SFTConfig", "train", "supervised fine-tuning on demonstrations (stage 1)"
    ),
    "reward": Command(
        "chatrlhf.reward",
        "RewardConfig",
        "train",
        "reward model from rankings, pairs, HH or OpenAssistant trees (stage 2)",
    ),
    "sample": Command(
        "chatrlhf.sample",
        "SampleConfig",
        "run",
        "K answers per prompt from a model, as ranking tasks in the labeling DB",
    ),
    "label serve": Command(
        "chatrlhf.labeling.commands",
        "LabelServeConfig",
        "serve",
        "the ranking web app and its JSON API for labelers",
    ),
    "label labeler add": Command(
        "chatrlhf.labeling.commands",
        "LabelerAddConfig",
        "add_labeler",
        "add a labeler and print their token",
        positional="name",
    ),
    "label auto": Command(
        "chatrlhf.labeling.auto",
        "LabelAutoConfig",
        "run",
        "simulated labelers rank the open tasks with a judge",
    ),
    "label export": Command(
        "chatrlhf.labeling.commands",
        "LabelExportConfig",
        "export",
        "write the collected rankings as JSONL for the reward stage",
    ),
    "dpo": Command(
        "chatrlhf.dpo",
        "DPOConfig",
        "train",
        "DPO (pairwise, or listwise over whole rankings) from rankings, no reward model",
    ),
    "ppo": Command("chatrlhf.ppo", "PPOConfig", "train", "PPO against a reward model (stage 3)"),
    "pipeline": Command(
        "chatrlhf.pipeline",
        "PipelineConfig",
        "run",
        "every stage from one config: SFT, then sample, rank, RM, PPO",
    ),
    "eval": Command(
        "chatrlhf.eval",
        "EvalConfig",
        "run",
        "win-rate of a policy over a baseline by a judge, with KL and samples",
    ),
    "chat": Command(
        "chatrlhf.terminal", "ChatConfig", "run", "chat with a checkpoint in the terminal", positional="model"
    ),
    "serve": Command(
        "chatrlhf.serve.app",
        "ServeConfig",
        "run",
        "OpenAI-compatible API and web chat page for a checkpoint",
        positional="model",
    ),
    "score": Command(
        "chatrlhf.reward", "ScoreConfig", "score", "print a reward model's scores of given answers"
    ),
}


# `chatrlhf eval --benchmark NAME` runs a public benchmark instead of the judge's side-by-side: its own config
BENCHMARKS = {
    "ifeval": Command(
        "chatrlhf.ifeval.benchmark",
        "IFEvalConfig",
        "run",
        "IFEval's prompts answered by a model, scored by lm-eval's checkers; greedy, at most "
        "sampling.max_new_tokens (512; lm-eval's own max_gen_toks is 1280)",
    ),
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


def named_command(argv: list[str]) -> str | None:
    """The command the leading words of `argv` name, if any: `label serve --port 1` -> "label serve"."""
    words: list[str] = []
    for word in argv:
        if word.startswith("-") or not any(n.split()[: len(words) + 1] == [*words, word] for n in COMMANDS):
            break
        words.append(word)
    return " ".join(words) if " ".join(words) in COMMANDS else None


def benchmark_named(argv: list[str]) -> str | None:
    """The benchmark an `eval` command line names with `--benchmark NAME` or in its --config file, if any."""
    for k, word in enumerate(argv):
        if word == "--benchmark" and k + 1 < len(argv):
            return argv[k + 1]
        if word.startswith("--benchmark="):
            return word.split("=", 1)[1]
    for k, word in enumerate(argv[:-1]):
        if word == "--config":
            try:
                import yaml

                with open(argv[k + 1], encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                return None  # the config loader reports the file's problem
            return data.get("benchmark") if isinstance(data, dict) else None
    return None


def _command(name: str, argv: list[str]) -> Command:
    """The command `name` runs: for `eval` with a benchmark, that benchmark's."""
    benchmark = benchmark_named(argv) if name == "eval" else None
    if benchmark is None:
        return COMMANDS[name]
    if benchmark not in BENCHMARKS:
        raise UserError(f"--benchmark: {benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[benchmark]


def build_parser(detailed: str | None = None, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """One argparse sub-parser per command word; `label serve` is `label` then `serve`. The `detailed`
    command's help lists its config keys."""
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
        shown = _command(name, argv or []) if name == detailed else command  # `eval --benchmark X`: X's own
        p = groups[words[:-1]].add_parser(
            words[-1],
            help=command.help,
            description=shown.help,
            epilog=_epilog(shown.config_class()) if name == detailed else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML config file")
        p.set_defaults(command=name)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(named_command(argv), argv)
        args, overrides = parser.parse_known_args(argv)
        command = _command(args.command, argv)
    except UserError as e:
        print(f"chatrlhf: error: {e}", file=sys.stderr)
        sys.exit(2)
    config, entry = command.load()
    if "transformers" in sys.modules:  # loaded by the stage: its per-file "Loading weights" bars drown ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if command.positional and overrides and not overrides[0].startswith("--"):
        overrides = [f"--{command.positional}", *overrides]  # `chatrlhf serve runs/x/ppo`
    try:
        cfg = load_config(config, args.config, overrides)
        entry(cfg)
    except UserError as e:
        print(f"chatrlhf {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"chatrlhf {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
