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
from pathlib import Path

from rich.console import Console

from chatrlhf.configs import (
    DemoConfig,
    DemoTask,
    EvalConfig,
    LabelAutoConfig,
    LoraConfig,
    PipelineConfig,
    PPOConfig,
    RewardConfig,
    SampleConfig,
    SamplingConfig,
    SFTConfig,
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


def best_of_n_demonstrations(
    model_path: str,
    rows: list[dict],
    n: int,
    seed: int,
    max_new_tokens: int,
    written=None,
    temperature: float = 1.0,
) -> list[dict]:
    """The rule judge's best of n sampled answers per prompt, where it meets every constraint; elsewhere the
    answer `written(row, rng)` gives, or none (the prompt is left out). Each record says which (`source`)."""
    from chatrlhf.judges import RuleJudge, satisfies_all
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device
    from chatrlhf.records import Conversation
    from chatrlhf.sample import draw

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, tokenizer, pick_device())
    judge, rng = RuleJudge(), random.Random(seed)
    conversations = [
        Conversation(f"built-in:{i}", [{"role": "user", "content": r["prompt"]}]) for i, r in enumerate(rows)
    ]
    out = []
    for start in range(0, len(rows), 8):
        chunk = conversations[start : start + 8]
        drawn = draw(
            model,
            tokenizer,
            chunk,
            n,
            SamplingConfig(max_new_tokens, temperature=temperature),
            seed + start,
            1,
        )
        for row, d in zip(rows[start : start + 8], drawn):
            meta = {k: v for k, v in row.items() if k not in ("prompt", "constraint")}
            scores = judge.scores(d.conversation.messages, d.answers, meta)
            best = max(zip(scores, d.answers), default=(0.0, ""))[1]
            if best and satisfies_all(d.conversation.messages, best, meta):
                out.append({"prompt": row["prompt"], "completion": best, "source": "best-of-n"})
            elif written is not None:
                out.append({"prompt": row["prompt"], "completion": written(row, rng), "source": "written"})
    return out


def answer_tokens(cfg: DemoConfig) -> int:
    """The longest answer in training and the held-out eval: the config's, else the task's own."""
    return cfg.max_new_tokens or {DemoTask.constraints: 48, DemoTask.ifeval: 160}[cfg.task]


def pipeline_config(cfg: DemoConfig, data: Path, depth: int = 30) -> PipelineConfig:
    """The demo's settings for the whole pipeline, sized for a 2-core CPU; `depth` is the model's number of
    transformer layers (PPO's adapters go in the last 8 of them, or all of a smaller model's)."""
    tokens = answer_tokens(cfg)
    return PipelineConfig(
        output_dir=cfg.output_dir,
        model=cfg.model,
        demonstrations=str(data / "demonstrations.jsonl"),
        prompts=str(data / "prompts.jsonl"),
        eval_prompts=str(data / "eval_prompts.jsonl"),
        iterations=cfg.iterations,
        labeler="auto",
        seed=cfg.seed,
        resume=cfg.resume,
        overwrite=not cfg.resume,
        sample=SampleConfig(
            k=cfg.k, sampling=SamplingConfig(max_new_tokens=tokens, temperature=1.0), batch_prompts=8
        ),
        label=LabelAutoConfig(judge="rule", noise=cfg.noise, tie_margin=cfg.tie_margin, seed=cfg.seed),
        sft=SFTConfig(max_steps=cfg.sft_steps, batch_size=4, lr=5e-5, save_every=0),
        # the reward model trains the layers above PPO's shared trunk only (and its head): its bottom stays
        # the SFT model's, so PPO scores with the trunk it computes anyway; measured against full training
        # on gold-judged held-out pairs in docs/demo.md
        reward=RewardConfig(
            epochs=cfg.rm_epochs,
            batch_size=8,
            lr=2e-3,
            freeze_layers=max(0, depth - 8),
            eval_fraction=0.15,
            save_every=0,
        ),
        # 4 answers per prompt with the leave-one-out baseline: the prompt's difficulty (which constraint
        # pair it asks for) drops out of the advantage without a critic to warm up; LoRA in the last 8
        # layers stops backward there; the settings measured are in docs/demo.md
        ppo=PPOConfig(
            max_steps=cfg.ppo_steps,
            batch_size=8,
            samples_per_prompt=4,
            advantage_estimator="rloo",
            lr=4e-4,
            lr_scheduler="constant",  # InstructGPT: constant after warm-up
            warmup_ratio=0.1,
            lora=LoraConfig(rank=16, layers=min(8, depth)),
            sampling=SamplingConfig(max_new_tokens=tokens, temperature=1.0),
            kl_coef=0.4,
            ppo_epochs=2,
            minibatches=2,
            missing_eos_penalty=1.0,
            save_every=0,
            sample_every=max(1, cfg.ppo_steps // 3),
        ),
        eval=EvalConfig(
            judge="rule", sampling=SamplingConfig(max_new_tokens=tokens, temperature=0.7), samples=2, show=8
        ),
    )


def run(cfg: DemoConfig) -> dict:
    if cfg.max_new_tokens < 0:
        raise UserError("demo: max_new_tokens must be 0 (the task's own) or more")
    if cfg.task == DemoTask.ifeval:
        from chatrlhf.ifeval import loop

        return loop.run(cfg)
    from chatrlhf.models import resolve_model
    from chatrlhf.pipeline import run as run_pipeline

    console = Console()
    data = Path(cfg.output_dir).parent / (Path(cfg.output_dir).name + "_data")
    data.mkdir(parents=True, exist_ok=True)
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
    return run_pipeline(pipeline_config(cfg, data, model_depth(cfg.model)))


def model_depth(model: str) -> int:
    from transformers import AutoConfig

    from chatrlhf.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers
