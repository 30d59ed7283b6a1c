"""Stage 2, the reward model: a scalar score that agrees with people's rankings of K answers.

    chatrlhf reward --config rm.yaml
    chatrlhf score --model runs/x/reward --data pairs.jsonl

The model is the transformer without its unembedding plus a scalar head, read at the answer's end-of-turn
token (a Hugging Face `AutoModelForSequenceClassification` with one label, so any tool loads it). All C(K,2)
pairs of one prompt form one batch element (InstructGPT eq. 1): each of the K answers is forwarded once and
the loss is the mean of -log sigmoid(r_w - r_l) over that prompt's pairs; ties make no pair.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import set_seed

from chatrlhf.chat_template import sequence_ids
from chatrlhf.configs import RewardConfig, ScoreConfig
from chatrlhf.data import load_demonstrations
from chatrlhf.errors import UserError
from chatrlhf.forward import reward_scores, shared_prompt_scores
from chatrlhf.harness import autocast, check_config
from chatrlhf.losses import ranking_loss
from chatrlhf.models import (
    apply_lora,
    freeze_bottom,
    load_reward_model,
    load_tokenizer,
    pick_device,
    resolve_dtype,
    resolve_model,
    save_model,
    unwrap,
)
from chatrlhf.preferences import Ranking, load_rankings
from chatrlhf.ranked import (
    RankedItem,
    independent_pairs,
    pair_agreement,
    split_by_prompt,
    tokenize_rankings,
)
from chatrlhf.records import DataError, InvalidRecords
from chatrlhf.runs import data_lineage
from chatrlhf.training import Stage, fit

# --------------------------------------------------------------------------------------------------
# the stage


def _reward_stage(
    tokenizer, device, lineage: dict, share_prompt: bool = True, loss_weighting: str = "prompt"
) -> Stage:
    """The reward stage for `fit`. With `loss_weighting` "pair" a step's loss is the mean over all its
    comparisons (a prompt with K answers weighs C(K,2) pairs' worth); with "prompt" the mean over prompts of
    each prompt's mean over its pairs."""
    pad_id = tokenizer.pad_token_id
    per_pair = loss_weighting == "pair"

    def forward(model, items: Sequence[RankedItem]) -> list[torch.Tensor]:
        if share_prompt:
            return [shared_prompt_scores(model, item.sequences, pad_id, device) for item in items]
        rewards = reward_scores(model, [s for item in items for s in item.sequences], pad_id, device)
        return list(torch.split(rewards, [len(item.sequences) for item in items]))

    def loss(model, items, step_weight):
        total = torch.zeros((), device=device)
        stats = {"loss": 0.0, "pairs": 0.0, "correct": 0.0, "margin": 0.0, "prompts": float(len(items))}
        for item, rewards in zip(items, forward(model, items)):
            pairs, correct, margin = pair_agreement(rewards, item.pairs)
            item_loss = ranking_loss(rewards, pairs)
            total = total + (item_loss * len(item.pairs) if per_pair else item_loss)
            stats["loss"] += item_loss.item() * len(item.pairs)
            stats["pairs"] += len(item.pairs)
            stats["correct"] += correct
            stats["margin"] += margin
        return total / step_weight, stats

    def summarize(s):
        return {
            "rm/loss": s["loss"] / s["pairs"],
            "rm/train_accuracy": s["correct"] / s["pairs"],
            "rm/train_margin": s["margin"] / s["pairs"],
            "train/pairs": s["pairs"],
        }

    def evaluate(model, items):
        by_k: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # K -> [right pairs, pairs]
        prompt_accuracy: dict[int, list[float]] = defaultdict(list)  # K -> each prompt's share right
        correct = pairs = margin = loss_sum = 0.0
        for i in range(0, len(items), 8):
            batch = items[i : i + 8]
            for item, rewards in zip(batch, forward(model, batch)):
                p, c, m = pair_agreement(rewards, item.pairs)
                loss_sum += ranking_loss(rewards, p).item() * len(item.pairs)
                correct, pairs, margin = correct + c, pairs + len(item.pairs), margin + m
                k = len(item.sequences)
                by_k[k][0] += c
                by_k[k][1] += len(item.pairs)
                prompt_accuracy[k].append(c / len(item.pairs))
        out = {
            "rm/accuracy": correct / pairs,
            "rm/margin": margin / pairs,
            "rm/eval_loss": loss_sum / pairs,
            "rm/eval_pairs": pairs,
        }
        out.update({f"rm/accuracy_k{k}": c / n for k, (c, n) in sorted(by_k.items())})
        for k, shares in sorted(prompt_accuracy.items()):
            out[f"rm/prompt_accuracy_k{k}"] = sum(shares) / len(shares)
            out[f"rm/prompts_k{k}"] = float(len(shares))
        return out

    return Stage(
        name="reward",
        loss=loss,
        weight=lambda item: float(len(item.pairs)) if per_pair else 1.0,
        length=lambda item: max(len(s) for s in item.sequences) * len(item.sequences),
        summarize=summarize,
        evaluate=evaluate,
        export=lambda model, folder: save_model(model, folder, tokenizer),
        plots=["rm/loss", "rm/train_accuracy", "rm/accuracy", "rm/margin"],
        lineage=lineage,
    )


def train(cfg: RewardConfig, on_step=None) -> dict[str, float]:
    """Train a reward model; every record is validated before anything is written."""
    check_config(cfg)
    if cfg.loss_weighting not in LOSS_WEIGHTINGS:
        raise UserError(f"loss_weighting: {cfg.loss_weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}")
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    invalid = InvalidRecords(d.on_invalid)
    rankings = load_rankings(d.train, d.format, invalid)
    if d.eval:
        train_rankings, eval_rankings = rankings, load_rankings(d.eval, d.format, invalid)
    else:
        train_rankings, eval_rankings = split_by_prompt(rankings, cfg.eval_fraction, cfg.seed)
    reference = load_demonstrations(cfg.normalize_with, invalid=invalid) if cfg.normalize_with else []
    train_items = tokenize_rankings(train_rankings, tokenizer, d.max_length, d.truncation, d.system_prompt)
    eval_items = tokenize_rankings(eval_rankings, tokenizer, d.max_length, d.truncation, d.system_prompt)
    if cfg.pairs_as_independent:
        train_items = independent_pairs(train_items)

    set_seed(cfg.seed)
    device = pick_device()
    model = load_reward_model(model_path, tokenizer, device, init_head=True)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
        for name, p in model.named_parameters():
            p.requires_grad = p.requires_grad or name.split(".")[-2] == "score"  # the new head always trains
    freeze_bottom(model, cfg.freeze_layers)
    lineage = {
        "parent": model_path,
        "data": data_lineage(d.train, d.eval, cfg.normalize_with),
        "invalid_records": invalid.summary(),
    }
    stage = _reward_stage(tokenizer, device, lineage, cfg.share_prompt, cfg.loss_weighting)
    if reference:
        stage.export = _normalizing_export(stage.export, reference, tokenizer, cfg, device)
    if eval_items:
        # in every process (only the main one evaluates later): asking accelerate which process is the main
        # one before `fit` sets it up would set it up wrongly
        before = _fresh_head_metrics(stage, model, eval_items, device, cfg.dtype)
        evaluate = stage.evaluate
        stage.evaluate = lambda model, items: {**before, **evaluate(model, items)}
    summary = fit(cfg, stage, model, train_items, eval_items, on_step=on_step)
    if "rm/accuracy" in summary:  # the main process, which evaluated
        print(heldout_report(summary), file=sys.stderr)
    return summary


LOSS_WEIGHTINGS = ("prompt", "pair")


def _fresh_head_metrics(stage: Stage, model, items, device, dtype: str) -> dict[str, float]:
    """The held-out metrics of the untrained model (new head), as `rm/..._before`: the accuracy a random
    head gets from the pretrained features alone, which the trained accuracy should be read against."""
    model.eval()
    with torch.no_grad(), autocast(device, resolve_dtype(dtype)):
        metrics = stage.evaluate(model, items)
    model.train()
    return {f"{key}_before": value for key, value in metrics.items()}


def heldout_report(summary: dict[str, float]) -> str:
    """Held-out accuracy after and before training, and per prompt by K, as one console line."""
    text = (
        f"reward: held-out accuracy {summary['rm/accuracy']:.4f} on {summary['rm/eval_pairs']:.0f} pairs "
        f"(before training, fresh head: {summary['rm/accuracy_before']:.4f})"
    )
    counts = [key for key in summary if key.startswith("rm/prompts_k") and not key.endswith("_before")]
    by_k = sorted(int(key[len("rm/prompts_k") :]) for key in counts)
    per_k = [
        f"K={k} {summary[f'rm/prompt_accuracy_k{k}']:.3f} (before {summary[f'rm/prompt_accuracy_k{k}_before']:.3f}, "
        f"{summary[f'rm/prompts_k{k}']:.0f} prompts)"
        for k in by_k
    ]
    return text + "; per-prompt accuracy by K: " + ", ".join(per_k)


def _normalizing_export(export, reference, tokenizer, cfg: RewardConfig, device):
    """Before saving, store a bias that makes the demonstrations' answers score mean 0."""

    def write(model, folder: Path):
        seqs = [
            sequence_ids(tokenizer, c.messages[:-1], c.messages[-1]["content"], cfg.data.system_prompt)
            for c in reference
        ]
        model.eval()
        with torch.no_grad():
            scores = torch.cat(
                [
                    reward_scores(model, seqs[i : i + 8], tokenizer.pad_token_id, device)
                    for i in range(0, len(seqs), 8)
                ]
            )
        base = unwrap(model)
        base.config.reward_bias = -float(scores.mean())
        export(model, folder)

    return write


# --------------------------------------------------------------------------------------------------
# scoring


def score_rankings(
    model_path: str, rankings: Sequence[Ranking], batch_size: int = 8, max_length: int = 0
) -> list[list[float]]:
    """Reward of every answer of every ranking (the stored normalisation bias added). A prompt and answer
    longer than `max_length` tokens (0: no limit) stop with an error naming the record."""
    tokenizer = load_tokenizer(model_path)
    seqs = []
    for r in rankings:
        for k, resp in enumerate(r.responses):
            seqs.append(sequence_ids(tokenizer, r.prompt, resp))
            if max_length and len(seqs[-1]) > max_length:
                raise DataError(
                    f"{r.where}: field `responses[{k}]`: {len(seqs[-1])} tokens with the prompt, more than "
                    f"max_length={max_length}"
                )
    device = pick_device()
    model = load_reward_model(model_path, tokenizer, device).eval()
    bias = float(getattr(model.config, "reward_bias", 0.0) or 0.0)
    with torch.no_grad():
        flat = [
            float(x) + bias
            for i in range(0, len(seqs), batch_size)
            for x in reward_scores(model, seqs[i : i + batch_size], tokenizer.pad_token_id, device)
        ]
    out, at = [], 0
    for r in rankings:
        out.append(flat[at : at + len(r.responses)])
        at += len(r.responses)
    return out


def score(cfg: ScoreConfig) -> list[list[float]]:
    """`chatrlhf score`: print one JSON line per prompt with the reward of each answer."""
    if not cfg.model:
        raise UserError("model: name the reward model checkpoint to score with")
    if cfg.data:
        rankings = load_rankings(cfg.data)
    elif cfg.prompt and cfg.response:
        rankings = [
            Ranking(
                "command line",
                [{"role": "user", "content": cfg.prompt}],
                cfg.response,
                [1] * len(cfg.response),
            )
        ]
    else:
        raise UserError("give --data FILE, or --prompt TEXT with one or more --response TEXT")
    results = score_rankings(resolve_model(cfg.model), rankings, cfg.batch_size, cfg.max_length)
    for r, scores in zip(rankings, results):
        print(json.dumps({"prompt": r.prompt[-1]["content"], "responses": r.responses, "scores": scores}))
    return results
