"""TRL's side of `bench/ppo.py`'s lora row: TRL 1.12's PPOTrainer with LoRA adapters on the policy and the
value model, the reference being the policy with its adapters disabled (`ref_model=None`).

The workload is `ppo.LORA_PPO` on top of the anchor's PPO settings (see bench/ppo.py's docstring). Run by
`bench/ppo.py` with the interpreter of `.venv-trl-ppo` (TRL 1.12.0, transformers, peft, datasets,
accelerate, torch), so it imports nothing from chatrlhf; by hand, from the repository root:

    .venv-trl-ppo/bin/python bench/ppo_trl_lora.py --steps 1 [--bf16]

Phases are timed as `trl_baseline.py ppo` times them, by wrapping the module-level functions the trainer
calls: `batch_generation` (generation), `forward` without gradients (the reference's log-probs) and
`get_reward` (values, then the reward model's score); the update is the rest of each PPO batch. stdout
gets one JSON record; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py and bench/ppo.py
import common  # noqa: E402
import ppo  # noqa: E402  (standard library and common only at top level)

TRL_PACKAGES = ("trl", "transformers", "torch", "peft", "accelerate", "datasets")


def peft_lora(depth: int, task_type: str | None = None):
    """The row's LoRA settings as a peft config for a model of `depth` layers (one object per model)."""
    from peft import LoraConfig

    w = ppo.LORA_PPO
    return LoraConfig(
        r=w["lora_rank"],
        lora_alpha=w["lora_alpha"],
        lora_dropout=w["lora_dropout"],
        target_modules=list(w["lora_targets"]),
        layers_to_transform=list(range(depth - w["lora_layers"], depth)),
        task_type=task_type,
    )


class PhaseTimer:
    """Seconds of TRL's rollout phases per PPO batch, and the step boundaries (a TrainerCallback)."""

    def __init__(self):
        self.ends: list[float] = []  # perf_counter at train begin, then at each step's end
        self.seconds: dict[str, list[float]] = {"generation": [], "ref": [], "value_reward": []}
        self.gen_shapes: list[list[int]] = []  # rows, prompt width, new tokens
        self.response_lengths: list[float] = []  # mean answer length as TRL scores it, per batch

    def add(self, phase: str, seconds: float) -> None:
        batch = len(self.ends) - 1
        times = self.seconds[phase]
        times.extend([0.0] * (batch + 1 - len(times)))
        times[batch] += seconds

    def install(self, ppo_trainer_module) -> None:
        import torch

        generation, forward, get_reward = (
            ppo_trainer_module.batch_generation,
            ppo_trainer_module.forward,
            ppo_trainer_module.get_reward,
        )

        def timed_generation(model, queries, *args, **kwargs):
            began = time.perf_counter()
            out = generation(model, queries, *args, **kwargs)
            self.add("generation", time.perf_counter() - began)
            rows, width = queries.shape
            self.gen_shapes.append([int(rows), int(width), int(out[0].shape[1] - width)])
            return out

        def timed_forward(*args, **kwargs):
            if torch.is_grad_enabled():  # the update's forward
                return forward(*args, **kwargs)
            began = time.perf_counter()
            out = forward(*args, **kwargs)
            self.add("ref", time.perf_counter() - began)
            return out

        def timed_reward(model, query_responses, pad_token_id, context_length):
            began = time.perf_counter()
            out = get_reward(model, query_responses, pad_token_id, context_length)
            self.add("value_reward", time.perf_counter() - began)
            lengths = out[2] - context_length + 1  # the score is read at the last token before a pad
            del self.response_lengths[len(self.ends) - 1 :]
            self.response_lengths.append(round(float(lengths.float().mean()), 2))
            return out

        ppo_trainer_module.batch_generation = timed_generation
        ppo_trainer_module.forward = timed_forward
        ppo_trainer_module.get_reward = timed_reward

    def callback(self):
        from transformers import TrainerCallback

        ends = self.ends

        class StepEnds(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        return StepEnds()

    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def watch_autocast(models: dict) -> dict[str, set[str]]:
    """Whether each model's forwards run under CPU autocast, with and without gradients (forward hooks)."""
    import torch

    seen: dict[str, set[str]] = {name: set() for name in models}

    for name, module in models.items():

        def hook(module, inputs, name=name):
            mode = "grad" if torch.is_grad_enabled() else "no_grad"
            seen[name].add(f"{mode}:{'bf16' if torch.is_autocast_enabled('cpu') else 'fp32'}")

        module.register_forward_pre_hook(hook)
    return seen


def lora_b_norm(model) -> float:
    """Sum of |lora_B|: 0 at peft's init, so > 0 after training shows the adapters trained."""
    return float(sum(p.detach().abs().sum() for n, p in model.named_parameters() if "lora_B" in n))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prompt_dataset(anchor, tokenizer, rows: list[dict]):
    from datasets import Dataset

    ids = []
    for row in rows:
        enc = tokenizer.apply_chat_template(
            anchor.as_messages(row["prompt"]), tokenize=True, add_generation_prompt=True
        )
        ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return Dataset.from_dict({"input_ids": ids})


def trl_config(anchor, wl: dict, out_dir: str, model_dir: str, bf16: bool):
    """The row's settings in PPOConfig's terms. One PPO batch = per_device_train_batch_size x
    gradient_accumulation_steps rollouts; its num_mini_batches minibatches are one forward and one AdamW step
    each when the accumulation is 1."""
    from trl.experimental.ppo import PPOConfig

    w, batch = anchor.PPO, wl["batch_size"]
    return PPOConfig(
        **anchor.common_args(
            out_dir,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch,
            gradient_accumulation_steps=1,
            num_mini_batches=wl["num_mini_batches"],
            num_ppo_epochs=wl["ppo_epochs"],
            total_episodes=wl["steps"] * batch,
            local_rollout_forward_batch_size=batch,  # generation and scoring: the whole batch at once
            response_length=wl["response_length"],
            learning_rate=wl["learning_rate"],
            lr_scheduler_type=wl["lr_scheduler"],
            temperature=wl["temperature"],
            kl_coef=wl["kl_coef"],
            kl_estimator=w["kl_estimator"],
            cliprange=w["cliprange"],
            cliprange_value=w["cliprange_value"],
            vf_coef=w["vf_coef"],
            gamma=w["gamma"],
            lam=w["lam"],
            whiten_rewards=w["whiten_rewards"],
            stop_token=None,  # no EOS stop: exactly response_length new tokens
            missing_eos_penalty=None,
            num_sample_generations=0,
            sft_model_path=model_dir,
            reward_model_path=model_dir,
            bf16=bf16,
        )
    )


def train(args) -> dict:
    anchor = common.load_anchor(common.shared_bench_dir())
    wl = ppo.workload(anchor, "lora", args.steps)
    if args.bf16:
        # what `accelerate launch --mixed_precision bf16` sets: PPOTrainer builds its own Accelerator, which
        # reads this and not PPOConfig's bf16
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    anchor.setup_torch(args.threads)
    import trl.experimental.ppo.ppo_trainer as ppo_trainer_module
    from peft import get_peft_model
    from trl.experimental.ppo import PPOTrainer

    timer = PhaseTimer()
    timer.install(ppo_trainer_module)
    began = time.perf_counter()
    model_dir = str(args.model_dir)
    tokenizer = anchor.load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    policy = anchor.load_causal_lm(model_dir)
    reward = anchor.load_scalar_head(model_dir, anchor.SEED + 10).requires_grad_(False)
    value = anchor.load_scalar_head(model_dir, anchor.SEED + 20)
    depth = policy.config.num_hidden_layers
    # TRL puts peft_config on the policy only; the value model gets the same adapters here, and its new
    # score head trains as well (as chatrlhf's does)
    value = get_peft_model(value, peft_lora(depth))
    for name, p in value.named_parameters():
        p.requires_grad = p.requires_grad or ".score." in name
    dataset = prompt_dataset(anchor, tokenizer, ppo.prompt_rows(anchor, wl))
    rss_before = common.peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="trl-bench-ppo-lora-") as tmp:
        trainer = PPOTrainer(
            args=trl_config(anchor, wl, tmp, model_dir, args.bf16),
            processing_class=tokenizer,
            model=policy,
            ref_model=None,  # with peft_config: the policy with its adapters disabled
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[timer.callback()],
            peft_config=peft_lora(depth, "CAUSAL_LM"),
        )
        policy = trainer.model.policy
        autocast = watch_autocast({"policy": policy.get_output_embeddings(), "value": value.score})
        params = {"policy_trainable_params": trainable(policy), "value_trainable_params": trainable(value)}
        setup_s = time.perf_counter() - began
        began = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - began
        peak_rss = common.peak_rss_mib()

    steps = timer.step_s()
    phases = {name: [round(t, 2) for t in times] for name, times in timer.seconds.items()}
    gen, ref, value_reward = (sum(timer.seconds[k]) for k in ("generation", "ref", "value_reward"))
    episodes = wl["batch_size"] * len(steps)
    new_tokens = sum(rows * new for rows, _, new in timer.gen_shapes)
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]

    def per_step(key: str) -> list[float]:
        return [round(h[key], 4) for h in logs]

    return {
        "bench": "ppo",
        "workload": "lora",
        "framework": "trl",
        "trainer": f"{PPOTrainer.__module__}.{PPOTrainer.__name__}",
        "dtype": "bf16" if args.bf16 else "fp32",
        "mixed_precision": trainer.accelerator.mixed_precision,
        "autocast_seen": {name: sorted(modes) for name, modes in autocast.items()},
        **common.episode_rates(episodes, train_s, steps),
        "generation_s": round(gen, 2),
        "score_s": round(ref + value_reward, 2),
        "ref_forward_s": round(ref, 2),
        "value_reward_forward_s": round(value_reward, 2),
        "update_s": round(sum(steps) - gen - ref - value_reward, 2),
        "generation_s_per_batch": phases["generation"],
        "score_s_per_batch": [round(a + b, 2) for a, b in zip(phases["ref"], phases["value_reward"])],
        "generated_tokens": new_tokens,
        "generated_tokens_per_s": round(new_tokens / gen, 1),
        "gen_shapes_rows_promptlen_newtokens": timer.gen_shapes,
        "response_length_per_batch": timer.response_lengths,
        **params,
        "policy_lora_b_abs_sum": round(lora_b_norm(policy), 4),
        "value_lora_b_abs_sum": round(lora_b_norm(value), 4),
        "peak_rss_mib": peak_rss,
        "peak_rss_before_train_mib": rss_before,
        "score_mean_per_batch": per_step("objective/scores"),
        "kl_per_batch": per_step("objective/kl"),
        "policy_loss_per_batch": per_step("loss/policy_avg"),
        "value_loss_per_batch": per_step("loss/value_avg"),
        "setup_s": round(setup_s, 2),
        "model_dir": model_dir,
        "versions": common.versions(TRL_PACKAGES),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=ppo.LORA_STEPS, help="PPO steps")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--model-dir", default=str(common.MODEL_DIR), help="the fp32 model folder")
    args = ap.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the record
        record = train(args)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
