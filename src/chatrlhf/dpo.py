"""Direct preference optimisation from the same rankings the reward model learns from, without a reward model.

    chatrlhf dpo --config dpo.yaml
    chatrlhf dpo --model runs/x/sft --data.train rankings.jsonl --listwise plackett_luce

An answer's implicit reward is beta * (log pi(y|x) - log pi_ref(y|x)), summed over its tokens; the reference is
the starting (SFT) model, whose log-probs are computed once before training. A prompt and its K ranked answers
are one batch element, the prompt forwarded once (`shared_prompt_logprobs`), as the reward model does. The loss
of a prompt is, by `listwise`:

    off             the mean over its ranked pairs of DPO's sigmoid loss or IPO's squared loss
    plackett_luce   the Plackett-Luce likelihood of the whole ranking (PRO); with K = 2 pairwise DPO
    lipo            the pairs weighted by LiPO-lambda's rank and score gaps (mean weight 1)

Ties make no pair and are not compared; a ranking whose answers all tie is refused as in the reward stage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from transformers import set_seed

from chatrlhf.configs import DPOConfig
from chatrlhf.errors import UserError
from chatrlhf.forward import answer_logprobs, shared_prompt_logprobs
from chatrlhf.harness import autocast, check_config
from chatrlhf.losses import dpo_pair_losses, lambda_weights, plackett_luce_loss
from chatrlhf.models import (
    apply_lora,
    freeze_bottom,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_dtype,
    resolve_model,
    save_model,
)
from chatrlhf.preferences import load_rankings
from chatrlhf.ranked import RankedItem, pair_agreement, split_by_prompt, tokenize_rankings
from chatrlhf.records import InvalidRecords
from chatrlhf.runs import data_lineage
from chatrlhf.training import Stage, fit


def _logprobs(model, item: RankedItem, pad_id: int, device, share_prompt: bool) -> torch.Tensor:
    """log p(answer | prompt) of the item's K answers. (K,) fp32."""
    if share_prompt:
        return shared_prompt_logprobs(model, item.sequences, item.answer_start, device)
    return answer_logprobs(model, item.sequences, item.answer_start, pad_id, device)


def prompt_loss(logratios: torch.Tensor, item: RankedItem, cfg: DPOConfig) -> torch.Tensor:
    """One prompt's loss from its K answers' log-ratios (K,) to the reference; a scalar."""
    scores = cfg.beta * logratios
    if cfg.listwise == "plackett_luce":
        return plackett_luce_loss(scores, item.ranks)
    pairs = torch.tensor(item.pairs, dtype=torch.long, device=logratios.device)
    losses = dpo_pair_losses(logratios[pairs[:, 0]] - logratios[pairs[:, 1]], cfg.beta, cfg.loss)
    if cfg.listwise == "lipo":
        losses = losses * lambda_weights(scores, item.ranks, pairs)
    return losses.mean()


def _dpo_stage(tokenizer, device, lineage: dict, cfg: DPOConfig) -> Stage:
    pad_id = tokenizer.pad_token_id

    def logratios(model, item: RankedItem) -> torch.Tensor:
        reference = torch.tensor(item.reference, device=device)
        return _logprobs(model, item, pad_id, device, cfg.share_prompt) - reference

    def loss(model, items, step_weight):
        total = torch.zeros((), device=device)
        stats = {"loss": 0.0, "prompts": 0.0, "pairs": 0.0, "correct": 0.0, "margin": 0.0}
        for item in items:
            h = logratios(model, item)
            item_loss = prompt_loss(h, item, cfg)
            total = total + item_loss
            _, correct, margin = pair_agreement(cfg.beta * h, item.pairs)
            stats["loss"] += item_loss.item()
            stats["prompts"] += 1
            stats["pairs"] += len(item.pairs)
            stats["correct"] += correct
            stats["margin"] += margin
        return total / step_weight, stats

    def summarize(s):
        return {
            "dpo/loss": s["loss"] / s["prompts"],
            "dpo/train_accuracy": s["correct"] / s["pairs"],
            "dpo/train_margin": s["margin"] / s["pairs"],
            "train/pairs": s["pairs"],
        }

    def evaluate(model, items):
        correct = pairs = margin = loss_sum = 0.0
        for item in items:
            h = logratios(model, item)
            _, c, m = pair_agreement(cfg.beta * h, item.pairs)
            loss_sum += prompt_loss(h, item, cfg).item()
            correct, pairs, margin = correct + c, pairs + len(item.pairs), margin + m
        return {
            "dpo/accuracy": correct / pairs,
            "dpo/margin": margin / pairs,
            "dpo/eval_loss": loss_sum / len(items),
            "dpo/eval_pairs": pairs,
        }

    return Stage(
        name="dpo",
        loss=loss,
        weight=lambda item: 1.0,
        length=lambda item: sum(len(s) for s in item.sequences),
        summarize=summarize,
        evaluate=evaluate,
        export=lambda model, folder: save_model(model, folder, tokenizer),
        plots=["dpo/loss", "dpo/train_accuracy", "dpo/accuracy", "dpo/train_margin"],
        lineage=lineage,
    )


def attach_reference(model, items: Sequence[RankedItem], cfg: DPOConfig, pad_id: int, device) -> None:
    """Store each item's reference log-probs, computed once with `model` as the training forward computes
    them (the same dtype and packing), so the policy's log-ratios start at 0."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, resolve_dtype(cfg.dtype)):
        for item in items:
            item.reference = _logprobs(model, item, pad_id, device, cfg.share_prompt).tolist()
    model.train(was_training)


def check(cfg: DPOConfig) -> None:
    check_config(cfg)
    if cfg.beta <= 0:
        raise UserError(f"beta: must be > 0, got {cfg.beta}")
    if cfg.listwise == "plackett_luce" and cfg.loss != "sigmoid":
        raise UserError(
            "loss: plackett_luce is a likelihood of the whole ranking; with listwise: plackett_luce set "
            "loss: sigmoid (ipo applies to pairs: listwise off or lipo)"
        )


def train(cfg: DPOConfig, on_step=None) -> dict[str, float]:
    """DPO (or its listwise forms) from the starting model on rankings; every record is validated first."""
    check(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    invalid = InvalidRecords(d.on_invalid)
    rankings = load_rankings(d.train, d.format, invalid)
    if d.eval:
        train_rankings, eval_rankings = rankings, load_rankings(d.eval, d.format, invalid)
    else:
        train_rankings, eval_rankings = split_by_prompt(rankings, cfg.eval_fraction, cfg.seed)
    train_items = tokenize_rankings(train_rankings, tokenizer, d.max_length, d.truncation, d.system_prompt)
    eval_items = tokenize_rankings(eval_rankings, tokenizer, d.max_length, d.truncation, d.system_prompt)

    set_seed(cfg.seed)
    device = pick_device()
    reference_path = resolve_model(cfg.reference_model) if cfg.reference_model else model_path
    reference = load_causal_lm(reference_path, tokenizer, device)
    attach_reference(reference, [*train_items, *eval_items], cfg, tokenizer.pad_token_id, device)
    model = reference if reference_path == model_path else load_causal_lm(model_path, tokenizer, device)
    del reference
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    freeze_bottom(model, cfg.freeze_layers)
    lineage = {
        "parent": model_path,
        "reference": reference_path,
        "data": data_lineage(d.train, d.eval),
        "invalid_records": invalid.summary(),
    }
    summary = fit(cfg, _dpo_stage(tokenizer, device, lineage, cfg), model, train_items, eval_items, on_step)
    if "dpo/accuracy" in summary:
        print(
            f"dpo: held-out implicit-reward accuracy {summary['dpo/accuracy']:.4f} on "
            f"{summary['dpo/eval_pairs']:.0f} pairs",
            file=sys.stderr,
        )
    return summary
