"""`chatrlhf demo`: the whole pipeline on the default model with the built-in task, in minutes on a CPU.

The built-in task is instruction following with checkable constraints (word limits, bullet counts,
lowercase, ending with a question), InstructGPT's goal at laptop scale. Its prompts come from topics x
constraints, split by topic into training and held-out prompts; nothing third-party is used.
Demonstrations are the best of N sampled answers by the rule judge (standing in for labeler-written
answers), or a written answer where none of the N meets the constraints. A simulated labeler ranks with the
rule judge plus noise, tying answers it cannot tell apart; the reward model sees only its rankings, never
the judge.
"""

from __future__ import annotations

import random

from rich.console import Console

from chatrlhf.configs import (
    DemoConfig,
    DemoTask,
)
from chatrlhf.errors import UserError
from chatrlhf.runs import atomic_write_jsonl

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
    "penguins": ["cannot fly", "swim fast", "live in the south", "huddle for warmth"],
    "deserts": ["get little rain", "are hot by day", "hold cacti", "cool at night"],
    "pianos": ["have 88 keys", "use hammers", "hit strings", "can be grand or upright"],
    "bridges": ["cross rivers", "carry roads", "are made of steel", "link two shores"],
    "apples": ["grow on trees", "come in many colors", "are crunchy", "keep for weeks"],
    "clouds": ["float in the sky", "are made of droplets", "bring rain", "change shape"],
}
HELD_OUT_TOPICS = ("whales", "trains", "forests", "clouds")


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


# a clause per constraint, so that two combine into one instruction; each with its explicit constraint
CLAUSES = {
    "lowercase": ("in all lowercase letters", {"kind": "lowercase"}),
    "bullets": ("as exactly 3 bullet points", {"kind": "bullets", "value": 3}),
    "short": ("in at most 15 words", {"kind": "max_words", "value": 15}),
    "question": ("ending with a question", {"kind": "question"}),
}
PAIR_TEMPLATES = ["Describe {topic} {first}, {second}.", "Tell me about {topic} {first} and {second}."]


def prompts(topics: list[str]) -> list[dict]:
    """One prompt record per topic and constraint (the demonstrations' prompts); `constraint` names it."""
    return [
        {"prompt": template.format(topic=topic), "constraint": name, "topic": topic}
        for topic in topics
        for name, (template, _) in CONSTRAINTS.items()
    ]


def paired_prompts(topics: list[str], every_template: bool = False) -> list[dict]:
    """One prompt record per topic and pair of constraints: what is ranked, what PPO trains on and what is
    evaluated. The demonstrations teach each constraint alone (InstructGPT's SFT, RM and PPO prompts differ
    too), so the SFT model leaves room to improve; each record lists its constraints for the rule judge.
    The wording alternates between the templates, or with `every_template` each pair comes in each wording
    (the held-out set: twice the prompts, so narrower intervals)."""
    names = list(CLAUSES)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    rows = []
    for t, topic in enumerate(topics):
        for p, (a, b) in enumerate(pairs):
            shift = (t + p) % len(PAIR_TEMPLATES)
            wordings = (
                PAIR_TEMPLATES[shift:] + PAIR_TEMPLATES[:shift] if every_template else [PAIR_TEMPLATES[shift]]
            )
            for template in wordings:
                rows.append(
                    {
                        "prompt": template.format(topic=topic, first=CLAUSES[a][0], second=CLAUSES[b][0]),
                        "constraint": f"{a}+{b}",
                        "topic": topic,
                        "constraints": [CLAUSES[a][1], CLAUSES[b][1]],
                    }
                )
    return rows


def written_answer(row: dict, rng: random.Random) -> str:
    """What a labeler would write for a prompt record: its topic's facts in the asked form."""
    facts = TOPICS[row["topic"]][:]
    rng.shuffle(facts)
    return CONSTRAINTS[row["constraint"]][1](row["topic"], facts)


def run(cfg: DemoConfig) -> dict:
    if cfg.max_new_tokens < 0:
        raise UserError("demo: max_new_tokens must be 0 (the task's own) or more")
    if cfg.task == DemoTask.ifeval:
        from chatrlhf.ifeval import loop

        if cfg.compare:
            raise UserError("demo: --compare runs on the constraints task (leave --task at its default)")

        return loop.run(cfg)
    from chatrlhf.demo_pipeline import (
        answer_tokens,
        best_of_n_demonstrations,
        data_dir,
        model_depth,
        pipeline_config,
    )
    from chatrlhf.models import resolve_model
    from chatrlhf.pipeline import run as run_pipeline

    console = Console()
    data = data_dir(cfg)
    train_topics = [t for t in TOPICS if t not in HELD_OUT_TOPICS]
    train_rows = prompts(train_topics)
    atomic_write_jsonl(data / "prompts.jsonl", paired_prompts(train_topics))
    atomic_write_jsonl(
        data / "eval_prompts.jsonl", paired_prompts(list(HELD_OUT_TOPICS), every_template=True)
    )
    demos = data / "demonstrations.jsonl"
    if not (cfg.resume and demos.exists()):
        console.rule("[bold]demonstrations: best of N sampled answers by the rule judge")
        rows = best_of_n_demonstrations(
            resolve_model(cfg.model), train_rows, cfg.best_of, cfg.seed, answer_tokens(cfg), written_answer
        )
        atomic_write_jsonl(demos, rows)
        picked = sum(r["source"] == "best-of-n" for r in rows)
        console.print(
            f"{picked}/{len(rows)} demonstrations picked from samples, {len(rows) - picked} written"
        )
    pipe_cfg = pipeline_config(cfg, data, model_depth(cfg.model))
    result = run_pipeline(pipe_cfg)
    if cfg.compare:
        from chatrlhf import compare

        result.update(compare.run(pipe_cfg, console))
    return result
