"""`chatrlhf demo`: the built-in job on the default model.

The built-in task is instruction following with checkable constraints (word limits, bullet counts,
lowercase), InstructGPT's goal at laptop scale. Its prompts and demonstrations are generated here from
topics x constraints; nothing third-party is used. This first version of the demo fine-tunes on the
demonstrations (stage 1) and shows the model's answers to held-out topics before and after, each marked by
the rule judge, with the share of constraints met.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chatrlhf.config import DataConfig, SFTConfig, help_field
from chatrlhf.judges import satisfies

TOPICS = {
    "the moon": ["orbits the earth", "has no air", "shows phases", "pulls the tides"],
    "bees": ["make honey", "pollinate flowers", "live in hives", "dance to share directions"],
    "volcanoes": ["erupt molten rock", "form mountains", "release gas", "build new land"],
    "rain": ["falls from clouds", "waters crops", "fills rivers", "forms from condensed vapor"],
    "bicycles": ["have two wheels", "need no fuel", "are pedaled", "keep riders fit"],
    "libraries": ["lend books", "offer quiet rooms", "keep records", "host reading groups"],
    "coffee": ["comes from roasted beans", "contains caffeine", "is brewed hot", "grows in the tropics"],
    "whales": ["breathe air", "sing songs", "are mammals", "migrate across oceans"],
    "trains": ["run on rails", "carry freight", "link cities", "stop at stations"],
    "forests": ["store carbon", "shelter animals", "make oxygen", "hold soil in place"],
}
HELD_OUT_TOPICS = ("whales", "trains", "forests")


def _words(topic: str, fact: str) -> str:
    return f"{topic[0].upper()}{topic[1:]} {fact}."


CONSTRAINTS = {
    "lowercase": (
        "Tell me about {topic}, writing in all lowercase letters.",
        lambda topic, facts: " ".join(_words(topic, f) for f in facts[:3]).lower(),
    ),
    "bullets": (
        "Describe {topic} as exactly 3 bullet points.",
        lambda topic, facts: "\n".join(f"- {_words(topic, f)}" for f in facts[:3]),
    ),
    "short": (
        "Describe {topic} in at most 15 words.",
        lambda topic, facts: f"{_words(topic, facts[0])[:-1]} and {facts[1]}.",
    ),
    "question": (
        "Say one fact about {topic} and end with a question.",
        lambda topic, facts: f"{_words(topic, facts[0])} Did you know that they {facts[1]}?",
    ),
}


def demonstrations(topics: list[str], rng: random.Random) -> list[dict]:
    rows = []
    for topic in topics:
        facts = TOPICS[topic][:]
        for name, (prompt, write) in CONSTRAINTS.items():
            rng.shuffle(facts)
            rows.append(
                {"prompt": prompt.format(topic=topic), "completion": write(topic, facts), "constraint": name}
            )
    return rows


@dataclass
class DemoConfig:
    output_dir: str = help_field("runs/demo", "where the demo's stages write")
    model: str = help_field("", "starting model; empty for the default SmolLM2-135M-Instruct")
    sft_steps: int = help_field(16, "SFT optimizer steps")
    seed: int = help_field(1234, "random seed")


def run(cfg: DemoConfig) -> None:
    from chatrlhf import sft
    from chatrlhf.generation import SamplingConfig, answer
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device

    console = Console()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    train_topics = [t for t in TOPICS if t not in HELD_OUT_TOPICS]
    data_file = out / "demonstrations.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in demonstrations(train_topics, rng)))
    held_rows = demonstrations(list(HELD_OUT_TOPICS), rng)
    held_out = [[{"role": "user", "content": r["prompt"]}] for r in held_rows]

    console.rule("[bold]stage 1: supervised fine-tuning on built-in demonstrations")
    sft_cfg = SFTConfig(
        model=cfg.model,
        data=DataConfig(train=str(data_file)),
        output_dir=str(out / "sft"),
        max_steps=cfg.sft_steps,
        batch_size=4,
        lr=5e-5,
        seed=cfg.seed,
        save_every=0,
        overwrite=True,
    )
    summary = sft.train(sft_cfg)
    console.print(f"SFT final loss {summary['train/loss']:.3f}")

    sampling = SamplingConfig(max_new_tokens=48)
    tokenizer = load_tokenizer(sft_cfg.output_dir)
    from chatrlhf.models import resolve_model

    before = answer(
        load_causal_lm(resolve_model(cfg.model), tokenizer, pick_device()), tokenizer, held_out, sampling
    )
    after = answer(
        load_causal_lm(sft_cfg.output_dir, tokenizer, pick_device()), tokenizer, held_out, sampling
    )
    table = Table(title="held-out prompts, greedy answers (rule judge: ok / no)", show_lines=True)
    for column in ("prompt", "before SFT", "after SFT"):
        table.add_column(column, overflow="fold")
    for conv, row, b, a in zip(held_out, held_rows, before, after):
        mark = {True: "[green]ok[/]", False: "[red]no[/]"}
        rule = row["constraint"]
        table.add_row(
            conv[0]["content"], f"{mark[satisfies(b, rule)]} {b}", f"{mark[satisfies(a, rule)]} {a}"
        )
    console.print(table)
    ok_before = sum(satisfies(b, r["constraint"]) for b, r in zip(before, held_rows))
    ok_after = sum(satisfies(a, r["constraint"]) for a, r in zip(after, held_rows))
    console.print(
        f"constraints met on {len(held_rows)} held-out prompts: {ok_before} before SFT, {ok_after} after"
    )
    console.print(f"checkpoint: {sft_cfg.output_dir}  (loads with AutoModelForCausalLM.from_pretrained)")
