"""What every built-in demo task shares: demonstrations as the judge's best of N sampled answers, the length
of an answer, and the whole pipeline's settings sized for a 2-core CPU (`chatrlhf demo`, either task)."""

from __future__ import annotations

import random
from pathlib import Path

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


def data_dir(cfg: DemoConfig) -> Path:
    """The demo's generated files (prompts, demonstrations) beside its output folder: `<output_dir>_data`."""
    out = Path(cfg.output_dir)
    folder = out.parent / (out.name + "_data")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# what a setting of 0 means for each task: the answers' length, SFT's steps (two passes over the
# demonstrations), the reward model's passes over the rankings and PPO's steps per round. The ifeval task's
# answers are longer and its rankings hold the written-ahead tasks too, so it takes fewer passes and steps to
# keep within its time
TASK_DEFAULTS = {
    DemoTask.constraints: {"max_new_tokens": 48, "sft_steps": 24, "rm_epochs": 2.0, "ppo_steps": 35},
    DemoTask.ifeval: {"max_new_tokens": 160, "sft_steps": 160, "rm_epochs": 1.0, "ppo_steps": 24},
}


def setting(cfg: DemoConfig, name: str):
    """The config's value of `name`, else (when 0) the task's own."""
    return getattr(cfg, name) or TASK_DEFAULTS[cfg.task][name]


def answer_tokens(cfg: DemoConfig) -> int:
    """The longest answer in training and the held-out eval."""
    return setting(cfg, "max_new_tokens")


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
        sft=SFTConfig(max_steps=setting(cfg, "sft_steps"), batch_size=4, lr=5e-5, save_every=0),
        # the reward model trains the layers above PPO's shared trunk only (and its head): its bottom stays
        # the SFT model's, so PPO scores with the trunk it computes anyway; measured against full training
        # on gold-judged held-out pairs in docs/demo.md
        reward=RewardConfig(
            epochs=setting(cfg, "rm_epochs"),
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
            max_steps=setting(cfg, "ppo_steps"),
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
            sample_every=max(1, setting(cfg, "ppo_steps") // 3),
        ),
        eval=EvalConfig(
            judge="rule", sampling=SamplingConfig(max_new_tokens=tokens, temperature=0.7), samples=2, show=8
        ),
    )


def model_depth(model: str) -> int:
    from transformers import AutoConfig

    from chatrlhf.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers
