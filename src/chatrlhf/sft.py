"""Stage 1, supervised fine-tuning (and stage 0, causal-LM pretraining on raw text, on the same code).

    chatrlhf sft --config sft.yaml --max_steps 20
    chatrlhf pretrain --data.train corpus.txt

SFT trains on assistant tokens only. Logits are computed only where a target exists, so prompt tokens and
padding never pay for the full-vocabulary projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import set_seed

from chatrlhf.config import PretrainConfig, SFTConfig, TrainConfig
from chatrlhf.data import (
    InvalidRecords,
    Sample,
    chunk_stream,
    load_demonstrations,
    load_texts,
    pack,
    tokenize_conversations,
    tokenize_texts,
)
from chatrlhf.losses import token_nll
from chatrlhf.models import (
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_model,
    unwrap,
)
from chatrlhf.runs import data_lineage
from chatrlhf.training import Stage, check_config, fit


def collate(samples: Sequence[Sample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch.

    Returns input_ids, position_ids, targets (B, T): targets[b, t] is the token at t+1 when it carries
    loss, else -100. Padding restarts the position ids, so it forms its own segment and the model's
    packed-sequence masking keeps real tokens from attending to it (no attention mask needed).
    """
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    targets = torch.full((len(samples), width), -100, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        pos = torch.tensor(s.position_ids)
        positions[b, :n] = pos
        positions[b, n:] = torch.arange(width - n)
        # a token is a target when it carries loss and does not start a new packed sample
        is_target = torch.tensor(s.loss_mask[1:], dtype=torch.bool) & (pos[1:] != 0)
        targets[b, : n - 1] = torch.where(is_target, ids[b, 1:n], torch.full_like(ids[b, 1:n], -100))
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "targets": targets.to(device)}


def target_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N positions that have a target, and those targets (N,)."""
    base = unwrap(model)
    select = batch["targets"] != -100
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        return logits[select], batch["targets"][select]
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    return base.get_output_embeddings()(hidden[select]), batch["targets"][select]


def _lm_stage(name: str, tokenizer, device, lineage: dict, plots: list[str]) -> Stage:
    pad_id = tokenizer.pad_token_id

    def loss(model, samples, step_weight):
        logits, targets = target_logits(model, collate(samples, pad_id, device))
        nll = token_nll(logits, targets)
        stats = {"nll": nll.sum().item(), "tokens": float(nll.numel())}
        stats["input_tokens"] = float(sum(len(s.input_ids) for s in samples))
        return nll.sum() / step_weight, stats

    def summarize(sums):
        return {
            "train/loss": sums["nll"] / max(sums["tokens"], 1),
            "train/tokens": sums["tokens"],
            "train/input_tokens": sums["input_tokens"],
        }

    def evaluate(model, samples):
        nll_sum, count = 0.0, 0
        for i in range(0, len(samples), 8):
            logits, targets = target_logits(model, collate(samples[i : i + 8], pad_id, device))
            nll = token_nll(logits, targets)
            nll_sum, count = nll_sum + nll.sum().item(), count + nll.numel()
        mean = nll_sum / max(count, 1)
        return {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0))}

    return Stage(
        name=name,
        loss=loss,
        weight=lambda s: float(sum(1 for m, p in zip(s.loss_mask[1:], s.position_ids[1:]) if m and p != 0)),
        length=lambda s: len(s.input_ids),
        summarize=summarize,
        evaluate=evaluate,
        export=lambda model, folder: save_model(model, folder, tokenizer),
        plots=plots,
        lineage=lineage,
    )


def _prepare_model(cfg: TrainConfig, tokenizer, model_path: str):
    set_seed(cfg.seed)
    model = load_causal_lm(model_path, tokenizer, pick_device())
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def train(cfg: SFTConfig, on_step=None) -> dict[str, float]:
    """Fine-tune on demonstrations; every record is validated before anything is written."""
    check_config(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    invalid = InvalidRecords(d.on_invalid)

    def samples(source: str) -> list[Sample]:
        conversations = load_demonstrations(source, d.format, invalid)
        return tokenize_conversations(conversations, tokenizer, d.max_length, d.truncation, d.system_prompt)

    train_samples = samples(d.train)
    eval_samples = samples(d.eval) if d.eval else []
    if d.packing:
        train_samples = pack(train_samples, d.max_length)
    model = _prepare_model(cfg, tokenizer, model_path)
    lineage = {
        "parent": model_path,
        "data": data_lineage(d.train, d.eval),
        "invalid_records": invalid.summary(),
    }
    stage = _lm_stage("sft", tokenizer, pick_device(), lineage, ["train/loss", "eval/loss", "train/lr"])
    return fit(cfg, stage, model, train_samples, eval_samples, on_step=on_step)


def pretrain(cfg: PretrainConfig, on_step=None) -> dict[str, float]:
    """Causal-LM training on raw text, packed into rows of data.max_length; every token is a target."""
    check_config(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    invalid = InvalidRecords(d.on_invalid)
    train_rows = chunk_stream(tokenize_texts(load_texts(d.train, invalid), tokenizer), d.max_length)
    eval_rows = (
        chunk_stream(tokenize_texts(load_texts(d.eval, invalid), tokenizer), d.max_length) if d.eval else []
    )
    model = _prepare_model(cfg, tokenizer, model_path)
    lineage = {
        "parent": model_path,
        "data": data_lineage(d.train, d.eval),
        "invalid_records": invalid.summary(),
    }
    stage = _lm_stage("pretrain", tokenizer, pick_device(), lineage, ["train/loss", "eval/loss", "train/lr"])
    return fit(cfg, stage, model, train_rows, eval_rows, on_step=on_step)
